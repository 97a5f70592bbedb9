"""Duplicate URIs across sources are processed once, in bounded memory; the count is reported."""

from __future__ import annotations

import os
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from producer.dedupe import SeenDigests, dedupe_key
from producer.shards import ShardStream
from producer.sources import Filters
from tests.test_sources import touch


def _stream(sources, size=2, keep=()) -> tuple[ShardStream, list]:
    stream = ShardStream([str(s) for s in sources], Filters(), size, keep)
    return stream, list(stream)


def test_seen_digests_is_a_set_of_first_occurrences():
    rng = random.Random(7)
    seen, reference = SeenDigests(), set()
    for _ in range(300):  # enough batches for many merges of the sorted runs
        batch = np.array([rng.randrange(5000) for _ in range(rng.randrange(1, 60))], dtype=np.uint64)
        fresh = seen.add_new(batch)
        want = []
        for value in batch.tolist():
            want.append(value not in reference)
            reference.add(value)
        assert fresh.tolist() == want
    assert len(seen) == len(reference)
    assert len(seen.runs) <= int(np.log2(len(reference))) + 1, "a few sorted runs, not one per batch"
    assert all(np.all(np.diff(run.astype(np.int64)) > 0) for run in seen.runs if len(run) > 1)


def test_a_file_in_a_folder_and_two_manifests_is_one_entry(tmp_path):
    images = touch(tmp_path, "photos/a.jpg", "photos/b.jpg", "photos/sub/c.jpg")
    (tmp_path / "one.txt").write_text("photos/b.jpg\nelsewhere/d.jpg\nphotos/sub/../a.jpg\n", encoding="utf-8")
    (tmp_path / "two.csv").write_text(f"uri\nfile://{images[2]}\n{tmp_path}/elsewhere/d.jpg\nnew.jpg\n",
                                      encoding="utf-8")
    stream, listed = _stream([tmp_path / "photos", tmp_path / "one.txt", tmp_path / "two.csv"])
    uris = [u for _, shard in listed for u in shard.uris]
    assert uris == [*images, str(tmp_path / "elsewhere/d.jpg"), str(tmp_path / "new.jpg")]
    assert stream.duplicates == 4, "b and a (written another way) in one.txt, c (file://) and d in two.csv"
    assert [i for i, _ in listed] == [0, 1, 2], "shards are filled after the duplicates are gone"


def test_with_kept_columns_the_first_occurrence_wins(tmp_path):
    pq.write_table(pa.table({"uri": ["a.jpg", "b.jpg"], "id": [1, 2]}), tmp_path / "first.parquet")
    pq.write_table(pa.table({"uri": ["b.jpg", "c.jpg"], "id": [20, 30]}), tmp_path / "second.parquet")
    stream, listed = _stream([tmp_path / "first.parquet", tmp_path / "second.parquet"], size=10,
                             keep=[("id", "int64")])
    (_, shard), = listed
    assert shard.uris == [str(tmp_path / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert shard.columns == {"id": [1, 2, 30]} and stream.duplicates == 1


def test_one_source_is_taken_as_listed(tmp_path):
    """One folder cannot repeat a file; one manifest is not checked (nothing is remembered)."""
    (tmp_path / "m.txt").write_text("/x/a.jpg\n/x/a.jpg\n", encoding="utf-8")
    stream, listed = _stream([tmp_path / "m.txt"])
    assert listed[0][1].uris == ["/x/a.jpg", "/x/a.jpg"] and stream.dedupe is None and stream.duplicates == 0


def test_dedupe_keys():
    assert dedupe_key("/data/x/../a.jpg") == "/data/a.jpg" == dedupe_key("file:///data/./a.jpg")
    assert dedupe_key("s3://bucket/a/../a.jpg") == "s3://bucket/a/../a.jpg", "object keys are compared as written"
    assert dedupe_key("rel.jpg") == os.path.join(os.getcwd(), "rel.jpg")
