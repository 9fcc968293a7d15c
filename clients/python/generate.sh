#!/usr/bin/env bash
# Generates the Python messages and gRPC stubs of lamplight.v1 from ../../proto into gen/ (gitignored).
# Usage: generate.sh [PYTHON]  (a Python with grpcio-tools installed; default: python3)
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
python="${1:-python3}"
rm -rf "$here/gen"
mkdir -p "$here/gen"
"$python" -m grpc_tools.protoc \
  -I "$here/../../proto" \
  --python_out="$here/gen" \
  --grpc_python_out="$here/gen" \
  --pyi_out="$here/gen" \
  lamplight/v1/events.proto
echo "generated $(cd "$here/gen" && find . -name '*.py' | sort | tr '\n' ' ')"
