#!/bin/sh
# Build mobiserve's wheel from a source tree: the image's first build stage, and what the tests
# run outside Docker. Usage: build-wheel.sh SRC_DIR OUT_DIR
set -eu
src=${1:?usage: build-wheel.sh SRC_DIR OUT_DIR}
out=${2:?usage: build-wheel.sh SRC_DIR OUT_DIR}
mkdir -p "$out"
# --no-deps: only mobiserve's own wheel; its dependencies are resolved when it is installed.
python -m pip wheel --no-deps --wheel-dir "$out" "$src"
ls "$out"/mobiserve-*.whl
