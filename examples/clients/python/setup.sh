#!/usr/bin/env bash
# Creates .venv with the packages from requirements.txt and generates the gRPC stubs
# from proto/ into gen/ (neither is committed).
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
mkdir -p gen
.venv/bin/python -m grpc_tools.protoc -I ../../../proto/grpc/proto \
    --python_out=gen --grpc_python_out=gen runnel/v1/runnel.proto
