"""Search indexes: a features job becomes a searchable index with one command, and every photo finds itself.

The end-to-end tests run the command line as a user does, on real photos (the repository's and the samples
in the scikit-image and scikit-learn wheels, as ``scripts/fidelity.py`` gathers them) with a features job
made by ``batchinfer run --task features`` and calibrated random weights saved to a file
(``tests/weights.py``). ``index`` and search by an indexed URI run with stub ``tensorflow``/``keras``
packages that fail when imported: neither needs a model. The unit tests check the index against numpy.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import PHOTOS, ROOT, assert_one_line_error, script
from workers.errors import ConfigError
from workers.schema import output_schema, read_job_metadata, with_job_metadata
from workers.search import plan
from workers.search.build import recall_at
from workers.search.index import SearchIndex

GiB, MiB = 1 << 30, 1 << 20


def batchinfer(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """This checkout's command line, with TensorFlow available (search embeds images)."""
    proc = subprocess.run([sys.executable, "-m", "producer.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"batchinfer {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


# --- the plan: which kind fits which budget -----------------------------------------------------------------


def test_the_most_exact_kind_that_fits_the_budget_is_chosen():
    million = plan.choose(1_000_000, 1280, 8 * GiB)
    assert million.kind == "flat" and million.index_bytes == 1_000_000 * 1280 * 4
    sq8 = plan.choose(1_000_000, 1280, 2 * GiB)
    assert (sq8.kind, sq8.nlist, sq8.code_size) == ("ivf-sq8", 1024, 1280) and sq8.needs <= 2 * GiB
    pq = plan.choose(1_000_000, 1280, 1 * GiB)
    assert pq.kind == "ivf-pq" and pq.m == 320 and pq.factory == "IVF1024,PQ320x8np"
    assert plan.choose(20, 1280).kind == "flat", "small collections: exact search within the default budget"
    assert plan.choose(1_000_000, 1280).kind == "ivf-sq8", "the default budget is 2 GiB"
    with pytest.raises(ConfigError, match=r"1000000 vectors of dimension 1280 need at least .* --max-memory is 512"):
        plan.choose(1_000_000, 1280, 512 * MiB)
    with pytest.raises(ConfigError, match="at least 1024 vectors"):
        plan.choose(500, 64, kind="ivf-sq8")  # too few to train lists: exact only


def test_the_model_spec_comes_from_the_job_metadata():
    from workers.contract import ModelSpec
    from workers.search.folder import spec_from_metadata

    recorded = ModelSpec(name="ResNet50", weights="/w/r.h5", task="features", layers=("conv4_block6_out",))
    assert spec_from_metadata({"model_spec": dataclasses.asdict(recorded), "model": "other"}) == recorded
    older = {"model": "MobileNetV2", "model_path": None, "weights": "none", "task": "classify,features",
             "layers": ["block_13_expand", "out_relu"], "pooling": "max", "input_size": [160, 128],
             "decode": "keras", "precision": "float16", "preprocess": "tf", "top_k": 3}
    assert spec_from_metadata(older) == ModelSpec(
        name="MobileNetV2", weights="none", task="classify,features", top_k=3, pooling="max",
        layers=("block_13_expand", "out_relu"), input_shape=(160, 128), decode="keras", precision="float16")
    own = spec_from_metadata({"model": "custom:m.keras", "model_path": "/m.keras", "task": "features",
                              "preprocess": "torch", "input_size": [64, 64]})
    assert (own.model_path, own.preprocess, own.input_shape) == ("/m.keras", "torch", (64, 64))


# --- the index against numpy ----------------------------------------------------------------------------------


def _clustered(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.uniform(0, 1, (8, dim))
    return np.abs(centres[rng.integers(0, 8, n)] + rng.normal(0, 0.3, (n, dim))).astype(np.float32)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_flat_scores_equal_numpy_brute_force(metric):
    x = _clustered(500, 24)
    q = _clustered(7, 24, seed=1)
    index = SearchIndex.build([x[:200], x[200:]], metric=metric, uris=[f"img{i}.jpg" for i in range(500)])
    assert (index.kind, index.count, index.dim, index.metric) == ("flat", 500, 24, metric)
    hits = index.search(q, k=5)
    if metric == "cosine":
        unit = x / np.linalg.norm(x, axis=1, keepdims=True)
        scores = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ unit.T
        order = np.argsort(-scores, axis=1)[:, :5]
    else:
        scores = np.linalg.norm(q[:, None, :] - x[None, :, :], axis=2)
        order = np.argsort(scores, axis=1)[:, :5]
    for row, want in zip(range(len(q)), order):
        assert [h.id for h in hits[row]] == want.tolist()
        assert [h.uri for h in hits[row]] == [f"img{i}.jpg" for i in want]
        np.testing.assert_allclose([h.score for h in hits[row]], scores[row, want], rtol=1e-4, atol=1e-5)
    assert index.search(q[:1], k=1000)[0][-1].id >= 0 and len(index.search(q[:1], k=1000)[0]) == 500


def test_save_load_round_trip_keeps_uris_kept_columns_model_and_vectors(tmp_path):
    x = _clustered(300, 16)
    extra = pa.table({"photo_id": pa.array(range(300), pa.int64()), "album": [f"a{i % 3}" for i in range(300)]})
    spec = {"name": "MobileNetV2", "weights": "none", "task": "features", "input_shape": [96, 96]}
    index = SearchIndex.build([x], uris=[f"s3://b/{i}.jpg" for i in range(300)], extra=extra,
                              info={"column": "features_block_13", "model_spec": spec, "weights_fingerprint": "w1"})
    index.save(str(tmp_path / "idx"))
    assert sorted(os.listdir(tmp_path)) == ["idx"], "no temporary folder left beside it"
    loaded = SearchIndex.load(str(tmp_path / "idx"))
    assert (loaded.column, loaded.fingerprint, loaded.count) == ("features_block_13", "w1", 300)
    assert loaded.spec is not None and loaded.spec.input_shape == (96, 96) and loaded.spec.weights == "none"
    assert loaded.extra_columns == ["photo_id", "album"]
    top = loaded.search(x[42], k=3)[0][0]
    assert (top.uri, top.id, top.extra) == ("s3://b/42.jpg", 42, {"photo_id": 42, "album": "a0"})
    assert top.score == pytest.approx(1.0, abs=1e-5)
    stored = loaded.vector("s3://b/42.jpg")
    np.testing.assert_allclose(stored, x[42] / np.linalg.norm(x[42]), rtol=1e-6)
    assert loaded.vector("s3://b/missing.jpg") is None and loaded.id_of("s3://b/7.jpg") == 7


def test_compressed_index_within_a_small_budget_reaches_the_recall(tmp_path):
    """The approximate path on 30,000 pooled-CNN-like vectors (see scripts/bench_index.py), with a budget that
    holds IVF-SQ8 but not the exact index."""
    bench = script("bench_index")
    data = bench.Synthetic(30_000, dim=512, chunk=5_000)
    kinds = {p.kind: p for p in plan.candidates(30_000, 512)}
    sq8 = kinds["ivf-sq8"]
    assert sq8.needs < kinds["flat"].needs
    index = SearchIndex.build(data, max_memory=sq8.needs, uris=[f"v{i}" for i in range(30_000)])
    params = index.info["params"]
    assert index.kind == "ivf-sq8" and params["nlist"] == 128 and 1 <= params["nprobe"] < 128
    assert params["recall_at_10"] >= 0.95, params
    queries = data.queries(200)
    found = np.array([[h.id for h in row] for row in index.search(queries, 10)])
    recall = recall_at(found, bench.exact(data, queries, 10, "cosine"), None, 10)
    assert recall >= 0.94, f"recall@10 on new vectors {recall:.3f}"
    some = index.vector("v123")  # reconstructed from its code (the direct map): its own nearest neighbour
    assert some is not None and index.search(some, 1)[0][0].uri == "v123"
    index.save(str(tmp_path / "idx"))
    again = SearchIndex.load(str(tmp_path / "idx"))
    assert [h.id for h in again.search(queries[:5], 10)[2]] == found[2].tolist()


# --- the command line on real photos ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """A features job over 19 real photos and one broken file, through a CSV manifest that keeps a column."""

    from tests.weights import make_weights

    root = tmp_path_factory.mktemp("search")
    photos = root / "photos"
    photos.mkdir()
    for path in sorted(PHOTOS.iterdir()):
        shutil.copy(path, photos / path.name)
    for i, image in enumerate(script("fidelity").source_photos()[len(list(PHOTOS.iterdir())):]):
        image.save(photos / f"sample{i:02d}.jpg", quality=92)
    (photos / "broken.jpg").write_text("not a picture")
    names = sorted(p.name for p in photos.iterdir())
    manifest = root / "photos.csv"
    pd.DataFrame({"uri": [str(photos / n) for n in names], "photo_id": range(100, 100 + len(names))}).to_csv(
        manifest, index=False)
    _, weights = make_weights("MobileNetV2", root, sorted(PHOTOS.iterdir()), full=False)
    features = root / "features.parquet"
    batchinfer("run", str(manifest), "--model", "MobileNetV2", "--weights", str(weights), "--task", "features",
               "--keep-columns", "photo_id", "--output", str(features), "-q")
    return {"root": root, "photos": photos, "features": features, "names": names}


def test_index_then_search_every_photo_finds_itself(job, cli, tmp_path):
    index = tmp_path / "photos.index"
    built = cli("index", str(job["features"]), "--output", str(index), "-q")
    assert built.returncode == 0, built.stderr
    assert "indexed 19 vectors of features (dimension 1280, cosine)" in built.stderr
    assert "skipped 1 error rows; flat index (exact search)" in built.stderr
    photos = [str(job["photos"] / n) for n in job["names"] if n != "broken.jpg"]

    # by indexed URI: the stored vectors, no model (tensorflow cannot be imported here)
    out = tmp_path / "by-uri.parquet"
    found = cli("search", str(index), *photos, "--k", "3", "--output", str(out))
    assert found.returncode == 0, found.stderr
    assert "19 queries (19 by their indexed vector, 0 embedded)" in found.stderr
    rows = pd.read_parquet(out)
    assert list(rows.columns) == ["query", "rank", "uri", "score", "photo_id"] and len(rows) == 19 * 3
    first = rows[rows["rank"] == 1].set_index("query")
    assert (first["uri"] == first.index).all(), "every photo is its own nearest neighbour"
    assert np.allclose(first["score"], 1.0, atol=1e-5)
    ids = {p: str(100 + job["names"].index(os.path.basename(p))) for p in photos}  # a CSV manifest's text
    assert first["photo_id"].to_dict() == ids, "the kept column comes with each neighbour"
    assert read_job_metadata(pq.read_schema(out))["metric"] == "cosine"

    # by file: copies elsewhere are embedded with the index's model and find their originals
    copies = tmp_path / "copies"
    copies.mkdir()
    for p in photos:
        shutil.copy(p, copies / ("copy-" + os.path.basename(p)))
    queries = sorted(str(p) for p in copies.iterdir())
    shown = batchinfer("search", str(index), *queries, "--k", "2")
    assert "19 queries (0 by their indexed vector, 19 embedded)" in shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split() == ["query", "rank", "similarity", "uri"] and len(lines) == 1 + 19 * 2
    for line in lines[1::2]:
        query, rank, score, uri = line.split()
        assert rank == "1" and os.path.basename(query) == "copy-" + os.path.basename(uri), line
        assert float(score) > 0.999, line


def test_the_model_that_made_the_index_embeds_the_queries(job, cli, tmp_path):
    index = tmp_path / "idx"
    assert cli("index", str(job["features"]), "-o", str(index), "-q").returncode == 0
    info = json.loads((index / "index.json").read_text())
    assert info["model_spec"]["weights"].endswith("MobileNetV2_notop.weights.h5")
    assert info["weights_fingerprint"].startswith("sha256:") and info["skipped_errors"] == 1
    info["weights_fingerprint"] = "sha256:" + "0" * 64  # as if the weights file had changed since
    (index / "index.json").write_text(json.dumps(info))
    refused = batchinfer("search", str(index), str(PHOTOS / "cat.jpg"), "--embed", check=False)
    assert_one_line_error(refused, "not those that made the index")
    missing = cli("search", str(index), str(tmp_path / "nope.jpg"))
    assert_one_line_error(missing, "nope.jpg", "no such file")


def test_features_on_s3_indexed_by_prefix_and_searched_there(job, cli, s3):
    table = pq.read_table(job["features"])
    client = s3.client()
    client.create_bucket(Bucket="feats")
    for i, part in enumerate((table.slice(0, 8), table.slice(8))):  # shard files, as a features job writes them
        sink = pa.BufferOutputStream()
        pq.write_table(part, sink)
        client.put_object(Bucket="feats", Key=f"job/shard-{i:06d}.parquet", Body=sink.getvalue().to_pybytes())
    built = cli("index", "s3://feats/job/", "--output", "s3://feats/index", "-q")
    assert built.returncode == 0, built.stderr
    assert "indexed 19 vectors" in built.stderr and "from 2 file(s)" in built.stderr
    assert client.head_object(Bucket="feats", Key="index/index.json")
    cat = str(job["photos"] / "cat.jpg")
    shown = cli("search", "s3://feats/index", cat, "--k", "1")
    assert shown.stdout.splitlines()[1].split()[-1] == cat


def _features_file(path: Path, columns: dict[str, np.ndarray], errors: dict[int, str] | None = None,
                   **meta: object) -> None:
    """A features output as ``batchinfer run --task features [--layer A --layer B]`` writes one: error rows
    have an ``error`` and no vectors."""
    n = len(next(iter(columns.values())))
    errors = errors or {}
    dims = {name: v.shape[1] for name, v in columns.items()}
    schema = with_job_metadata(output_schema("features", feature_columns=dims),
                               {"task": "features", "model": "MobileNetV2", "weights": "none", **meta})
    failed = pa.array([i in errors for i in range(n)])
    arrays = {"uri": pa.array([f"/p/{i}.jpg" for i in range(n)]), "error": pa.array([errors.get(i) for i in range(n)])}
    arrays.update({name: pa.FixedSizeListArray.from_arrays(pa.array(v.reshape(-1)), v.shape[1], mask=failed)
                   for name, v in columns.items()})
    pq.write_table(pa.Table.from_arrays([arrays.get(f.name, pa.nulls(n, f.type)) for f in schema], schema=schema), path)


def test_a_compressed_index_by_the_command_line(cli, tmp_path):
    vectors = script("bench_index").Synthetic(5000, dim=64).rows(0, 5000)
    _features_file(tmp_path / "big.parquet", {"features": vectors}, errors={7: "truncated file"})
    built = cli("index", str(tmp_path / "big.parquet"), "-o", str(tmp_path / "idx"), "--kind", "ivf-sq8", "-q")
    assert built.returncode == 0, built.stderr
    assert "indexed 4999 vectors" in built.stderr and "skipped 1 error rows; ivf-sq8 index (64 lists" in built.stderr
    shown = cli("search", str(tmp_path / "idx"), "/p/42.jpg", "/p/4000.jpg", "--k", "1")
    assert [line.split()[-1] for line in shown.stdout.splitlines()[1:]] == ["/p/42.jpg", "/p/4000.jpg"]
    skipped = cli("search", str(tmp_path / "idx"), "/p/7.jpg")  # not indexed: read to be embedded, and missing
    assert_one_line_error(skipped, "/p/7.jpg", "no such file")


def test_a_multi_layer_job_names_its_column(cli, tmp_path):
    features = tmp_path / "layers.parquet"
    _features_file(features, {"features_block_6_expand": _clustered(40, 8), "features_out_relu": _clustered(40, 12)})
    line = assert_one_line_error(cli("index", str(features), "-o", str(tmp_path / "i")), "--column")
    assert "features_block_6_expand, features_out_relu" in line
    assert_one_line_error(cli("index", str(features), "-o", str(tmp_path / "i"), "--column", "fc9"),
                          "--column fc9", "features_block_6_expand, features_out_relu")
    built = cli("index", str(features), "-o", str(tmp_path / "i"), "--column", "out_relu", "-q")
    assert built.returncode == 0 and "of features_out_relu (dimension 12" in built.stderr
    assert sorted(os.listdir(tmp_path)) == ["i", "layers.parquet"], "no temporary folder left beside it"


def test_a_failed_build_leaves_the_previous_index_whole(job, cli, tmp_path):
    index = tmp_path / "idx"
    assert cli("index", str(job["features"]), "-o", str(index), "-q").returncode == 0
    before = {p.name: p.read_bytes() for p in index.iterdir()}
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(job["features"], mixed / "shard-000000.parquet")
    table = pq.read_table(job["features"])
    other = {**read_job_metadata(table.schema), "weights_fingerprint": "sha256:another"}
    pq.write_table(table.replace_schema_metadata(with_job_metadata(table.schema, other).metadata),
                   mixed / "shard-000001.parquet")
    failed = cli("index", str(mixed), "-o", str(index), "-q")
    assert_one_line_error(failed, "shard-000001.parquet", "other model options (weights_fingerprint)")
    assert {p.name: p.read_bytes() for p in index.iterdir()} == before
    assert sorted(os.listdir(tmp_path)) == ["idx", "mixed"], "the half-built folder is gone"


def test_mistakes_are_one_line(job, cli, tmp_path, no_tf_path):
    classify = tmp_path / "labels.parquet"
    pq.write_table(pa.table({"uri": ["a.jpg"], "label": ["cat"]}), classify)
    assert_one_line_error(cli("index", str(classify), "-o", str(tmp_path / "i")), "not the output of a features job")
    assert_one_line_error(cli("index", str(tmp_path / "none"), "-o", str(tmp_path / "i")), "no Parquet output there")
    assert_one_line_error(cli("index", str(job["features"]), "-o", str(tmp_path / "i"), "--max-memory", "lots"),
                          "--max-memory", "512M")
    assert_one_line_error(cli("index", str(job["features"]), "-o", str(tmp_path / "i"), "--max-memory", "1M"),
                          "need at least", "--max-memory is 1.0 MiB")
    assert_one_line_error(cli("index", str(job["features"]), "-o", str(job["features"])), "is a file")
    assert_one_line_error(cli("index", str(job["features"]), "-o", str(job["photos"])), "something else than an index")
    assert_one_line_error(cli("search", str(tmp_path / "nowhere"), "x.jpg"), "not a search index")
    assert_one_line_error(cli("search", str(tmp_path), "x.jpg", "--k", "0"), "--k")
    stubs = tmp_path / "no-faiss"
    (stubs / "faiss").mkdir(parents=True)
    (stubs / "faiss" / "__init__.py").write_text("raise ImportError('No module named faiss')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(stubs), no_tf_path, os.environ.get("PYTHONPATH", "")])}
    assert cli("index", "--help", env=env).returncode == 0 and cli("search", "--help", env=env).returncode == 0
    assert_one_line_error(cli("index", str(job["features"]), "-o", str(tmp_path / "i"), env=env),
                          "pip install faiss-cpu")
    assert not (tmp_path / "i").exists()
