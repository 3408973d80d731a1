#!/bin/sh
# Docker HEALTHCHECK: exit 0 when the server in this container answers SERVING on the standard
# gRPC health service, 1 otherwise (loading, draining, down, or no answer within 3 s), which is
# what `mobiserve health` does. Service "" (MOBISERVE_HEALTH_SERVICE=) asks about the whole server.
# Kubernetes does not use this: its probes speak gRPC health natively (deploy/kubernetes).
set -eu
exec mobiserve health --target "127.0.0.1:${MOBISERVE_PORT:-50051}" \
    --service "${MOBISERVE_HEALTH_SERVICE-mobiserve.v1.Classifier}" --timeout 3
