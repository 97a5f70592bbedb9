"""Pillow-SIMD (``scripts/pillow_simd.sh``), the faster resize behind ``--decode fast`` on CPU workers: the
same pixels as Pillow within a fraction of a grey level, and the same top-1 on real photos. CI builds it
into ``.simd/`` (``.ci/run``) and runs the decode tests on it too (``scripts/test``)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import ROOT, script
from workers.decode import decode_fast, pillow_build

SIMD = ROOT / ".simd"
pytestmark = pytest.mark.skipif(not (SIMD / "PIL").is_dir(),
                                reason="no Pillow-SIMD in .simd/ (scripts/pillow_simd.sh --target .simd; CI builds it)")

DECODE = """
import sys
import numpy as np
from workers.decode import decode_fast, pillow_build
data = np.load(sys.argv[1], allow_pickle=False)
arrays = [decode_fast(data[f"j{i}"].tobytes(), (224, 224)).array for i in range(len(data.files))]
np.save(sys.argv[2], np.stack(arrays))
print(pillow_build())
"""


def test_pillow_simd_decodes_as_pillow_does(tmp_path):
    fidelity = script("fidelity")
    jpegs = fidelity.photo_set(0) + fidelity.photo_set(1) + fidelity.camera_jpegs(16)
    np.savez(tmp_path / "in.npz", **{f"j{i}": np.frombuffer(j, np.uint8) for i, j in enumerate(jpegs)})
    env = {**os.environ, "PYTHONPATH": f"{SIMD}{os.pathsep}{ROOT}"}
    proc = subprocess.run([sys.executable, "-c", DECODE, str(tmp_path / "in.npz"), str(tmp_path / "simd.npy")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().startswith("Pillow-SIMD "), proc.stdout
    assert pillow_build().startswith("Pillow "), "this process decodes with Pillow itself"
    simd = np.load(tmp_path / "simd.npy")
    pillow = np.stack([decode_fast(j, (224, 224)).array for j in jpegs])
    diff = np.abs(simd.astype(np.int16) - pillow).reshape(len(jpegs), -1).mean(axis=1)
    assert diff.mean() < 0.1 and diff.max() < 0.3, f"mean {diff.mean():.3f}, worst image {diff.max():.3f} levels"
    assert (diff > 0).any(), "two builds of the resampler: some pixels round differently"

    from workers.models.efficientnet_lite import EfficientNetLite0, preprocess_input

    model = EfficientNetLite0(weights="imagenet")
    photos = len(jpegs) - 16
    a = fidelity.top1(model, preprocess_input, list(pillow[:photos]))
    b = fidelity.top1(model, preprocess_input, list(simd[:photos]))
    assert (a == b).mean() >= 0.98, f"top-1 agreement {(a == b).mean():.3f} on {photos} photos"
