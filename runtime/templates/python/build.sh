#!/usr/bin/env bash
# Builds {{name}}.wasm, the component the manifest names, with componentize-py (the version
# Sluice pins: `make tools` in a Sluice checkout installs it into .tools/py). sluice.py is the
# Python SDK and wit/ the contract, copied here by `sluice new`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
tools=${SLUICE_TOOLS:-{{tools}}}
if [ -x "$tools/py/bin/componentize-py" ]; then
  componentize_py="$tools/py/bin/componentize-py"
elif command -v componentize-py >/dev/null; then
  componentize_py=componentize-py
else
  echo "error: componentize-py not found in $tools/py/bin or on PATH (run \`make tools\` in a Sluice checkout, or set SLUICE_TOOLS)" >&2
  exit 1
fi
"$componentize_py" -d wit -w handler componentize -p . app -o {{name}}.wasm.tmp >/dev/null
mv {{name}}.wasm.tmp {{name}}.wasm
echo "built {{name}}.wasm; try: sluice test {{name}}.toml --payload-file message.txt"
