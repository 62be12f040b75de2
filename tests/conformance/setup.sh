#!/usr/bin/env bash
# Installs what host/tests/conformance.rs needs: tests/conformance/node_modules, exactly as
# package-lock.json pins it (the official MCP conformance suite @modelcontextprotocol/conformance,
# and the official TypeScript SDK v2 server packages the upstream everything_server.mjs is written
# with), via `npm ci`, then checks that the suite's CLI loads on this Node (node20/ makes it run on
# Node 20) and that the upstream builds its servers. Idempotent; run from anywhere:
#   bash tests/conformance/setup.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

node --version
npm ci --no-audit --no-fund --loglevel=error
node --import ./node20/register.mjs node_modules/@modelcontextprotocol/conformance/dist/index.js --version
node everything_server.mjs --check
