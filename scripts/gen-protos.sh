#!/usr/bin/env bash
# Regenerate the Python stubs (and their type stubs, via mypy-protobuf) next to the .proto.
# `make check-protos` runs this and fails if the committed stubs differ.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# mypy-protobuf's protoc plugins live beside that Python
PATH="$(cd "$(dirname "$(command -v "$PY")")" && pwd):$PATH"
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out=protos --grpc_python_out=protos \
  --mypy_out=protos --mypy_grpc_out=protos \
  protos/mobiserve/v1/classifier.proto
