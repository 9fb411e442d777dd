#!/usr/bin/env bash
# Builds sluice-bench's Extism peer: the noop plugin (plugin/, extism-pdk, for
# wasm32-unknown-unknown) to target/noop.wasm, and the host binary to
# target/release/peer-extism, where the harness looks for them. `make bench` runs it; nothing
# else does (Extism brings its own wasmtime: many minutes of compile on 2 cores the first
# time). Adds the wasm32-unknown-unknown target to the toolchain when it is missing, so that
# `make test` never needs it.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

if command -v rustup >/dev/null \
  && ! rustup target list --installed | grep -qx wasm32-unknown-unknown; then
  echo "peer-extism: adding the wasm32-unknown-unknown target (for the Extism plugin)" >&2
  rustup target add wasm32-unknown-unknown
fi
cargo build --quiet --release --locked --manifest-path plugin/Cargo.toml --target wasm32-unknown-unknown
mkdir -p target
built=plugin/target/wasm32-unknown-unknown/release/noop_extism.wasm
if ! cmp -s "$built" target/noop.wasm; then
  cp "$built" target/noop.wasm.tmp && mv target/noop.wasm.tmp target/noop.wasm
fi
cargo build --quiet --release --locked --manifest-path Cargo.toml
