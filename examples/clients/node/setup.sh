#!/usr/bin/env bash
# Installs the packages from package.json into node_modules (not committed). The stubs
# are built at run time from proto/ by @grpc/proto-loader.
set -euo pipefail
cd "$(dirname "$0")"
if [ -f package-lock.json ]; then
    npm ci --silent --no-audit --no-fund
else
    npm install --silent --no-audit --no-fund
fi
