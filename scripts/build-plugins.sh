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
for p in "${plugins[@]}"; do
  built="target/plugins/wasm32-wasip2/plugin/${p//-/_}.wasm"
  dest="plugins/dist/$p.wasm"
  if ! cmp -s "$built" "$dest"; then
    cp "$built" "$dest.tmp" && mv "$dest.tmp" "$dest"
  fi
done
