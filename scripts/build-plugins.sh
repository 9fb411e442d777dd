#!/usr/bin/env bash
# Builds every guest plugin under plugins/ for wasm32-wasip2 and copies the components to
# plugins/dist/NAME.wasm, where the manifests and the tests find them.
#
# It uses its own target directory, so it can run while another cargo command holds the
# main one (the test fixture calls it from inside `cargo test`). A file in dist/ is only
# rewritten when its content changed, so a watcher sees no change for a no-op build.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

# One build at a time: test binaries (and `make run`) call this concurrently, and two builds
# would race on the same `.tmp` files. A second caller waits here for the first to finish,
# then finds everything fresh (a no-op build). `flock` is util-linux's.
if ! command -v flock >/dev/null; then
  echo "error: flock is missing (it is in util-linux: apt-get install util-linux)" >&2; exit 1
fi
mkdir -p target
exec 9>"$root/target/build-plugins.lock"
if ! flock -w 900 9; then
  echo "error: another build-plugins.sh held target/build-plugins.lock for 15 minutes" >&2
  exit 1
fi

plugins=()
for manifest in plugins/*/Cargo.toml; do
  plugins+=("$(basename "$(dirname "$manifest")")")
done

args=()
for p in "${plugins[@]}"; do args+=(-p "$p"); done
cargo build --quiet --profile plugin --target wasm32-wasip2 \
  --target-dir "$root/target/plugins" "${args[@]}"

mkdir -p plugins/dist
publish() { # built-file dest-file: copy only when the content changed
  if ! cmp -s "$1" "$2"; then
    cp "$1" "$2.tmp" && mv "$2.tmp" "$2"
  fi
}
for p in "${plugins[@]}"; do
  publish "target/plugins/wasm32-wasip2/plugin/${p//-/_}.wasm" "plugins/dist/$p.wasm"
done

# A plugin with a `v2` feature gets a second build, NAME-v2.wasm (two versions of one
# handler, for the hot-reload tests).
for p in "${plugins[@]}"; do
  if grep -q '^v2 = ' "plugins/$p/Cargo.toml"; then
    # Its own target dir: toggling features in one would rebuild both variants every time.
    cargo build --quiet --profile plugin --target wasm32-wasip2 \
      --target-dir "$root/target/plugins-v2" -p "$p" --features v2
    publish "target/plugins-v2/wasm32-wasip2/plugin/${p//-/_}.wasm" "plugins/dist/$p-v2.wasm"
  fi
done

# Python (plugins/NAME/app.py) and JavaScript (plugins/NAME/app.js) handlers, with the tools
# scripts/install-tools.sh pins. Building one takes seconds (an interpreter is snapshotted into
# the component), so each is rebuilt only when its inputs changed: the plugin's files, the
# SDK, the WIT and the tool pins, hashed into a stamp next to the built file.
poly="$root/target/plugins-poly"
# The Node.js install-tools.sh fetched when the machine had none (or too old a one).
if [ -x .tools/node/bin/node ]; then export PATH="$root/.tools/node/bin:$PATH"; fi
mkdir -p "$poly"
stamp_of() { # plugin-dir sdk-dir tool-identity
  { find "$1" "$2" wit -type f -not -name '*.pyc' -print0 | sort -z | xargs -0 sha256sum
    echo "$3"; } | sha256sum | cut -d' ' -f1
}
build_poly() { # name lang
  local name=$1 lang=$2 out="$poly/$1.wasm" stamp
  case $lang in
    py) stamp=$(stamp_of "plugins/$name" guest-sdk/python "$(.tools/py/bin/componentize-py --version 2>/dev/null)") ;;
    js) stamp=$(stamp_of "plugins/$name" guest-sdk/js "$(sha256sum scripts/js-tools/package-lock.json)") ;;
  esac
  if [ -f "$out" ] && [ "$(cat "$poly/$name.stamp" 2>/dev/null)" = "$stamp" ]; then
    publish "$out" "plugins/dist/$name.wasm"
    return
  fi
  case $lang in
    py)
      if [ ! -x .tools/py/bin/componentize-py ]; then
        echo "error: componentize-py is missing (run \`make tools\`)" >&2; exit 1
      fi
      # A handler that makes HTTP requests (sluice_http) says so in its first line,
      # `# sluice-build: wasi-http`, and targets the handler world plus wasi:http.
      local world=(-d wit -w handler)
      if head -n 1 "plugins/$name/app.py" | grep -qx '# sluice-build: wasi-http'; then
        world=(-d guest-sdk/python/wit-http -w handler-http)
      fi
      .tools/py/bin/componentize-py "${world[@]}" componentize \
        -p guest-sdk/python -p "plugins/$name" app -o "$out.tmp" >/dev/null ;;
    js)
      if [ ! -x .tools/js/node_modules/.bin/componentize-js ]; then
        echo "error: componentize-js is missing (run \`make tools\`)" >&2; exit 1
      fi
      # From the repository root: componentize-js resolves the SDK import under the working
      # directory. `-d http fetch-event`: without the `http` feature the component imports no
      # wasi:http, which only a manifest with `[capabilities] http` may. A handler that calls
      # `fetch` says so in its first line, `// sluice-build: wasi-http`, and keeps the feature.
      local disable=(http fetch-event)
      if head -n 1 "plugins/$name/app.js" | grep -qx '// sluice-build: wasi-http'; then
        disable=(fetch-event)
      fi
      .tools/js/node_modules/.bin/componentize-js "plugins/$name/app.js" --wit wit -n handler \
        -d "${disable[@]}" -o "$out.tmp" >/dev/null ;;
  esac
  mv "$out.tmp" "$out"
  echo "$stamp" > "$poly/$name.stamp"
  publish "$out" "plugins/dist/$name.wasm"
}
for src in plugins/*/app.py; do [ -e "$src" ] && build_poly "$(basename "$(dirname "$src")")" py; done
for src in plugins/*/app.js; do [ -e "$src" ] && build_poly "$(basename "$(dirname "$src")")" js; done
