#!/usr/bin/env bash
# Installs the packages from package.json into node_modules (not committed). The stubs
# are built at run time from proto/ by @grpc/proto-loader. Quick when node_modules
# already holds what package-lock.json says: `npm ci` would delete and rebuild it,
# under any example client running from it meanwhile.
set -euo pipefail
cd "$(dirname "$0")"
if [ -f package-lock.json ]; then
    stamp=node_modules/.installed-from
    wanted=$(sha256sum package-lock.json | cut -d' ' -f1)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$wanted" ]; then
        npm ci --silent --no-audit --no-fund
        echo "$wanted" > "$stamp"
    fi
else
    npm install --silent --no-audit --no-fund
fi
