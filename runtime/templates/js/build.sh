#!/usr/bin/env bash
# Builds {{name}}.wasm, the component the manifest names, with componentize-js (the version
# Sluice pins: `make tools` in a Sluice checkout installs it into .tools/js, and Node.js into
# .tools/node when the machine has none). sluice.js is the JavaScript SDK and wit/ the
# contract, copied here by `sluice new`. `-d http fetch-event` is required: without it the
# component imports wasi:http, which Sluice does not provide.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
tools=${SLUICE_TOOLS:-{{tools}}}
if [ -x "$tools/node/bin/node" ]; then export PATH="$tools/node/bin:$PATH"; fi
if [ -x "$tools/js/node_modules/.bin/componentize-js" ]; then
  componentize_js="$tools/js/node_modules/.bin/componentize-js"
elif command -v componentize-js >/dev/null; then
  componentize_js=componentize-js
else
  echo "error: componentize-js not found in $tools/js or on PATH (run \`make tools\` in a Sluice checkout, or set SLUICE_TOOLS)" >&2
  exit 1
fi
# From this folder: componentize-js resolves the SDK import below the working directory.
"$componentize_js" app.js --wit wit -n handler -d http fetch-event -o {{name}}.wasm.tmp >/dev/null
mv {{name}}.wasm.tmp {{name}}.wasm
echo "built {{name}}.wasm; try: sluice test {{name}}.toml --payload-file message.txt"
