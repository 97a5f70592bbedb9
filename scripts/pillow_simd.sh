#!/usr/bin/env bash
# Pillow-SIMD in place of Pillow: the same API and pixels (within a twentieth of a grey level), with an AVX2
# resize about 5x faster, which makes `--decode fast` about twice as fast on CPU workers (README, "Benchmark").
# It ships as source only, so this builds it, with every format the Pillow wheel reads (JPEG, PNG, WebP, TIFF,
# ICC profiles): a C compiler and the libraries' headers, installed from Debian packages when missing and run
# as root; the build is checked for each format. AVX2 is the default (x86-64 since 2013); SIMD=sse4 for
# older CPUs. The build runs on the CPU it targets or a like one.
#
#   scripts/pillow_simd.sh                  # replace Pillow in .venv (PYTHON=... for another interpreter)
#   scripts/pillow_simd.sh --target DIR     # install beside Pillow, for PYTHONPATH=DIR (tests, benchmarks)
#
# A later `pip install` that pulls Pillow back in undoes it: check with
#   python -c "from workers.decode import pillow_build; print(pillow_build())"
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
VERSION=12.1.1.post0
SIMD=${SIMD:-avx2}
case "$SIMD" in avx2) FLAGS="-mavx2" ;; sse4) FLAGS="-msse4" ;; *) echo "$0: SIMD=$SIMD: use avx2 or sse4" >&2; exit 2 ;; esac
target=""
if [ $# -gt 0 ]; then
  if [ "$1" != "--target" ] || [ $# -ne 2 ]; then echo "usage: $0 [--target DIR]" >&2; exit 2; fi
  target=$2
fi

PACKAGES="gcc libc6-dev libjpeg62-turbo-dev zlib1g-dev libwebp-dev libtiff-dev liblcms2-dev"
# dpkg-query exits 1 when a package was never installed: that is the case looked for, not a failure
missing=$({ dpkg-query -W -f='${db:Status-Abbrev} ${Package}\n' $PACKAGES 2>/dev/null || true; } \
  | awk '$1 == "ii" {print $2}' | sort | comm -13 - <(tr ' ' '\n' <<<"$PACKAGES" | sort) | tr '\n' ' ')
if [ -n "$missing" ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "$0: needs a C compiler and image libraries' headers: apt-get install $missing" >&2
    exit 1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

if [ -n "$target" ]; then
  rm -rf "$target"
  CC="cc $FLAGS" "$PYTHON" -m pip install -q --no-deps --no-cache-dir --no-binary pillow-simd --target "$target" "pillow-simd==$VERSION"
else
  "$PYTHON" -m pip uninstall -q -y pillow
  CC="cc $FLAGS" "$PYTHON" -m pip install -q --no-cache-dir --no-binary pillow-simd "pillow-simd==$VERSION"
fi
PYTHONPATH=${target:-}${target:+:}$PWD "$PYTHON" - <<'CHECK'
import sys
from PIL import features
from workers.decode import pillow_build
lacking = [name for name in ("jpg", "zlib", "webp", "libtiff", "littlecms2") if not features.check(name)]
if lacking:
    sys.exit(f"scripts/pillow_simd.sh: {pillow_build()} was built without {', '.join(lacking)}")
print(pillow_build())
CHECK
