#!/usr/bin/env bash
# Creates .venv with prometheus_client (the parser scrape.py uses); not committed.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
