#!/bin/sh
# Put the zoo's models into the image, checked by sha256: `mobiserve models pull` refuses a file
# whose digest differs from the pinned one and leaves nothing behind. Usage:
#   bake-models.sh DIR [NAME...]        (default NAME: int8)
# Source: $MOBISERVE_MODEL_MIRROR (a folder or a base URL) when set and not an empty folder,
# else the ONNX model zoo.
set -eu
dir=${1:?usage: bake-models.sh DIR [NAME...]}
shift
[ "$#" -gt 0 ] || set -- int8
mirror=${MOBISERVE_MODEL_MIRROR:-}
if [ -n "$mirror" ] && [ -d "$mirror" ] && [ -z "$(ls -A "$mirror")" ]; then
    # The Dockerfile's default mirror is an empty stage: no mirror given, use the zoo.
    unset MOBISERVE_MODEL_MIRROR
fi
mobiserve models pull "$@" --dir "$dir"
# The pull writes its files private to the user who ran it (root, in the build); the server
# runs as another user and only reads them.
chmod -R a+rX "$dir"
