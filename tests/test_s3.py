"""S3 in, Parquet on S3 out, through a real S3 endpoint (moto's server in its own process).

Every process reaches the endpoint as a user's would: ``AWS_ENDPOINT_URL`` (or ``--s3-endpoint-url``)
and credentials from the environment; boto3 is not patched anywhere. The session's server is
restarted by the last test, so each test brings its own buckets.
"""

from __future__ import annotations

import datetime
import io
import json
import os
import signal
import time
import tracemalloc
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import tests.test_sinks as sink_contract
import workers.storage
from producer.cli import main as cli_main
from producer.shards import shards
from producer.sources import Filters, check_sources, iter_uris
from tests.conftest import PHOTOS, Worker, batchinfer, check_rows, wait_until
from tests.s3_server import S3Server
from workers.contract import OutputSpec
from workers.errors import ConfigError, ShardError, SourceError
from workers.redis_jobstore import RedisJobStore
from workers.settings import Settings
from workers.storage import storage_for
from workers.storage.local import LocalStorage
from workers.storage.s3 import S3Storage

FAST = ("--model", "MobileNetV2", "--weights", "none", "--input-size", "64")
LISTED = 20_000


@pytest.fixture(scope="module")
def s3_worker(redis_url: str, s3_endpoint: S3Server, tmp_path_factory: pytest.TempPathFactory):
    """A real worker whose own environment points at the endpoint (task messages carry no endpoint)."""
    folder = tmp_path_factory.mktemp("s3worker")
    # short retry backoff: the restart test waits for a failed attempt's retry
    w = Worker(redis_url, folder / "worker.log", cwd=folder,
               extra_env={**s3_endpoint.env, "BATCHINFER_RETRY_BACKOFF": "2"})
    yield w
    w.stop()


def _upload(client, bucket: str, prefix: str, folder: Path) -> list[str]:
    if bucket not in [b["Name"] for b in client.list_buckets().get("Buckets", [])]:
        client.create_bucket(Bucket=bucket)
    keys = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            keys.append(prefix + path.relative_to(folder).as_posix())
            client.put_object(Bucket=bucket, Key=keys[-1], Body=path.read_bytes())
    return keys


@pytest.fixture(scope="module")
def mixed_bucket(s3_endpoint: S3Server, mixed_folder) -> tuple[str, dict[str, str | None]]:
    """Photos, hostile and tricky files under ``s3://mixed/in/``, plus keys a listing must skip."""
    folder, expected = mixed_folder
    client = s3_endpoint.client()
    _upload(client, "mixed", "in/", folder)
    client.put_object(Bucket="mixed", Key="in/notes.txt", Body=b"not an image name")
    client.put_object(Bucket="mixed", Key="in/.hidden/secret.jpg", Body=b"hidden")
    client.put_object(Bucket="mixed", Key="in/empty-folder/", Body=b"")  # a console-made "folder"
    client.put_object(Bucket="mixed", Key="in-other/cat.jpg", Body=b"same prefix, another folder")
    return "s3://mixed/in/", expected


def _keys(client, bucket: str, prefix: str = "") -> list[str]:
    return [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])]


# --- sources: prefixes and manifests on S3 ----------------------------------------------------------


def test_prefix_listing_skips_folder_markers_hidden_keys_and_other_files(s3, mixed_bucket):
    prefix, expected = mixed_bucket
    check_sources([prefix, "s3://mixed/in", "s3://mixed/list.csv"])
    got = list(iter_uris([prefix]))
    assert sorted(u[len(prefix):] for u in got) == sorted(expected)
    assert got == sorted(got), "S3 lists keys in order, so shards are stable"
    assert list(iter_uris(["s3://mixed/in"])) == got, "a prefix without a slash is the same folder"
    assert list(iter_uris(["s3://mixed/in/cat.jpg"])) == ["s3://mixed/in/cat.jpg"]
    assert [u[len(prefix):] for u in iter_uris([prefix], Filters(include=("odd/*",), exclude=("*.png",)))] == \
        sorted(k for k in expected if k.startswith("odd/") and not k.endswith(".png"))


def test_manifests_on_s3_txt_csv_and_parquet(s3):
    client = s3.client()
    client.create_bucket(Bucket="lists")
    client.put_object(Bucket="lists", Key="m/list.txt", Body=b"# nightly\nimgs/a.jpg\n\ns3://other/b.png\n")
    client.put_object(Bucket="lists", Key="m/list.csv", Body="\ufeffuri,label\nimgs/a.jpg,x\n/abs/c.png,y\n".encode())
    buf = io.BytesIO()
    pq.write_table(pa.table({"uri": ["imgs/a.jpg", None, "s3://other/d.jpg"]}), buf)
    client.put_object(Bucket="lists", Key="m/list.parquet", Body=buf.getvalue())

    assert list(iter_uris(["s3://lists/m/list.txt"])) == ["s3://lists/m/imgs/a.jpg", "s3://other/b.png"]
    assert list(iter_uris(["s3://lists/m/list.csv"])) == ["s3://lists/m/imgs/a.jpg", "/abs/c.png"]
    assert list(iter_uris(["s3://lists/m/list.parquet"])) == ["s3://lists/m/imgs/a.jpg", "s3://other/d.jpg"]
    with pytest.raises(SourceError, match="s3://lists/m/missing.txt: cannot read manifest.*not found"):
        list(iter_uris(["s3://lists/m/missing.txt"]))


def test_sources_that_cannot_work_fail_with_one_clear_reason(s3):
    with pytest.raises(SourceError, match="no bucket name"):
        check_sources(["s3:///photos/"])
    with pytest.raises(SourceError, match="bucket 'no-such-bucket' does not exist"):
        list(iter_uris(["s3://no-such-bucket/photos/"]))


@pytest.fixture(scope="module")
def listing_server(tmp_path_factory: pytest.TempPathFactory):
    """A second endpoint holding ``s3://many/keys/000000.jpg`` … 019999.jpg (loaded before it serves)."""
    server = S3Server(tmp_path_factory.mktemp("s3many") / "s3.log", fills=[f"many/keys/={LISTED}"]).start()
    yield server
    server.stop()


def test_a_large_prefix_streams_into_shards_with_bounded_memory(s3, listing_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", listing_server.url)
    pages: list[int] = []
    storage_for("s3://many/").client.meta.events.register(
        "after-call.s3.ListObjectsV2", lambda **kw: pages.append(len(kw["parsed"].get("Contents", []))))

    stream = shards(iter_uris(["s3://many/keys/"]), 256)
    shard_id, first = next(stream)
    assert shard_id == 0 and first[:2] == ["s3://many/keys/000000.jpg", "s3://many/keys/000001.jpg"]
    assert pages == [1000], "the first shard comes out after one listing page, long before the listing ends"

    tracemalloc.start()
    try:
        count, early_peak = len(first), 0
        for shard_id, chunk in stream:
            count += len(chunk)
            if shard_id == 8:  # about 2,300 keys in: two pages parsed
                early_peak = tracemalloc.get_traced_memory()[1]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == LISTED and shard_id == LISTED // 256
    assert len(pages) == LISTED // 1000 and all(n == 1000 for n in pages)
    # Holding every key would add ~2 MB here (20,000 URIs); streaming keeps the peak where two pages left it.
    assert peak < early_peak + 600_000, f"memory grew with the listing: {early_peak} -> {peak} bytes"
    assert peak < 8_000_000, f"peak {peak} bytes while listing {LISTED} keys"


# --- the storage interface and the Parquet sink on S3 -------------------------------------------------


@pytest.mark.parametrize("scheme", ["local", "s3"])
def test_storage_contract(scheme, s3, tmp_path):
    if scheme == "s3":
        s3.client().create_bucket(Bucket="contract")
        base, storage = "s3://contract/area", storage_for("s3://contract/")
        assert isinstance(storage, S3Storage)
    else:
        base, storage = str(tmp_path / "area"), storage_for(str(tmp_path))
        assert isinstance(storage, LocalStorage)
    uri = f"{base}/sub/a.bin"
    assert not storage.exists(uri)
    with pytest.raises(FileNotFoundError):
        storage.read(uri)
    with storage.open_atomic(uri) as target:
        Path(target.path).write_bytes(b"first")
        assert not storage.exists(uri), "nothing is visible before the commit"
    assert storage.read(uri) == b"first" and storage.exists(uri)
    assert not Path(target.path).exists(), "the temporary file is gone"
    with pytest.raises(RuntimeError), storage.open_atomic(uri) as target:
        Path(target.path).write_bytes(b"half")
        raise RuntimeError("crash")
    assert storage.read(uri) == b"first", "a failed write leaves the old object"
    with storage.open_atomic(f"{base}/b.bin") as target:
        Path(target.path).write_bytes(b"second")
    assert sorted(storage.list(base)) == [f"{base}/b.bin", uri]
    with storage.open_read(uri) as fh:
        assert fh.read() == b"first"


def test_parquet_sink_contract_on_s3(s3):
    s3.client().create_bucket(Bucket="sink")
    sink_contract.test_sink_contract((OutputSpec(sink="parquet", path="s3://sink/out/"), Settings()))
    assert _keys(s3.client(), "sink") == ["out/shard-000000.parquet"], "one object per shard, nothing temporary"


# --- errors: per object vs the whole shard (an injected client, no network) ---------------------------


def _client_error(code: str, status: int):
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": f"{code} message"},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "GetObject")


class _FailingClient:
    """get_object fails as the key says: ``bucket/<Code>`` raises that S3 error."""

    def __init__(self) -> None:
        self.gets = 0

    def get_object(self, Bucket: str, Key: str):  # noqa: N803 (boto3's names)
        from botocore.exceptions import EndpointConnectionError, ResponseStreamingError

        self.gets += 1
        if Key == "unreachable":
            raise EndpointConnectionError(endpoint_url="http://s3.example:9000")
        if Key == "flaky-body":
            class Body(io.BytesIO):
                def read(inner, *args):  # noqa: N805
                    if self.gets < 2:
                        raise ResponseStreamingError(error="connection reset")
                    return b"whole"
            return {"Body": Body(), "ContentLength": 5, "ETag": '"e1"',
                    "LastModified": datetime.datetime(2026, 11, 23, tzinfo=datetime.timezone.utc)}
        status = {"NoSuchKey": 404, "AccessDenied": 403, "NoSuchBucket": 404, "ExpiredToken": 400,
                  "InvalidAccessKeyId": 403}[Key]
        raise _client_error(Key, status)


class _FailingS3(S3Storage):
    def __init__(self) -> None:
        super().__init__(client=_FailingClient())


def test_s3_errors_become_rows_or_fail_the_shard(monkeypatch):
    from workers.decode import DECODERS
    from workers.feed import load as _load

    monkeypatch.setitem(workers.storage.BACKENDS, "fakes3", f"{__name__}:_FailingS3")
    workers.storage._backend.cache_clear()
    try:
        def load(key: str):
            return _load(f"fakes3://bucket/{key}", DECODERS["fast"], (64, 64))

        assert load("NoSuchKey").error == "file not found"
        assert load("AccessDenied").error == "cannot read: access denied"
        with pytest.raises(ConfigError, match="bucket 'bucket' does not exist"):
            load("NoSuchBucket")
        with pytest.raises(ShardError, match="ExpiredToken"):
            load("ExpiredToken")
        with pytest.raises(ShardError, match="InvalidAccessKeyId"):
            load("InvalidAccessKeyId")
        with pytest.raises(ShardError, match="Could not connect"):
            load("unreachable")
        assert storage_for("fakes3://bucket/").read("fakes3://bucket/flaky-body") == b"whole", \
            "a body cut off mid-stream is read again"
    finally:
        workers.storage._backend.cache_clear()


def test_s3_endpoint_flag_must_be_a_url(capsys):
    assert cli_main(["collect", "job", "--output", "x.parquet", "--s3-endpoint-url", "minio:9000"]) == 2
    assert "--s3-endpoint-url must be an http:// or https:// URL" in capsys.readouterr().err


# --- end to end: a real worker, Redis and the S3 endpoint ---------------------------------------------


def test_submit_s3_to_s3_then_collect_locally_and_to_s3(s3, s3_worker, mixed_bucket, redis_url, redis_client,
                                                         tmp_path):
    prefix, expected = mixed_bucket
    client = s3.client()
    sub = batchinfer("submit", prefix, "--output", "s3://mixed/out/", *FAST, "--shard-size", "4",
                     "--batch-size", "4", broker=redis_url)
    job_id = sub.stdout.strip().splitlines()[-1]

    local = tmp_path / "all.parquet"
    batchinfer("collect", job_id, "--output", str(local), "--wait", "--timeout", "300", broker=redis_url)
    frame = pd.read_parquet(local)
    check_rows(frame, prefix, expected)
    good = frame[frame["error"].isna()]
    assert good["label"].notna().all() and (good["score"] > 0).all()
    n_shards = -(-len(expected) // 4)
    data = [k for k in _keys(client, "mixed", "out/") if not k.startswith("out/_")]
    assert data == [f"out/shard-{i:06d}.parquet" for i in range(n_shards)]
    wait_until(lambda: "out/_SUCCESS" in _keys(client, "mixed", "out/"), 30, "the completion marker")
    assert "out/_manifest.json" in _keys(client, "mixed", "out/")
    assert f"out/_batchinfer/{job_id}/shard-000000.uris.gz" in _keys(client, "mixed", "out/")
    status = batchinfer("status", job_id, broker=redis_url).stdout
    assert f"{n_shards}/{n_shards} done" in status and f"{len(expected)}/{len(expected)}" in status

    batchinfer("collect", job_id, "--output", "s3://mixed/results/all.parquet", broker=redis_url)
    body = client.get_object(Bucket="mixed", Key="results/all.parquet")["Body"].read()
    pd.testing.assert_frame_equal(pd.read_parquet(io.BytesIO(body)), frame)
    meta = json.loads(pq.read_schema(io.BytesIO(body)).metadata[b"batchinfer"])
    assert meta["job_id"] == job_id and meta["input_size"] == [64, 64]
    assert _keys(client, "mixed", "results/") == ["results/all.parquet"]


def test_run_from_s3_to_a_local_file_with_the_endpoint_flag(s3, mixed_bucket, tmp_path, monkeypatch):
    prefix, expected = mixed_bucket
    monkeypatch.delenv("AWS_ENDPOINT_URL")  # only the flag tells `run` where S3 is
    out = tmp_path / "photos.csv"
    batchinfer("run", prefix, "--exclude", "odd/*", "--output", str(out), "--s3-endpoint-url", s3.url, *FAST,
               "--quiet")
    frame = pd.read_csv(out)
    assert sorted(frame["uri"]) == sorted(prefix + k for k in expected if not k.startswith("odd/"))
    assert frame["error"].isna().all() and frame["label"].notna().all()


def test_a_key_deleted_after_listing_is_one_not_found_row(s3, s3_worker, redis_url, redis_client, tmp_path):
    client = s3.client()
    keys = _upload(client, "gone", "photos/", PHOTOS)
    listed = list(iter_uris(["s3://gone/photos/"]))
    assert [u.rsplit("/", 1)[1] for u in listed] == [k.rsplit("/", 1)[1] for k in keys]
    manifest = "".join(u[len("s3://gone/"):] + "\n" for u in listed)  # relative to the manifest's folder
    client.put_object(Bucket="gone", Key="nightly.txt", Body=manifest.encode())
    client.delete_object(Bucket="gone", Key="photos/cat.jpg")

    sub = batchinfer("submit", "s3://gone/nightly.txt", "--output", str(tmp_path / "out"), *FAST,
                     "--shard-size", "2", broker=redis_url)
    job_id = sub.stdout.strip().splitlines()[-1]
    out = tmp_path / "rows.parquet"
    batchinfer("collect", job_id, "--output", str(out), "--wait", "--timeout", "300", broker=redis_url)
    frame = pd.read_parquet(out)
    assert list(frame["uri"]) == listed
    errors = dict(zip(frame["uri"], frame["error"]))
    assert errors.pop("s3://gone/photos/cat.jpg") == "file not found"
    assert all(pd.isna(e) for e in errors.values()), errors
    assert frame[frame["error"].isna()]["label"].notna().all()


def test_a_missing_bucket_fails_the_shard_not_every_image(s3, s3_worker, redis_url, redis_client, tmp_path):
    sub = batchinfer("submit", "s3://no-such-bucket/photos/", "--output", str(tmp_path / "out"), *FAST,
                     broker=redis_url, check=False)
    assert sub.returncode == 1 and not sub.stdout and "Traceback" not in sub.stderr
    assert sub.stderr.strip().count("\n") == 0 and "bucket 'no-such-bucket' does not exist" in sub.stderr
    assert not redis_client.keys("*job*"), "no job is created for a source that cannot be listed"

    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(f"s3://no-such-bucket/photos/{i}.jpg\n" for i in range(5)))
    sub = batchinfer("submit", str(manifest), "--output", str(tmp_path / "out"), *FAST, "--shard-size", "5",
                     broker=redis_url)
    job_id = sub.stdout.strip().splitlines()[-1]
    started = time.monotonic()
    col = batchinfer("collect", job_id, "--output", str(tmp_path / "r.parquet"), "--wait", "--timeout", "120",
                     broker=redis_url, check=False)
    assert col.returncode == 1 and time.monotonic() - started < 120
    assert "shard-000000: failed" in col.stderr and "bucket 'no-such-bucket' does not exist" in col.stderr
    assert f"batchinfer retry {job_id}" in col.stderr and "--wait" not in col.stderr, "the advice that can help"
    status = batchinfer("status", job_id, broker=redis_url, check=False).stdout
    assert "1 failed" in status and "0 error rows" in status and "no-such-bucket" in status
    assert not list((tmp_path / "out").glob("*.parquet")), "no rows were written"
    job = RedisJobStore.from_url(redis_url).get_job(job_id, shards=True)
    assert job.shards[0]["state"] == "failed" and job.shards[0]["reason"].startswith("ConfigError")
    assert job.shards[0]["attempts"] == 1, "a bucket that does not exist is not retried"


def test_an_incremental_nightly_run_on_s3_compares_etags(s3, s3_worker, redis_url, redis_client, tmp_path):
    client = s3.client()
    _upload(client, "nightly", "in/", PHOTOS)
    common = (*FAST, "--shard-size", "2")
    job1 = batchinfer("submit", "s3://nightly/in/", "--output", "s3://nightly/out1/", *common,
                      broker=redis_url).stdout.strip().splitlines()[-1]
    batchinfer("collect", job1, "--output", str(tmp_path / "night1.parquet"), "--wait", broker=redis_url)
    before = pd.read_parquet(tmp_path / "night1.parquet").set_index("uri")
    etags = {f"s3://nightly/{o['Key']}": o["ETag"].strip('"')
             for o in client.list_objects_v2(Bucket="nightly", Prefix="in/")["Contents"]}
    assert before["etag"].to_dict() == etags, "each row records the ETag of the object it read"

    client.put_object(Bucket="nightly", Key="in/cat.jpg", Body=(PHOTOS / "coffee.jpg").read_bytes())  # changed
    client.put_object(Bucket="nightly", Key="in/new.jpg", Body=(PHOTOS / "rocket.jpg").read_bytes())   # added
    client.delete_object(Bucket="nightly", Key="in/motorcycle.png")                                   # deleted
    sub = batchinfer("submit", "s3://nightly/in/", "--output", "s3://nightly/out2/", *common,
                     "--skip-unchanged", "s3://nightly/out1/", broker=redis_url)
    assert "2 images to process, 3 unchanged (their rows are reused)" in sub.stderr
    job2 = sub.stdout.strip().splitlines()[-1]
    batchinfer("collect", job2, "--output", str(tmp_path / "night2.parquet"), "--wait", broker=redis_url)
    after = pd.read_parquet(tmp_path / "night2.parquet").set_index("uri")
    assert sorted(after.index) == sorted(f"s3://nightly/{k}" for k in _keys(client, "nightly", "in/"))
    for uri in ("s3://nightly/in/astronaut.jpg", "s3://nightly/in/coffee.jpg", "s3://nightly/in/rocket.jpg"):
        assert str(after.loc[uri].to_dict()) == str(before.loc[uri].to_dict()), f"{uri}: reused as it was"
    assert after.loc["s3://nightly/in/cat.jpg", "label"] == after.loc["s3://nightly/in/coffee.jpg", "label"]
    assert after.loc["s3://nightly/in/cat.jpg", "etag"] != before.loc["s3://nightly/in/cat.jpg", "etag"]


def test_an_output_on_s3_is_probed_before_any_work(s3, tmp_path):
    """A missing bucket is one line before the model or an image; a writable one is probed with a multipart
    upload that is aborted, so nothing is left behind."""
    for command in (["run", str(PHOTOS), *FAST, "--output", "s3://no-such-bucket/out/r.parquet"],
                    ["submit", str(PHOTOS), *FAST, "--output", "s3://no-such-bucket/out/", "--broker",
                     "redis://127.0.0.1:1/0"],
                    ["collect", "job", "--output", "s3://no-such-bucket/r.csv", "--broker", "redis://127.0.0.1:1/0"]):
        started = time.monotonic()
        proc = batchinfer(*command, check=False)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.strip().splitlines() == [
            f"batchinfer: error: cannot write to {command[command.index('--output') + 1]}: bucket 'no-such-bucket' "
            "does not exist (NoSuchBucket)"], proc.stderr
        assert time.monotonic() - started < 30, "no model is built first"

    client = s3.client()
    client.create_bucket(Bucket="writable")
    storage_for("s3://writable/").check_writable("s3://writable/nightly/", folder=True)
    storage_for("s3://writable/").check_writable("s3://writable/all.parquet", folder=False)
    assert _keys(client, "writable") == []
    assert not client.list_multipart_uploads(Bucket="writable").get("Uploads"), "the probe's upload is aborted"


def test_the_s3_server_restarted_mid_job_loses_nothing(s3, s3_worker, redis_url, redis_client, tmp_path):
    """Runs last: restarting the session's server wipes what other tests uploaded."""
    (tmp_path / "empty").mkdir()
    seeds = [f"flaky/in/={PHOTOS}", f"flaky-out/={tmp_path / 'empty'}"]  # moto comes back with exactly these
    s3.restart(seeds)
    listed = list(iter_uris(["s3://flaky/in/"]))
    manifest = tmp_path / "list.txt"
    manifest.write_text("".join(u + "\n" for u in listed))

    s3.stop()
    down = batchinfer("submit", str(manifest), "--output", "s3://flaky-out/run/", *FAST, "--shard-size", "2",
                      broker=redis_url, check=False)
    assert down.returncode == 1 and "Could not connect" in down.stderr and not down.stdout, "checked before any job"
    assert down.stderr.strip().splitlines() == [down.stderr.strip()], "one line, no traceback"
    assert not RedisJobStore.from_url(redis_url).recent_jobs(5), "no job was created"
    s3.start(seeds)
    # shard lists spooled to a local folder; the worker is paused (SIGSTOP) until the output store is down,
    # so no shard is written before the restart (moto comes back empty but for the seeds)
    os.killpg(s3_worker.proc.pid, signal.SIGSTOP)
    try:
        sub = batchinfer("submit", str(manifest), "--output", "s3://flaky-out/run/", *FAST, "--shard-size", "2",
                         broker=redis_url, env={"BATCHINFER_SPOOL": str(tmp_path / "spool")})
        s3.stop()
    finally:
        os.killpg(s3_worker.proc.pid, signal.SIGCONT)
    job_id = sub.stdout.strip().splitlines()[-1]
    store = RedisJobStore.from_url(redis_url)
    wait_until(lambda: any(s.get("reason") for s in store.get_job(job_id, shards=True).shards.values()), 60,
               "a shard attempt failing against the stopped server")
    s3.start(seeds)

    out = tmp_path / "rows.parquet"
    batchinfer("collect", job_id, "--output", str(out), "--wait", "--timeout", "120", broker=redis_url)
    frame = pd.read_parquet(out)
    assert list(frame["uri"]) == listed and frame["error"].isna().all() and frame["label"].notna().all()
    job = store.get_job(job_id, shards=True)
    assert all(s["state"] == "done" for s in job.shards.values()) and len(job.shards) == 3
    retried = [s for s in job.shards.values() if s["attempts"] > 1]
    assert retried, "attempts failed against the stopped server and were retried after their backoff"
    data = [k for k in _keys(s3.client(), "flaky-out") if not k.startswith("run/_")]
    assert data == [f"run/shard-{i:06d}.parquet" for i in range(3)]


def test_collect_streams_to_s3_in_parts_without_local_staging(s3, monkeypatch):
    """A 12 MiB output goes up as a multipart upload of 5 MiB parts while it is written; no temporary file."""
    import tempfile

    import numpy as np

    from producer.collect import write_tables

    client = s3.client()
    client.create_bucket(Bucket="streamed")
    monkeypatch.setenv("BATCHINFER_S3_PART_SIZE", str(5 << 20))

    def no_local_files(*args, **kwargs):
        raise AssertionError("collect staged the output on local disk")

    monkeypatch.setattr(tempfile, "mkstemp", no_local_files)
    rng = np.random.default_rng(0)
    tables = [pa.table({"uri": [f"/img/{i}-{k}.jpg" for k in range(1000)],
                        "features": list(rng.standard_normal((1000, 400), dtype=np.float32))}) for i in range(8)]
    rows = write_tables(iter(tables), "s3://streamed/all.parquet", "parquet")
    assert rows == 8000
    head = client.head_object(Bucket="streamed", Key="all.parquet")
    assert head["ContentLength"] > 10 << 20 and "-" in head["ETag"], "a multipart upload (ETag of parts)"
    body = client.get_object(Bucket="streamed", Key="all.parquet")["Body"].read()
    back = pq.read_table(io.BytesIO(body))
    assert back.column("uri").to_pylist() == [u for t in tables for u in t.column("uri").to_pylist()]

    def broken():
        yield tables[0]
        yield tables[1]
        raise RuntimeError("the collector died")

    with pytest.raises(RuntimeError):
        write_tables(broken(), "s3://streamed/half.parquet", "parquet")
    assert "half.parquet" not in _keys(client, "streamed"), "no half-written object"
    assert not client.list_multipart_uploads(Bucket="streamed").get("Uploads"), "the upload was aborted"
    write_tables(iter(tables[:1]), "s3://streamed/small.csv", "csv")  # text, under one part: a single PUT
    text = client.get_object(Bucket="streamed", Key="small.csv")["Body"].read().decode()
    assert text.splitlines()[0] == "uri,features" and len(text.splitlines()) == 1001
