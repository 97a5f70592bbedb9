"""`--keep-columns`: manifest columns copied into every output row (join keys), through `run`, a real worker
and `collect`; bad columns are one line before any work."""

from __future__ import annotations

import csv
import gzip
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from producer.keep import kept_columns, parse_names
from tests import probe_model
from tests.conftest import batchinfer, collect, submit
from workers.contract import ModelSpec
from workers.errors import ConfigError

COMMON = ("--model", "MobileNetV2", "--weights", "none", "--input-size", "32", "-q")


def _images(folder: Path, n: int = 5) -> list[str]:
    return [str(p) for p in probe_model.make_images(folder, n)]


def _check(rows: list[dict], manifest: dict[str, dict], text: bool = False) -> None:
    """Every row has the kept values of its URI's manifest row (as text when read from CSV: null is empty)."""
    assert sorted(r["uri"] for r in rows) == sorted(manifest), "one row per URI"
    for row in rows:
        for name, want in manifest[row["uri"]].items():
            got = row[name]
            if text:
                want = "" if want is None else str(want)
            assert got == want or (want is None and pd.isna(got)), (row["uri"], name, got, want)


def _parquet_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def _manifest_parquet(path: Path, rows: dict[str, dict], types: dict[str, pa.DataType]) -> None:
    columns = {"uri": list(rows)} | {name: pa.array([r[name] for r in rows.values()], t) for name, t in types.items()}
    pq.write_table(pa.table(columns), path)


# --- checked before any work -------------------------------------------------------------------------


def test_parse_names():
    assert parse_names("id, caption") == ("id", "caption")
    for bad in ("id,,caption", " ", "id,id"):
        with pytest.raises(ConfigError, match="--keep-columns"):
            parse_names(bad)


def test_kept_column_types_are_one_per_job(tmp_path):
    for name, types in {"a": {"id": pa.int32(), "weight": pa.float32(), "ok": pa.bool_(), "tag": pa.string()},
                        "b": {"id": pa.int64(), "weight": pa.int8(), "ok": pa.bool_(),
                              "tag": pa.dictionary(pa.int8(), pa.string())}}.items():
        _manifest_parquet(tmp_path / f"{name}.parquet", {"x.jpg": {"id": 1, "weight": 2, "ok": True, "tag": "t"}},
                          types)
    (tmp_path / "c.csv").write_text("uri,id\nx.jpg,1\n", encoding="utf-8")
    names = ("id", "weight", "ok", "tag")
    a, b = str(tmp_path / "a.parquet"), str(tmp_path / "b.parquet")
    assert kept_columns([a], names, ModelSpec()) == (
        ("id", "int32"), ("weight", "float"), ("ok", "bool"), ("tag", "string")), "a Parquet manifest's own types"
    assert kept_columns([a, b], names, ModelSpec()) == (
        ("id", "int64"), ("weight", "double"), ("ok", "bool"), ("tag", "string")), "widened where they differ"
    assert kept_columns([a, str(tmp_path / "c.csv")], ["id"], ModelSpec()) == (("id", "string"),), "CSV is text"


def test_bad_kept_columns_name_the_column_and_the_source(tmp_path):
    (tmp_path / "m.csv").write_text("uri,id,label\nx.jpg,1,cat\n", encoding="utf-8")
    (tmp_path / "m.txt").write_text("x.jpg\n", encoding="utf-8")
    pq.write_table(pa.table({"uri": ["x.jpg"], "when": pa.array([0], pa.timestamp("s"))}), tmp_path / "t.parquet")
    manifest = str(tmp_path / "m.csv")
    cases = {
        ((manifest,), "caption"): f"--keep-columns caption: {manifest} has no column 'caption' (its columns: uri, "
                                  "id, label)",
        ((manifest,), "label"): "--keep-columns label: the output already has a column 'label'",
        ((manifest,), "uri"): "the output already has a column 'uri'",
        ((manifest, str(tmp_path)), "id"): f"needs CSV or Parquet manifests with those columns: {tmp_path} is a "
                                           "folder",
        ((manifest, str(tmp_path / "m.txt")), "id"): "m.txt is a .txt manifest",
        ((str(tmp_path / "t.parquet"),), "when"): "has it as timestamp[ms]; kept columns can be strings, integers",
    }
    for (sources, name), message in cases.items():
        with pytest.raises(ConfigError) as info:
            kept_columns(sources, [name], ModelSpec())
        assert message in str(info.value)
    features = ModelSpec(task="features")
    assert kept_columns([manifest], ["label"], features) == (("label", "string"),), "no label column in features"


def test_the_command_line_refuses_bad_columns_in_one_line(tmp_path):
    _images(tmp_path / "photos", 1)
    (tmp_path / "m.csv").write_text("uri,id\nphotos/img0000.png,1\n", encoding="utf-8")
    nobody = "redis://127.0.0.1:1/0"  # nothing is contacted before the columns are checked
    manifest = str(tmp_path / "m.csv")
    cases = {
        ("run", str(tmp_path / "photos"), "--keep-columns", "id", "--output", str(tmp_path / "o.parquet")):
            f"{tmp_path / 'photos'} is a folder",
        ("run", manifest, "--keep-columns", "id,caption", "--output", str(tmp_path / "o.parquet")):
            f"{manifest} has no column 'caption' (its columns: uri, id)",
        ("submit", manifest, "--keep-columns", "score", "--output", str(tmp_path / "out")):
            "the output already has a column 'score'",
        ("submit", manifest, "--keep-columns", "id,,x", "--output", str(tmp_path / "out")):
            "give column names separated by commas",
    }
    for args, message in cases.items():
        proc = batchinfer(*args, *COMMON, broker=nobody, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.count("\n") == 1 and message in proc.stderr, proc.stderr
        assert not (tmp_path / "o.parquet").exists() and not (tmp_path / "out").exists()


# --- end to end --------------------------------------------------------------------------------------


def test_run_keeps_csv_columns_as_text_on_every_row_error_rows_included(tmp_path):
    images = _images(tmp_path / "photos", 4)
    gone = str(tmp_path / "photos" / "gone.png")
    manifest = {uri: {"id": f"{i:03d}", "caption": f"photo {i}, with a comma"} for i, uri in enumerate(images)}
    manifest[images[2]]["caption"] = None  # an empty cell
    manifest[gone] = {"id": "404", "caption": "never there"}
    with open(tmp_path / "m.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["caption", "uri", "id", "other"])
        for uri, row in manifest.items():
            writer.writerow([row["caption"] or "", uri, row["id"], "x"])
    out = tmp_path / "out.parquet"
    batchinfer("run", str(tmp_path / "m.csv"), "--keep-columns", "id,caption", "--output", str(out),
               "--shard-size", "2", *COMMON)
    schema = pq.read_schema(out)
    assert schema.names[-2:] == ["id", "caption"] and schema.field("id").type == pa.string(), "last, as text"
    assert "other" not in schema.names
    rows = _parquet_rows(out)
    _check(rows, manifest)
    assert next(r for r in rows if r["uri"] == gone)["error"] == "file not found"
    assert json.loads(schema.metadata[b"batchinfer"])["keep_columns"] == [["id", "string"], ["caption", "string"]]


def test_run_keeps_parquet_types_and_processes_a_duplicate_once(tmp_path):
    images = _images(tmp_path / "photos", 5)
    gone = str(tmp_path / "photos" / "gone.png")
    first = {uri: {"id": 10 + i, "caption": f"first {i}"} for i, uri in enumerate(images[:3])}
    first[gone] = {"id": None, "caption": "missing"}
    second = {uri: {"id": 20 + i, "caption": None if i == 3 else f"second {i}"} for i, uri in enumerate(images)
              if i >= 2}  # images[2] is in both: the first manifest's values win
    types = {"id": pa.int32(), "caption": pa.string()}
    _manifest_parquet(tmp_path / "first.parquet", first, types)
    _manifest_parquet(tmp_path / "second.parquet", second, types)
    out = tmp_path / "out.parquet"
    run = batchinfer("run", str(tmp_path / "first.parquet"), str(tmp_path / "second.parquet"), "--keep-columns",
                     "id,caption", "--output", str(out), "--shard-size", "3", *COMMON)
    assert "skipped 1 duplicate URIs" in run.stderr
    schema = pq.read_schema(out)
    assert (schema.field("id").type, schema.field("caption").type) == (pa.int32(), pa.string()), "their own types"
    rows = _parquet_rows(out)
    _check(rows, {**second, **first})
    assert [r["error"] for r in rows if r["uri"] == gone] == ["file not found"]


def test_an_incremental_run_gives_reused_rows_the_manifests_current_values(tmp_path):
    images = _images(tmp_path / "photos", 4)
    manifest = {uri: {"id": i, "caption": f"v1 {i}"} for i, uri in enumerate(images)}
    types = {"id": pa.int64(), "caption": pa.string()}
    _manifest_parquet(tmp_path / "m.parquet", manifest, types)
    night1 = tmp_path / "night1.parquet"
    batchinfer("run", str(tmp_path / "m.parquet"), "--keep-columns", "id,caption", "--output", str(night1),
               "--shard-size", "2", *COMMON)

    added = _images(tmp_path / "new", 1)[0]
    manifest = {uri: {"caption": f"v2 {i}"} for i, uri in enumerate([*images, added])}
    _manifest_parquet(tmp_path / "m.parquet", manifest, {"caption": pa.string()})
    night2 = tmp_path / "night2.parquet"
    run = batchinfer("run", str(tmp_path / "m.parquet"), "--keep-columns", "caption", "--output", str(night2),
                     "--skip-unchanged", str(night1), "--shard-size", "2", *COMMON)
    assert "processed 1 image, reused 4 rows" in run.stderr
    schema = pq.read_schema(night2)
    assert schema.names == [n for n in pq.read_schema(night1).names if n != "id"], "carried and processed alike"
    _check(_parquet_rows(night2), manifest)


def test_kept_columns_through_a_worker_both_sinks_and_every_collect_format(worker, redis_url, redis_client,
                                                                           tmp_path):
    images = _images(tmp_path / "photos", 5)
    gone = str(tmp_path / "photos" / "gone.png")
    manifest = {uri: {"id": 100 + i, "caption": f"cap {i}" if i != 1 else None, "flag": i % 2 == 0}
                for i, uri in enumerate([*images, gone])}
    _manifest_parquet(tmp_path / "m.parquet", manifest, {"id": pa.int64(), "caption": pa.string(),
                                                         "flag": pa.bool_()})
    keep = ("--keep-columns", "id,caption,flag", "--shard-size", "2", "--batch-size", "2", *COMMON)
    job = submit(str(tmp_path / "m.parquet"), "--output", str(tmp_path / "out"), *keep, broker=redis_url)
    for name in ("all.parquet", "all.csv", "all.jsonl"):
        collect(job, tmp_path / name, broker=redis_url, timeout=300)
    rows = _parquet_rows(tmp_path / "all.parquet")
    _check(rows, manifest)
    assert [r["error"] for r in rows if r["uri"] == gone] == ["file not found"]
    assert pq.read_schema(tmp_path / "all.parquet").field("id").type == pa.int64()
    with open(tmp_path / "all.csv", newline="", encoding="utf-8") as fh:
        _check(list(csv.DictReader(fh)), manifest, text=True)
    _check([json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()], manifest)
    spooled = json.loads(gzip.decompress((tmp_path / "out" / "_batchinfer" / job / "shard-000000.uris.gz")
                                         .read_bytes()))
    assert spooled["columns"]["id"] == [100, 101], "the values travel with the spooled URIs, not in the message"

    job = submit(str(tmp_path / "m.parquet"), "--sink", "redis", *keep, broker=redis_url)
    collect(job, tmp_path / "redis.parquet", broker=redis_url, timeout=300)
    table = pq.read_table(tmp_path / "redis.parquet")
    assert [table.schema.field(n).type for n in ("id", "caption", "flag")] == [pa.int64(), pa.string(), pa.bool_()]
    _check(table.to_pylist(), manifest)
