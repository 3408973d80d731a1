#!/bin/sh
# Docker HEALTHCHECK: exit 0 when the server in this container answers SERVING on the standard
# gRPC health service, 1 otherwise (loading, draining, down, or no answer within 3 s).
# Kubernetes does not use this: its probes speak gRPC health natively (deploy/kubernetes).
set -eu
exec python - "127.0.0.1:${MOBISERVE_PORT:-50051}" "${MOBISERVE_HEALTH_SERVICE-mobiserve.v1.Classifier}" <<'PY'
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

target, service = sys.argv[1], sys.argv[2]
try:
    with grpc.insecure_channel(target) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=3)
except grpc.RpcError as exc:
    print(f"{target} {service or '(server)'}: {exc.code().name}", file=sys.stderr)
    sys.exit(1)
status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
print(f"{target} {service or '(server)'}: {status}")
sys.exit(0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1)
PY
