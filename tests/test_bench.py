"""``scripts/bench.py`` as a user runs it, tiny: every row has every field, the GPU row says why it was skipped
on a machine without CUDA, and the Markdown table has a line per row."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT, _env
from workers.decode import pillow_build


def test_bench_smoke_rows_have_every_field():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench import FIELDS, STAGES
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    result = subprocess.run(
        [sys.executable, "scripts/bench.py", "--images", "8", "--batch-size", "4", "--image-size", "160x120",
         "--backend", "tensorflow", "--decode", "fast,gpu", "--markdown"],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.splitlines()
    rows = [json.loads(line) for line in lines if line.startswith("{")]
    assert [(r["backend"], r["decode"]) for r in rows] == [("tensorflow", "fast"), ("tensorflow", "gpu")]
    for row in rows:
        assert set(row) == set(FIELDS), set(row) ^ set(FIELDS)
        assert row["model"] == "MobileNetV2" and row["batch_size"] == 4 and row["images"] == 8
        assert row["image_size"] == "160x120" and row["precision"] == "float32"
        assert row["model_images_per_s"] > 0
    fast, gpu = rows
    assert fast["status"] == "ok", fast
    assert fast["end_to_end_images_per_s"] > 0 and 0 < fast["ratio"]
    assert set(fast["stage_seconds"]) == set(STAGES) and fast["stage_seconds"]["total"] > 0
    if not gpu["status"].startswith("ok"):
        assert gpu["status"] in ("skipped: no CUDA", "skipped: no torch/torchvision"), gpu["status"]
        assert gpu["end_to_end_images_per_s"] is None
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + len(rows) and "model alone" in table[0]


def test_decode_costs_times_every_installed_step(tmp_path):
    """``scripts/decode_costs.py``: a row per choice of each step, Pillow's always timed, a library that is
    missing named as such. (No comparison of the times: on a shared machine a tiny run's CPU seconds can
    come out in any order; the speeds are the script's to report, not a test's.)"""
    result = subprocess.run(
        [sys.executable, "scripts/decode_costs.py", "--images", "4", "--rounds", "3", "--size", "640x480",
         "--folder", str(tmp_path / "jpegs")],
        cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = {(r["step"], r["choice"]): r for r in map(json.loads, result.stdout.splitlines())}
    assert {step for step, _ in rows} == {"decode", "resize", "whole"}
    for row in rows.values():
        assert (row["ms"] is not None and row["ms"] > 0) or row["status"] == "not installed", row
    for pillow in [("decode", "Pillow (shipped)"), ("resize", "Pillow bilinear, antialiased (shipped)"),
                   ("whole", "decode_fast (shipped)")]:
        assert "status" not in rows[pillow], rows[pillow]
    assert {r["pillow"] for r in rows.values()} == {pillow_build()}, "the rows say which Pillow build ran"
    assert len(list((tmp_path / "jpegs").glob("*.jpg"))) == 4


def test_decode_costs_bad_size_is_one_line():
    result = subprocess.run([sys.executable, "scripts/decode_costs.py", "--size", "big"],
                            cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--size big: expected WIDTHxHEIGHT" in result.stderr
    assert "Traceback" not in result.stderr
