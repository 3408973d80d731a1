#!/bin/sh
# Install mobiserve with its server extra into a new virtual environment: the image's install
# step, and what the tests run outside Docker. Usage: install.sh VENV_DIR WHEEL
set -eu
venv=${1:?usage: install.sh VENV_DIR WHEEL}
wheel=${2:?usage: install.sh VENV_DIR WHEEL}
python -m venv "$venv"
# The server extra brings onnxruntime and the image libraries; the bare wheel is the thin client.
"$venv/bin/python" -m pip install "${wheel}[server]"
# Fail the build here, not at the first start, if the installed server cannot be imported.
"$venv/bin/python" -c "import mobiserve.server.app, onnxruntime"
"$venv/bin/mobiserve" --version
