"""http(s) sources against a real web server: ``tests/http_server.py`` in a process of its own on a free
loopback port, serving photos, a 404, a 403, an answer slower than the timeout, redirects (one, a loop, one
to ``file://``), oversized bodies, an HTML page, a flaky, a throttling and a failing URL.

Nothing in the HTTP layer is mocked: the storage backend, ``batchinfer run`` and a real worker all fetch
from the server. Every case is one row, with an error exactly where the table below says.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import workers.storage
from producer.sources import check_sources, iter_entries, iter_uris
from tests.conftest import PHOTOS, Worker, batchinfer, check_rows, free_port, submit
from tests.http_server import HttpServer
from workers import __version__
from workers.decode import DECODERS
from workers.errors import ConfigError, SourceError
from workers.feed import load as _load
from workers.settings import Settings
from workers.storage import storage_for
from workers.storage.http import HttpStorage
from workers.storage.http_client import client

# a 1 s timeout so /slow (3 s) times out; 2 retries; a size limit above the photos' (281,070 bytes at most)
# and below /big's (1,000,000)
HTTP_ENV = {"BATCHINFER_HTTP_TIMEOUT": "1", "BATCHINFER_HTTP_RETRIES": "2", "BATCHINFER_HTTP_MAX_BYTES": "400000"}
SETTINGS = Settings.from_env(HTTP_ENV)
FAST = ("--model", "MobileNetV2", "--weights", "none", "--input-size", "64")


def cases(tag: str) -> dict[str, str | None]:
    """Each path on the server and its row's error (None: read and decoded). ``tag`` names fresh
    flaky/throttled URLs, which fail only the first time they are asked, and counts of requests."""
    return {
        **{f"photos/{p.name}": None for p in sorted(PHOTOS.iterdir())},
        "redirect": None,
        f"flaky/{tag}": None,      # 503 once, then retried
        f"throttled/{tag}": None,  # 429 with Retry-After: 3600 once, then retried within the timeout
        "missing": "file not found",
        "private": "cannot read: access denied (http 403 forbidden)",
        "slow": "cannot read: timed out after 1s",
        "loop": "cannot read: too many redirects (more than 5)",
        "to-file": "cannot read: unsupported url scheme file:// (only http and https)",
        "big": "cannot read: response larger than 400000 bytes",
        "big-chunked": "cannot read: response larger than 400000 bytes",
        "trickle": "cannot read: download took longer than 6 x 1s",
        "page.html": "not an image",
        f"down/{tag}": "cannot read: http 503 service unavailable (after 2 retries)",
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The server's files: the photos, and manifests the tests write into ``lists/``."""
    root = tmp_path_factory.mktemp("site")
    shutil.copytree(PHOTOS, root / "photos")
    (root / "lists").mkdir()
    return root


@pytest.fixture(scope="module")
def web(site: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    server = HttpServer(site, tmp_path_factory.mktemp("web") / "web.log").start()
    yield server
    server.stop()


@pytest.fixture
def http_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process reads URLs with the test settings (the registry's backend is made afresh)."""
    for name, value in HTTP_ENV.items():
        monkeypatch.setenv(name, value)
    workers.storage._backend.cache_clear()
    yield
    workers.storage._backend.cache_clear()


@pytest.fixture(scope="module")
def http_worker(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Worker]:
    """A real worker with the test settings in its own environment (task messages carry no settings)."""
    folder = tmp_path_factory.mktemp("httpworker")
    w = Worker(redis_url, folder / "worker.log", cwd=folder, extra_env=HTTP_ENV)
    yield w
    w.stop()


def write_manifest(site: Path, name: str, base: str, tag: str) -> list[str]:
    """``lists/NAME`` listing every case (photos relative to the manifest); returns the URLs it means."""
    entries = [f"../{k}" if k.startswith("photos/") else f"{base}/{k}" for k in cases(tag)]
    path = site / "lists" / name
    if name.endswith(".csv"):
        path.write_text("uri,note\n" + "".join(f"{e},x\n" for e in entries))
    else:
        path.write_text("# tonight's crawl\n" + "".join(e + "\n" for e in entries))
    return [f"{base}/{k}" for k in cases(tag)]


# --- the storage backend -----------------------------------------------------------------------------


def test_http_and_https_are_one_read_only_backend_with_one_pool_per_process(http_env):
    plain, secure = storage_for("http://example.com/a.jpg"), storage_for("HTTPS://example.com/a.jpg")
    assert isinstance(plain, HttpStorage) and isinstance(secure, HttpStorage)
    assert client(plain.settings)[0] is client(secure.settings)[0], "one connection pool for both schemes"
    storage = HttpStorage(SETTINGS)
    for write in (storage.open_atomic, storage.open_stream, storage.list):
        with pytest.raises(ConfigError, match="http"):
            write("https://example.com/out/")


def test_http_settings_have_defaults_and_are_checked_up_front():
    default = Settings.from_env({})
    assert (default.http_timeout, default.http_retries, default.http_max_redirects, default.http_max_bytes) == \
        (10.0, 3, 5, 50 << 20)
    assert (SETTINGS.http_timeout, SETTINGS.http_retries, SETTINGS.http_max_bytes) == (1.0, 2, 400_000)
    assert Settings.from_env({"BATCHINFER_HTTP_RETRIES": "0", "BATCHINFER_HTTP_TIMEOUT": "2.5"}).http_timeout == 2.5
    for name, value, message in [("BATCHINFER_HTTP_TIMEOUT", "0", "a positive number of seconds"),
                                 ("BATCHINFER_HTTP_TIMEOUT", "soon", "a number of seconds, got 'soon'"),
                                 ("BATCHINFER_HTTP_RETRIES", "-1", "at least 0"),
                                 ("BATCHINFER_HTTP_MAX_REDIRECTS", "many", "an integer"),
                                 ("BATCHINFER_HTTP_MAX_BYTES", "0", "at least 1")]:
        with pytest.raises(ValueError, match=f"{name} must be {message}"):
            Settings.from_env({name: value})


def test_a_photo_is_read_with_its_version(web, site):
    storage = HttpStorage(SETTINGS)
    photo = site / "photos" / "cat.jpg"
    data, info = storage.read_info(f"{web.url}/photos/cat.jpg")
    assert data == photo.read_bytes()
    assert info.size == len(data) and info.etag == hashlib.sha1(data).hexdigest()[:16]
    assert info.modified == int(photo.stat().st_mtime) * 1_000_000, "Last-Modified, to the second"
    assert storage.stat(f"{web.url}/photos/cat.jpg") == info, "a HEAD sees the version a GET reads"
    assert storage.stat(f"{web.url}/redirect") == info, "redirects are followed"
    assert storage.stat(f"{web.url}/missing") is None
    assert storage.exists(f"{web.url}/photos/cat.jpg") and not storage.exists(f"{web.url}/missing")
    assert storage.read(f"{web.url}/agent") == f"batchinfer/{__version__}".encode()
    page, page_info = storage.read_info(f"{web.url}/page.html")
    assert page.startswith(b"<!doctype html>") and page_info.modified is None, "no Last-Modified: no version"


def test_every_failure_is_that_images_row_with_a_clear_reason(web, http_env):
    """What ``_load`` (the pipeline's read and decode of one image) makes of each case."""
    want = cases("load")
    started = time.monotonic()
    with ThreadPoolExecutor(8) as pool:  # as the pipeline's I/O threads
        loaded = dict(zip(want, pool.map(lambda k: _load(f"{web.url}/{k}", DECODERS["fast"], (64, 64)), want)))
    for name, error in want.items():
        got = loaded[name]
        if error is None:
            assert got.error is None and got.image is not None and got.info is not None, name
        else:
            assert got.error is not None and error in got.error.lower(), f"{name}: {got.error!r}"
    assert loaded["slow"].error == "cannot read: timed out after 1s"
    assert time.monotonic() - started < 15, "3 tries of 1 s, waits capped at 1 s; a trickle cut off after 6 s"

    dead = f"http://127.0.0.1:{free_port()}/cat.jpg"  # nothing listens there
    assert _load(dead, DECODERS["fast"], (64, 64)).error == "cannot read: cannot connect: Connection refused"


def test_retries_back_off_and_honour_retry_after_up_to_the_timeout(web):
    storage = HttpStorage(SETTINGS)
    cat = (PHOTOS / "cat.jpg").read_bytes()
    assert storage.read(f"{web.url}/flaky/retry") == cat
    assert web.hits("/flaky/retry") == 2, "a 503 is tried again"

    started = time.monotonic()
    assert storage.read(f"{web.url}/throttled/retry") == cat
    waited = time.monotonic() - started
    assert web.hits("/throttled/retry") == 2
    assert 0.9 < waited < 3, f"Retry-After: 3600 waited {waited:.1f}s: capped at the 1 s timeout"

    with pytest.raises(OSError, match=r"HTTP 503 Service Unavailable \(after 2 retries\)"):
        storage.read(f"{web.url}/down/retry")
    assert web.hits("/down/retry") == 3, "the first try and 2 retries"
    assert client(SETTINGS)[1].parse_retry_after("3600") == 1.0


def test_logs_show_no_query_string_a_signature_could_be_in(web, caplog):
    storage = HttpStorage(SETTINGS)
    with caplog.at_level(logging.DEBUG, logger="urllib3"):
        storage.read(f"{web.url}/redirect?X-Amz-Signature=secret")
        storage.read(f"{web.url}/flaky/logs?X-Amz-Signature=secret")
    assert "Redirecting" in caplog.text and "Retry" in caplog.text and "?..." in caplog.text
    assert "secret" not in caplog.text


# --- sources: manifests at http(s) URLs ---------------------------------------------------------------


def test_manifests_at_urls_txt_csv_and_parquet_resolve_entries_like_links(web, site):
    lists = site / "lists"
    (lists / "m.txt").write_text("# nightly\n../photos/cat.jpg\n\n/photos/coffee.jpg\ns3://other/b.png\n")
    (lists / "m.csv").write_text("\ufeffuri,label\nsub/a.jpg,x\nhttps://cdn.example/c.png,y\n")
    pq.write_table(pa.table({"uri": ["../photos/rocket.jpg", None, "http://other.example/d.jpg?sig=1"]}),
                   lists / "m.parquet")
    base = web.url
    assert list(iter_uris([f"{base}/lists/m.txt"])) == \
        [f"{base}/photos/cat.jpg", f"{base}/photos/coffee.jpg", "s3://other/b.png"]
    assert list(iter_uris([f"{base}/lists/m.csv?token=abc"])) == [f"{base}/lists/sub/a.jpg", "https://cdn.example/c.png"]
    assert list(iter_uris([f"{base}/lists/m.parquet"])) == [f"{base}/photos/rocket.jpg", "http://other.example/d.jpg?sig=1"]
    assert list(iter_uris([f"{base}/photos/cat.jpg"])) == [f"{base}/photos/cat.jpg"], "an image URL is itself"
    cat = HttpStorage(SETTINGS).stat(f"{base}/photos/cat.jpg")
    assert cat is not None
    versions = [(e.uri, e.info) for e in iter_entries([f"{base}/photos/cat.jpg", f"{base}/photos/gone.jpg"], stat=True)]
    assert versions == [(f"{base}/photos/cat.jpg", cat), (f"{base}/photos/gone.jpg", None)], \
        "--skip-unchanged sees versions by HEAD"
    with pytest.raises(SourceError, match=r"lists/gone.txt: cannot read manifest.*not found \(HTTP 404"):
        list(iter_uris([f"{base}/lists/gone.txt"]))


def test_http_sources_that_cannot_work_fail_before_anything_is_enqueued(web):
    check_sources([f"{web.url}/lists/m.txt", f"{web.url}/photos/cat.jpg", "https://cdn.example/a.parquet?x=1"])
    for source in (f"{web.url}/photos/", f"{web.url}/page.html", "https://cdn.example"):
        with pytest.raises(SourceError, match="a web server cannot be listed like a folder"):
            check_sources([source])
    with pytest.raises(SourceError, match="no host name"):
        check_sources(["http:///photos/cat.jpg"])
    with pytest.raises(SourceError, match="not a valid URL"):
        check_sources(["http://[::1/cat.jpg"])


# --- end to end ---------------------------------------------------------------------------------------


def test_run_a_manifest_of_urls_then_again_reusing_what_did_not_change(web, site, tmp_path):
    expected = {**cases("run"), "photos/nightly.jpg": None}
    shutil.copy(PHOTOS / "cat.jpg", site / "photos" / "nightly.jpg")
    urls = write_manifest(site, "run.txt", web.url, "run") + [f"{web.url}/photos/nightly.jpg"]
    with open(site / "lists" / "run.txt", "a") as fh:
        fh.write("../photos/nightly.jpg\n")

    night1 = tmp_path / "night1.parquet"
    batchinfer("run", f"{web.url}/lists/run.txt", "--output", str(night1), *FAST, "--quiet", env=HTTP_ENV)
    frame = pd.read_parquet(night1)
    check_rows(frame, f"{web.url}/", expected)
    assert list(frame["uri"]) == urls, "rows in manifest order"
    good = frame[frame["error"].isna()].set_index("uri")
    assert good["label"].notna().all() and (good["score"] > 0).all()
    for name in ("cat.jpg", "motorcycle.png"):
        row = good.loc[f"{web.url}/photos/{name}"]
        assert row["size_bytes"] == (PHOTOS / name).stat().st_size and row["etag"] and pd.notna(row["modified"])

    (site / "photos" / "nightly.jpg").write_bytes((PHOTOS / "rocket.jpg").read_bytes())  # changed on the server
    night2 = tmp_path / "night2.parquet"
    again = batchinfer("run", f"{web.url}/lists/run.txt", "--output", str(night2), "--skip-unchanged", str(night1),
                       *FAST, "--quiet", env=HTTP_ENV)
    # reused: 5 photos, the redirect, flaky and throttled (now answering); HEAD shows each unchanged
    assert f"processed {len(expected) - 8} images, reused 8 rows" in again.stderr
    after = pd.read_parquet(night2)
    check_rows(after, f"{web.url}/", expected)
    changed = after.set_index("uri").loc[f"{web.url}/photos/nightly.jpg"]
    assert changed["size_bytes"] == (PHOTOS / "rocket.jpg").stat().st_size


def test_submit_a_manifest_of_urls_to_a_real_worker_then_collect(web, site, http_worker, redis_url, redis_client,
                                                                tmp_path):
    expected = cases("worker")
    urls = write_manifest(site, "worker.csv", web.url, "worker")
    job_id = submit(f"{web.url}/lists/worker.csv", "--output", str(tmp_path / "out"), *FAST, "--shard-size", "4",
                    "--batch-size", "4", broker=redis_url)
    out = tmp_path / "rows.parquet"
    batchinfer("collect", job_id, "--output", str(out), "--wait", "--timeout", "300", broker=redis_url)
    frame = pd.read_parquet(out)
    check_rows(frame, f"{web.url}/", expected)
    assert list(frame["uri"]) == urls
    assert frame[frame["error"].isna()]["label"].notna().all()
    status = batchinfer("status", job_id, broker=redis_url).stdout
    shards = -(-len(expected) // 4)
    errors = sum(v is not None for v in expected.values())
    assert f"{shards}/{shards} done" in status and f"{errors} error rows" in status, "no shard failed"

