"""A task message is data anyone who reaches Redis can write: a real worker confined by
``BATCHINFER_ALLOWED_ROOTS`` reads and writes only under its roots, and runs a SavedModel only where
``BATCHINFER_TRUST_MODELS`` says. Forged messages are sent as the producer would send them."""

from __future__ import annotations

import shutil
import uuid
from dataclasses import asdict, replace
from pathlib import Path

import pandas as pd
import pytest

from tests import custom_models
from tests.conftest import PHOTOS, Worker, assert_one_line_error, batchinfer, wait_until
from tests.fakes import FakeCache
from workers.confine import ANYWHERE, NOWHERE, OUTSIDE, Roots, check_carry, check_task, trusted_models
from workers.contract import TASK_NAME, ModelSpec, OutputSpec, ShardList, ShardTask
from workers.errors import ConfigError
from workers.feed import Loaded, shard_loads
from workers.settings import Settings

SAVEDMODEL_WRITES = "wrote.txt"


# --- the matching rules ---------------------------------------------------------------------------------


def test_local_roots_are_resolved_before_they_are_compared(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(b"x")
    (root / "link.jpg").symlink_to(outside / "secret.jpg")
    (root / "linked-folder").symlink_to(outside)
    roots = Roots.parse(f"{root}/", "BATCHINFER_ALLOWED_ROOTS")
    assert roots.contains(str(root)) and roots.contains(f"{root}/sub/a.jpg") and roots.contains(f"file://{root}/a")
    assert roots.contains(f"{root}/sub/../a.jpg") and roots.contains(f"{root}/not-yet/created/")
    assert not roots.contains(f"{root}/../elsewhere/secret.jpg"), "'..' cannot climb out"
    assert not roots.contains(f"{root}/link.jpg"), "a link inside a root pointing outside is outside"
    assert not roots.contains(f"{root}/linked-folder/secret.jpg")
    assert not roots.contains(f"{tmp_path}/data-backup/a.jpg"), "a root matches on a folder boundary"
    assert not roots.contains("relative/a.jpg") and not roots.contains("../a.jpg"), "relative: from the cwd"
    assert not roots.contains("s3://data/a.jpg") and not roots.contains("https://example.com/a.jpg")
    # a root that is itself a link is resolved too, so paths through either name match
    (tmp_path / "alias").symlink_to(root)
    assert Roots.parse(str(tmp_path / "alias"), "X").contains(f"{root}/a.jpg")
    assert Roots.parse("/", "X").contains("/etc/passwd")


def test_s3_and_https_roots_match_on_a_slash_boundary():
    roots = Roots.parse("s3://photos/raw, s3://whole, https://CDN.example.com/img/", "BATCHINFER_ALLOWED_ROOTS")
    assert roots.contains("s3://photos/raw") and roots.contains("s3://photos/raw/2026/a.jpg")
    assert not roots.contains("s3://photos/rawhide/a.jpg") and not roots.contains("s3://photos/a.jpg")
    assert not roots.contains("s3://photos/raw/../private/a.jpg"), "a '..' key segment is outside"
    assert not roots.contains("s3://other/raw/a.jpg") and roots.contains("s3://whole/any/key.jpg")
    assert roots.contains("https://cdn.example.com/img/a.jpg?X-Amz-Signature=1")
    assert roots.contains("https://cdn.example.com:443/img/a.jpg")
    assert not roots.contains("http://cdn.example.com/img/a.jpg"), "the scheme is part of the root"
    assert not roots.contains("https://cdn.example.com/images/a.jpg")
    assert not roots.contains("https://cdn.example.com:8443/img/a.jpg")
    assert not roots.contains("https://cdn.example.com/img/%2e%2e/admin"), "an encoded '..' too"
    assert not roots.contains("https://cdn.example.com@evil.example/img/a.jpg"), "the host, not the user part"
    assert not roots.contains("/img/a.jpg") and not roots.contains("ftp://cdn.example.com/img/a.jpg")


def test_settings_parse_and_refuse_bad_roots():
    settings = Settings.from_env({"BATCHINFER_ALLOWED_ROOTS": "/data,s3://b/p", "BATCHINFER_TRUST_MODELS": "/models"})
    assert settings.allowed_roots.contains("/data/a.jpg") and not settings.allowed_roots.contains("/models/m.keras")
    assert settings.trusted_models.contains("/models/saved") and not settings.trusted_models.contains("/data/x")
    unset = Settings.from_env({})
    assert unset.allowed_roots is ANYWHERE and unset.trusted_models is NOWHERE, "unset: today's behaviour"
    assert trusted_models("1") is ANYWHERE and trusted_models("0") is NOWHERE
    for env, needle in [({"BATCHINFER_ALLOWED_ROOTS": "data"}, "relative folder"),
                        ({"BATCHINFER_ALLOWED_ROOTS": "ftp://host/x"}, "not a local folder"),
                        ({"BATCHINFER_ALLOWED_ROOTS": "s3:///x"}, "no bucket"),
                        ({"BATCHINFER_ALLOWED_ROOTS": "https://u:p@host/x"}, "without user"),
                        ({"BATCHINFER_TRUST_MODELS": "s3://models/"}, "lists local folders")]:
        with pytest.raises(ConfigError, match=needle):
            Settings.from_env(env)


def test_every_place_a_task_names_is_checked(tmp_path):
    roots = Roots.parse(str(tmp_path / "in"), "BATCHINFER_ALLOWED_ROOTS")
    inside = str(tmp_path / "in")
    ok = ShardTask("j", 0, [], ModelSpec(model_path=f"{inside}/m.keras", labels=f"{inside}/labels.txt"),
                   OutputSpec(path=f"{inside}/out"), uris_ref=f"{inside}/out/_batchinfer/j/shard-000000.uris.gz")
    check_task(ok, roots)
    check_task(replace(ok, uris_ref="state:"), roots)
    cases = [
        (replace(ok, output=OutputSpec(path=f"{inside}/../escaped")), "output"),
        (replace(ok, output=OutputSpec(path="../escaped")), "output"),
        (replace(ok, uris_ref="/etc/passwd"), "shard list"),
        (replace(ok, model=ModelSpec(model_path="/etc/m.keras")), "model"),
        (replace(ok, model=ModelSpec(labels="/etc/passwd")), "labels file"),
        (replace(ok, model=ModelSpec(name="MobileNetV2", weights="/etc/w.weights.h5")), "weights file"),
    ]
    for task, what in cases:
        with pytest.raises(ConfigError, match=f"^{what} .* is {OUTSIDE}"):
            check_task(task, roots)
    check_task(replace(ok, uris_ref="/spool/j/shard-000000.uris.gz"), roots, spool="/spool")  # the operator's
    check_carry([f"{inside}/old/shard-000000.parquet"], roots)
    with pytest.raises(ConfigError, match=f"^previous output /old/shard-000000.parquet is {OUTSIDE}"):
        check_carry([f"{inside}/old/shard-000000.parquet", "/old/shard-000000.parquet"], roots)


def test_an_image_outside_is_its_row_and_never_read(tmp_path):
    read: list[str] = []

    def load(uri, decode, size):
        read.append(uri)
        return Loaded(uri, None, "read", 0.0)

    uris = [str(tmp_path / "in" / "a.jpg"), "/etc/shadow", str(tmp_path / "in" / ".." / "b.jpg")]
    task = ShardTask("j", 0, uris, ModelSpec(batch_size=8))
    loads = shard_loads(task, (8, 8), load, Roots.parse(str(tmp_path / "in"), "X"))
    rows = [loads._load_one(uri) for uri in uris]
    assert [r.error for r in rows] == ["read", OUTSIDE, OUTSIDE] and read == uris[:1]


def test_s3_roots_confine_inputs_and_output(s3, tmp_path):
    """In one process (``run_shard``, a fake model): an S3 image under another prefix is an error row,
    an S3 output under another prefix fails at once and writes nothing."""
    from workers.attempt import run_shard
    from workers.jobstate import MemoryJobStore

    client = s3.client()
    client.create_bucket(Bucket="conf")
    cat = (PHOTOS / "cat.jpg").read_bytes()
    for key in ("data/cat.jpg", "database/cat.jpg"):
        client.put_object(Bucket="conf", Key=key, Body=cat)
    settings = replace(Settings.from_env(), io_threads=2,
                       allowed_roots=Roots.parse("s3://conf/data", "BATCHINFER_ALLOWED_ROOTS"))
    uris = ["s3://conf/data/cat.jpg", "s3://conf/database/cat.jpg"]
    spec = ModelSpec(name="MobileNetV2", weights="none", top_k=1, batch_size=4)
    store = MemoryJobStore()
    store.create_job("s3", {"output": asdict(OutputSpec(path="s3://conf/data/out"))})
    result = run_shard(ShardTask("s3", 0, uris, spec, OutputSpec(path="s3://conf/data/out")), store,
                       FakeCache().get, settings)
    assert result.errors == 1
    from workers.sinks.parquet import read_shard

    rows = read_shard("s3://conf/data/out/shard-000000.parquet").to_pylist()
    assert [r["error"] for r in rows] == [None, OUTSIDE]
    store.create_job("s3b", {"output": asdict(OutputSpec(path="s3://conf/database/out"))})
    with pytest.raises(ConfigError, match=f"output s3://conf/database/out is {OUTSIDE}"):
        run_shard(ShardTask("s3b", 0, uris[:1], spec, OutputSpec(path="s3://conf/database/out")), store,
                  FakeCache().get, settings)
    assert "Contents" not in client.list_objects_v2(Bucket="conf", Prefix="database/out")


def test_redirects_are_confined_too(tmp_path):
    """An allowed web server's redirect to a place outside the roots is not followed."""
    from tests.http_server import HttpServer
    from workers.storage.http import HttpStorage

    (tmp_path / "site" / "photos").mkdir(parents=True)
    shutil.copy(PHOTOS / "cat.jpg", tmp_path / "site" / "photos" / "cat.jpg")
    server = HttpServer(tmp_path / "site", tmp_path / "http.log").start()
    try:
        base = server.url
        confined = HttpStorage(replace(Settings(), allowed_roots=Roots.parse(f"{base}/redirect", "X")))
        with pytest.raises(OSError, match=f"redirected {OUTSIDE}"):
            confined.read(f"{base}/redirect")  # 302 to /photos/cat.jpg, outside the root
        assert server.hits("/photos/cat.jpg") == 0
        both = HttpStorage(replace(Settings(), allowed_roots=Roots.parse(f"{base}/redirect,{base}/photos", "X")))
        assert both.read(f"{base}/redirect") == (PHOTOS / "cat.jpg").read_bytes()
    finally:
        server.stop()


@pytest.mark.parametrize("suffix", [".keras", ".h5"])
def test_python_code_in_a_keras_or_h5_file_loads_only_when_trusted(suffix, tmp_path):
    """Keras 3 applies safe_mode to legacy .h5 files as to .keras ones: a Lambda layer's Python code is
    refused, in one clear line; a trusted file loads without safe_mode and its code runs."""
    import warnings

    import keras
    import numpy as np

    from workers.models.custom import load_custom

    inputs = keras.Input((8, 8, 3))
    with warnings.catch_warnings():  # Keras warns that a lambda is unsafe to serialize: that is the point
        warnings.simplefilter("ignore")
        keras.Model(inputs, keras.layers.Lambda(lambda x: x * 2.0)(inputs)).save(tmp_path / f"lambda{suffix}")
    spec = ModelSpec(model_path=str(tmp_path / f"lambda{suffix}"))
    with pytest.raises(ConfigError, match="it holds a Lambda layer \\(Python code\\), which Keras' safe_mode does "
                                          "not run; to run it, set BATCHINFER_TRUST_MODELS=1"):
        load_custom(spec)
    loaded = load_custom(spec, Roots.parse(str(tmp_path), "BATCHINFER_TRUST_MODELS"))
    assert float(np.asarray(loaded.model(np.ones((1, 8, 8, 3), np.float32))).max()) == 2.0


def test_a_keras_whose_safe_mode_has_holes_loads_only_trusted_files(tmp_path, monkeypatch):
    import keras

    from workers.models.custom import load_custom

    path = tmp_path / "model.keras"
    custom_models.build().save(path)
    monkeypatch.setattr(keras, "__version__", "3.11.3")
    with pytest.raises(ConfigError, match="the safe_mode of Keras 3.11.3 lets some model files run code .*"
                                          "upgrade to Keras 3.13.2 or later, or to run it, set BATCHINFER_TRUST"):
        load_custom(ModelSpec(model_path=str(path)))
    assert load_custom(ModelSpec(model_path=str(path)), ANYWHERE).input_hw == (48, 48)


# --- a real worker, confined, trusting one folder of models ----------------------------------------------


@pytest.fixture(scope="module")
def place(tmp_path_factory) -> Path:
    """``in/`` (the worker's root: photos, models, outputs), ``in/trusted/`` (models it trusts) and
    ``outside/`` (a photo, a model and a labels file it must not touch)."""
    base = tmp_path_factory.mktemp("confine")
    photos, models, outside = base / "in" / "photos", base / "in" / "models", base / "outside"
    for folder in (photos, models, outside, base / "in" / "trusted"):
        folder.mkdir(parents=True)
    for name in ("cat.jpg", "coffee.jpg"):
        shutil.copy(PHOTOS / name, photos / name)
    shutil.copy(PHOTOS / "rocket.jpg", outside / "secret.jpg")
    (photos / "link.jpg").symlink_to(outside / "secret.jpg")
    model = custom_models.build()
    model.save(models / "model.keras")
    shutil.copy(models / "model.keras", outside / "model.keras")
    (models / "labels.txt").write_text("\n".join(custom_models.LABELS) + "\n")
    (outside / "labels.txt").write_text("\n".join(custom_models.LABELS) + "\n")
    _save_writing_savedmodel(models / "writes", base / SAVEDMODEL_WRITES)
    return base


def _save_writing_savedmodel(folder: Path, target: Path) -> None:
    """A SavedModel whose serving function writes ``target`` each time it runs: code in a model file."""
    import tensorflow as tf

    class Writes(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def serve(self, images):
            tf.io.write_file(str(target), "the model's graph ran here")
            return {"scores": tf.nn.softmax(tf.reduce_mean(images, axis=[1, 2]))}

    module = Writes()
    tf.saved_model.save(module, str(folder), signatures={"serving_default": module.serve})


@pytest.fixture(scope="module")
def confined(place, redis_url, tmp_path_factory):
    folder = tmp_path_factory.mktemp("confined-worker")
    w = Worker(redis_url, folder / "worker.log", cwd=folder,
               extra_env={"BATCHINFER_ALLOWED_ROOTS": str(place / "in"),
                          "BATCHINFER_TRUST_MODELS": str(place / "in" / "trusted")})
    w.cwd = folder  # type: ignore[attr-defined]
    yield w
    w.stop()


def forge(redis_url: str, uris: list[str], model: ModelSpec, output: OutputSpec, uris_ref: str | None = None) -> dict:
    """Record a one-shard job and send its message straight to the queue (no producer checks); wait for
    the shard to end and return its record."""
    from workers.app import app
    from workers.redis_jobstore import RedisJobStore

    job_id = f"forged-{uuid.uuid4().hex[:8]}"
    store = RedisJobStore.from_url(redis_url)
    store.create_job(job_id, {"model": asdict(model), "output": asdict(output), "queue": "batchinfer"})
    store.add_shard(job_id, 0, uris)
    store.finish_submit(job_id, 1, len(uris))
    app.conf.broker_url = redis_url
    task = ShardTask(job_id, 0, [] if uris_ref else uris, model, output, uris_ref=uris_ref)
    app.send_task(TASK_NAME, kwargs={"task": task.to_dict()}, queue="batchinfer")

    def ended():
        job = store.get_job(job_id, shards=True)
        record = job.shards[0] if job else None
        return record if record and record["state"] in ("done", "failed") else None

    return wait_until(ended, 120, f"shard of {job_id}")


def _model(place: Path, **changes) -> ModelSpec:
    spec = ModelSpec(model_path=str(place / "in" / "models" / "model.keras"), weights="none", decode="keras",
                     batch_size=4, top_k=1)
    return replace(spec, **changes)


def test_images_outside_the_roots_are_error_rows(confined, place, redis_url):
    photos = place / "in" / "photos"
    uris = [str(photos / "cat.jpg"), str(photos / "link.jpg"), f"{photos}/../../outside/secret.jpg",
            "../outside/secret.jpg", str(photos / "coffee.jpg")]
    out = place / "in" / "out-images"
    record = forge(redis_url, uris, _model(place), OutputSpec(path=str(out)))
    assert record["state"] == "done", record
    rows = pd.read_parquet(out / "shard-000000.parquet")
    assert list(rows["uri"]) == uris
    assert list(rows["error"].fillna("ok")) == ["ok", OUTSIDE, OUTSIDE, OUTSIDE, "ok"]
    assert rows["label"].notna().tolist() == [True, False, False, False, True]


def test_a_shard_list_outside_the_roots_fails_the_shard(confined, place, redis_url):
    from workers.spool import write_shard_list

    ref = place / "outside" / "shard-000000.uris.gz"
    write_shard_list(str(ref), ShardList([str(place / "in" / "photos" / "cat.jpg")]))
    record = forge(redis_url, [], _model(place), OutputSpec(path=str(place / "in" / "out-list")), uris_ref=str(ref))
    assert record["state"] == "failed" and f"shard list {ref} is {OUTSIDE}" in record["reason"], record


def test_an_output_outside_the_roots_fails_at_once_and_creates_nothing(confined, place, redis_url):
    cat = [str(place / "in" / "photos" / "cat.jpg")]
    for path in ("../escaped", f"{place}/in/../escaped"):
        record = forge(redis_url, cat, _model(place), OutputSpec(path=path))
        assert record["state"] == "failed" and f"output {path} is {OUTSIDE}" in record["reason"], record
        assert record["attempts"] == 1, "a configuration error is final: no retry"
    assert not (confined.cwd.parent / "escaped").exists() and not (place / "escaped").exists()


def test_model_weights_and_labels_outside_the_roots_fail_the_shard(confined, place, redis_url):
    cat = [str(place / "in" / "photos" / "cat.jpg")]
    outside = place / "outside"
    cases = [
        (_model(place, model_path=str(outside / "model.keras")), "model"),
        (_model(place, labels="/etc/passwd"), "labels file"),
        (_model(place, labels=str(place / "in" / "photos" / ".." / ".." / "outside" / "labels.txt")), "labels file"),
        (ModelSpec(name="MobileNetV2", weights=str(outside / "w.weights.h5"), batch_size=4), "weights file"),
    ]
    built = confined.text().count(" built ")
    for i, (spec, what) in enumerate(cases):
        record = forge(redis_url, cat, spec, OutputSpec(path=str(place / "in" / f"out-model-{i}")))
        assert record["state"] == "failed" and f"ConfigError: {what} " in record["reason"], record
        assert OUTSIDE in record["reason"] and "labels for a model" not in record["reason"]
    assert confined.text().count(" built ") == built, "no model was loaded for any of them"


def test_a_savedmodel_runs_only_where_the_worker_trusts_it(confined, place, redis_url):
    written = place / SAVEDMODEL_WRITES
    cat = [str(place / "in" / "photos" / "cat.jpg")]
    untrusted = ModelSpec(model_path=str(place / "in" / "models" / "writes"), weights="none", batch_size=4, top_k=1)
    record = forge(redis_url, cat, untrusted, OutputSpec(path=str(place / "in" / "out-saved")))
    assert record["state"] == "failed" and record["attempts"] == 1, record
    assert "SavedModel, refused: it runs its own graph" in record["reason"]
    assert "BATCHINFER_TRUST_MODELS" in record["reason"]
    assert not written.exists(), "the refused model's graph never ran"

    trusted = place / "in" / "trusted" / "writes"
    shutil.copytree(place / "in" / "models" / "writes", trusted)
    record = forge(redis_url, cat, replace(untrusted, model_path=str(trusted)),
                   OutputSpec(path=str(place / "in" / "out-trusted")))
    assert record["state"] == "done", record
    assert written.read_text() == "the model's graph ran here", "trusted, it runs (so the test above can fail)"
    written.unlink()


# --- batchinfer run ------------------------------------------------------------------------------------------


def test_run_refuses_an_untrusted_savedmodel_in_one_line_and_runs_a_trusted_one(place, tmp_path):
    written = place / SAVEDMODEL_WRITES
    written.unlink(missing_ok=True)
    args = ("run", str(PHOTOS / "cat.jpg"), "--model-path", str(place / "in" / "models" / "writes"), "--output",
            str(tmp_path / "out.csv"), "--quiet")
    refused = batchinfer(*args, check=False)
    assert_one_line_error(refused, "TensorFlow SavedModel, refused", "BATCHINFER_TRUST_MODELS=1")
    assert not written.exists() and not (tmp_path / "out.csv").exists()
    batchinfer(*args, env={"BATCHINFER_TRUST_MODELS": "1"})
    assert written.exists() and len(pd.read_csv(tmp_path / "out.csv")) == 1
