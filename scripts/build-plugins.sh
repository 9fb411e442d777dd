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
