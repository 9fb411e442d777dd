#!/usr/bin/env bash
# Builds {{name}}.wasm, the component the manifest names (needs the wasm32-wasip2 target:
# `rustup target add wasm32-wasip2`). Extra arguments go to cargo; CARGO_TARGET_DIR and a
# surrounding workspace's target folder are honoured (cargo says where the component is).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
built=$(cargo build --release --target wasm32-wasip2 --message-format=json-render-diagnostics "$@" \
  | grep -o '"filenames":\[[^]]*\]' | grep -o '[^"]*/{{crate}}\.wasm' | tail -n 1)
if [ -z "$built" ]; then
  echo "error: cargo built no {{crate}}.wasm" >&2
  exit 1
fi
cp "$built" {{name}}.wasm.tmp
mv {{name}}.wasm.tmp {{name}}.wasm
echo "built {{name}}.wasm; try: sluice test {{name}}.toml --payload-file message.txt"
