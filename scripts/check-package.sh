#!/usr/bin/env bash
# The import-layer contracts (import-linter) and the type check (mypy) of pyproject.toml.
# Usage: scripts/check-package.sh [imports|types|all]   (ROOT=DIR checks another copy of the project)
# Both tools read a package from one folder, but mobiserve's parts live in folders of their own
# (pyproject's package-dir), so the package is assembled in a scratch folder first and the file
# names in the output are mapped back to the project's folders. The tests are type-checked too.
set -euo pipefail
what="${1:-all}"
root="${ROOT:-$(cd "$(dirname "$0")/.." && pwd)}"
BIN="${BIN:-$root/.venv/bin}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r "$root/protos/mobiserve" "$tmp/mobiserve"
for part in common client server bench; do cp -r "$root/$part" "$tmp/mobiserve/$part"; done
tests=()
if [ -d "$root/tests" ]; then cp -r "$root/tests" "$tmp/tests"; tests=(tests); fi
back() { sed -E 's#(^|[^a-z_])mobiserve/(common|client|server|bench)/#\1\2/#g'; }
cd "$tmp"
status=0
if [ "$what" != types ]; then
  out="$(PYTHONPATH="$tmp" "$BIN/lint-imports" "$root/pyproject.toml" --no-cache 2>&1)" || status=1
  printf '%s\n' "$out" | back | grep -vE '^[^A-Za-z]*$' || true  # without the banner
fi
if [ "$what" != imports ]; then
  out="$("$BIN/mypy" --config-file "$root/pyproject.toml" --cache-dir "$root/.mypy_cache" \
    mobiserve/common mobiserve/client mobiserve/server mobiserve/bench "${tests[@]}" 2>&1)" || status=1
  printf '%s\n' "$out" | back
fi
exit "$status"
