#!/usr/bin/env bash
# Installs what host/tests/mcp_eras.rs needs beyond tests/interop/requirements.txt (which gives
# the system python3 mcp 2.3 and the IntentGate SDK):
#   - tests/interop_modern/.venv-mcp130: a venv with mcp==1.30.0, the handshake-only tool server;
#   - tests/interop_modern/node_modules: the TypeScript clients, exactly as package-lock.json pins
#     them (@modelcontextprotocol/sdk 1.x and @modelcontextprotocol/client 2.x), via `npm ci`.
# Idempotent; run from anywhere:  bash tests/interop_modern/setup.sh
# PYTHON picks the interpreter for the venv (default python3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

py=${PYTHON:-python3}
if [ ! -x .venv-mcp130/bin/python ]; then
    "$py" -m venv .venv-mcp130
fi
.venv-mcp130/bin/python -m pip install --disable-pip-version-check -q -r requirements-mcp130.txt
.venv-mcp130/bin/python -c 'import importlib.metadata as m; print("mcp (handshake-only venv)", m.version("mcp"))'

npm ci --no-audit --no-fund --loglevel=error
node clients.mjs check
