"""The output folder is already a dataset: read it with pyarrow or pandas, during and after the job."""

from __future__ import annotations

import json
import threading

import pandas as pd
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tests import probe_model
from tests.conftest import batchinfer, start_probe_worker, submit_probe


def test_the_output_folder_is_a_dataset_with_a_completion_marker_written_last(redis_url, redis_client, probe,
                                                                              tmp_path):
    images = probe_model.make_images(tmp_path / "in", 24)
    out = tmp_path / "out"
    w = start_probe_worker(redis_url, tmp_path, "writer", PROBE_SLEEP="0.3")
    seen: list[tuple[int, bool]] = []
    errors: list[Exception] = []
    stop = threading.Event()

    def reader() -> None:
        """A user reading the folder while the job runs: never a partial shard, never an error."""
        while not stop.is_set():
            success = (out / "_SUCCESS").exists()
            try:
                rows = ds.dataset(out, format="parquet").to_table().num_rows if out.exists() else 0
            except Exception as exc:  # noqa: BLE001 - any failure of a reader is the finding
                errors.append(exc)
                return
            seen.append((rows, success))
            stop.wait(0.05)

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        job_id = submit_probe(tmp_path / "in", probe, redis_url)
        batchinfer("collect", job_id, "--output", str(tmp_path / "all.parquet"), "--wait", "--timeout", "300",
                   broker=redis_url)
        stop.wait(0.5)
    finally:
        stop.set()
        thread.join()
        w.stop()
    assert not errors, errors
    assert all(rows % 4 == 0 for rows, _ in seen), "readers only ever see whole shards"
    assert len({rows for rows, _ in seen}) > 2, "the reader watched the job progress"
    assert all(rows == 24 for rows, success in seen if success), "_SUCCESS appears only after every shard"

    collected = pd.read_parquet(tmp_path / "all.parquet").sort_values("uri").reset_index(drop=True)
    as_dataset = ds.dataset(out, format="parquet").to_table().to_pandas().sort_values("uri").reset_index(drop=True)
    with_pandas = pd.read_parquet(out).sort_values("uri").reset_index(drop=True)
    pd.testing.assert_frame_equal(as_dataset, collected)
    pd.testing.assert_frame_equal(with_pandas, collected)
    assert sorted(collected["uri"]) == sorted(str(p) for p in images)

    manifest = json.loads((out / "_manifest.json").read_text())
    assert manifest["job_id"] == job_id and manifest["rows"] == 24 and manifest["failed_shards"] == []
    assert [s["file"] for s in manifest["shards"]] == [f"shard-{i:06d}.parquet" for i in range(6)]
    assert {"uri", "label", "top_k_scores"} <= {f["name"] for f in manifest["schema"]}
    assert manifest["metadata"]["model"].startswith("custom:")
    assert (out / "_SUCCESS").stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in out.glob("shard-*"))
    one = pq.ParquetFile(out / "shard-000000.parquet")
    assert one.metadata.num_row_groups == 1, "one row group per shard, not one per model batch"
    schemas = {pq.read_schema(p).metadata[b"batchinfer"] for p in out.glob("shard-*.parquet")}
    assert len(schemas) == 1, "every file carries the same schema and metadata"
