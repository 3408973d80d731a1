#!/bin/sh
# The container's entrypoint.
#   (no arguments), `serve [FLAGS]`, or just `--flag ...`: run the server, bound to
#       $MOBISERVE_HOST (0.0.0.0: only inside a container is every interface the right default),
#       gRPC on $MOBISERVE_PORT, metrics on $MOBISERVE_METRICS_PORT. Flags given here come last
#       and win. Without --model/--config it serves the zoo's int8 model from $MOBISERVE_MODELS
#       as "$MOBISERVE_MODEL_NAME", pulling it first (sha256-checked) from $MOBISERVE_MODEL_MIRROR
#       or the zoo if it is not there: baked into the image, or pulled at start.
#   any other mobiserve command (`health`, `models pull`, `classify`, ...): run it.
# `exec` makes mobiserve PID 1's replacement, so SIGTERM from Docker or the kubelet reaches the
# server itself and starts its drain.
set -eu
if [ "$#" -eq 0 ] || [ "${1#-}" != "$1" ]; then
    set -- serve "$@"
fi
if [ "$1" != serve ]; then
    exec mobiserve "$@"
fi
shift
own_model=no
for arg in "$@"; do
    case $arg in
        --model | --model=* | --config | --config=*) own_model=yes ;;
    esac
done
if [ "$own_model" = no ]; then
    # serve's default model is $MOBISERVE_MODELS/<int8 file>, pulled when missing.
    set -- --name "${MOBISERVE_MODEL_NAME:-int8}" "$@"
fi
set -- --host "${MOBISERVE_HOST:-0.0.0.0}" --port "${MOBISERVE_PORT:-50051}" "$@"
if [ -n "${MOBISERVE_METRICS_PORT-9100}" ]; then
    set -- --metrics-port "${MOBISERVE_METRICS_PORT-9100}" "$@"
fi
exec mobiserve serve "$@"
