#!/usr/bin/env bash
# Regenerate the Python stubs (and their type stubs, via mypy-protobuf) next to each .proto.
# `make check-protos` runs this and fails if the committed stubs differ.
#
# The grpcio-tools pinned in pyproject's dev extra decides the gencode version, which is the
# oldest protobuf runtime the stubs accept (and the GRPC_GENERATED_VERSION, the oldest grpcio):
# it must stay within the protobuf range pyproject admits.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
# mypy-protobuf's protoc plugins live beside that Python
PATH="$(cd "$(dirname "$(command -v "$PY")")" && pwd):$PATH"
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out=protos --grpc_python_out=protos \
  --mypy_out=protos --mypy_grpc_out=protos \
  protos/mobiserve/v1/classifier.proto \
  protos/mobiserve/inference/grpc_service.proto

# The Open Inference Protocol's package is `inference`, and other stubs of it (tritonclient's,
# KServe's) put the same symbols in protobuf's default descriptor pool, which refuses a second
# definition ("duplicate symbol 'inference.DataType'"). Ours go into a pool of their own so both
# can be imported in one process; the wire format does not depend on the pool.
pb2=protos/mobiserve/inference/grpc_service_pb2.py
sed -i 's/^DESCRIPTOR = _descriptor_pool\.Default()\.AddSerializedFile(/DESCRIPTOR = _descriptor_pool.DescriptorPool().AddSerializedFile(/' "$pb2"
grep -q '^DESCRIPTOR = _descriptor_pool\.DescriptorPool()\.AddSerializedFile(' "$pb2" ||
  { echo "gen-protos: $pb2 no longer has the line to move into a private pool; update this script" >&2; exit 1; }
