"""Incremental nightly runs: `--skip-unchanged PREVIOUS_OUTPUT` processes only new and changed images."""

from __future__ import annotations

import os

import pandas as pd
from PIL import Image

from tests import probe_model
from tests.conftest import batchinfer

COMMON = ("--model", "MobileNetV2", "--weights", "none", "--input-size", "32", "--shard-size", "3", "-q")
COLUMNS = ["uri", "error", "width", "height", "size_bytes", "modified", "etag", "label", "score", "top_k_indices",
           "top_k_labels", "top_k_scores"]


def _rows(path) -> dict[str, dict]:
    frame = pd.read_parquet(path)
    assert frame["uri"].is_unique
    return {row["uri"]: row for row in frame[COLUMNS].to_dict("records")}


def test_a_nightly_rerun_processes_only_what_changed(tmp_path):
    images = probe_model.make_images(tmp_path / "photos", 8)
    night1 = tmp_path / "night1.parquet"
    batchinfer("run", str(tmp_path / "photos"), "--output", str(night1), *COMMON)
    before = _rows(night1)
    assert all(r["size_bytes"] == os.path.getsize(u) for u, r in before.items())

    added = probe_model.make_images(tmp_path / "new", 1)[0].rename(tmp_path / "photos" / "img9000.png")
    touched, changed, deleted = images[1], images[2], images[3]
    os.utime(touched, (os.path.getatime(touched), os.path.getmtime(touched) + 60))  # same bytes, new mtime
    Image.new("RGB", (50, 30), (200, 10, 10)).save(changed)
    deleted.unlink()

    night2 = tmp_path / "night2.parquet"
    run = batchinfer("run", str(tmp_path / "photos"), "--output", str(night2), "--skip-unchanged", str(night1),
                     *COMMON)
    assert f"processed 3 images, reused 5 rows from {night1}" in run.stderr
    after = _rows(night2)
    assert sorted(after) == sorted(str(p) for p in (tmp_path / "photos").iterdir()), "deleted images are gone"
    unchanged = [str(p) for p in images if p not in (touched, changed, deleted)]
    for uri in unchanged:
        assert str(after[uri]) == str(before[uri]), f"{uri}: the reused row is the previous one"
    assert after[str(changed)]["width"] == 50 and after[str(changed)]["size_bytes"] == os.path.getsize(changed)
    assert after[str(touched)]["modified"] > before[str(touched)]["modified"]
    assert str(added) in after and str(deleted) not in after

    night3 = tmp_path / "night3.parquet"
    again = batchinfer("run", str(tmp_path / "photos"), "--output", str(night3), "--skip-unchanged", str(night2),
                       *COMMON)
    assert "processed 0 images, reused 8 rows" in again.stderr, "nothing changed: nothing processed"
    assert _rows(night3).keys() == after.keys()


def test_a_previous_output_of_other_options_is_refused(tmp_path):
    probe_model.make_images(tmp_path / "photos", 2)
    night1 = tmp_path / "night1.parquet"
    batchinfer("run", str(tmp_path / "photos"), "--output", str(night1), *COMMON)
    other = batchinfer("run", str(tmp_path / "photos"), "--output", str(tmp_path / "x.parquet"), "--skip-unchanged",
                       str(night1), *COMMON, "--top-k", "3", check=False)
    assert other.returncode == 2 and other.stderr.count("\n") == 1 and "Traceback" not in other.stderr
    assert "top_k=5 there, 3 here" in other.stderr
    missing = batchinfer("run", str(tmp_path / "photos"), "--output", str(tmp_path / "y.parquet"),
                         "--skip-unchanged", str(tmp_path / "nothing-here"), *COMMON, check=False)
    assert missing.returncode == 2 and "no Parquet output there" in missing.stderr
