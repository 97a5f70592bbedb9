"""`batchinfer serve`: the same numbers as `batchinfer run`, batching, and every bad request a 4xx.

One real server process (MobileNetV2 with calibrated random weights, a bearer token, small limits) and a
real HTTP client; the batcher's logic alone is tested with a stand-in model call.
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pandas as pd
import pytest

from producer.words import parse_size
from tests.conftest import PHOTOS, assert_one_line_error, batchinfer
from tests.serve_server import Server
from tests.weights import make_weights
from workers.contract import ModelSpec
from workers.errors import ConfigError
from workers.serve.batcher import DynamicBatcher
from workers.serve.service import ServeConfig, Service, batch_sizes

PHOTO_PATHS = sorted(PHOTOS.iterdir())
TOKEN = "s3cret-token"
MAX_BODY = 600_000


# -- the batcher, with a stand-in model call --------------------------------------------------------------------
def _batched(payloads, max_batch, max_wait, run=None, stagger=0.0):
    calls: list[list[int]] = []

    def run_batch(batch):
        calls.append(list(batch))
        if run:
            return run(batch)
        return [x * 10 for x in batch]

    async def main():
        async with DynamicBatcher(run_batch, max_batch, max_wait) as batcher:
            async def one(x):
                await asyncio.sleep(stagger * x)
                return await batcher.submit(x)
            return await asyncio.gather(*(one(x) for x in payloads), return_exceptions=True)

    return asyncio.run(main()), calls


def test_concurrent_requests_share_model_calls_up_to_max_batch():
    results, calls = _batched(list(range(20)), max_batch=8, max_wait=0.05)
    assert results == [x * 10 for x in range(20)]
    assert [len(c) for c in calls] == [8, 8, 4]


def test_max_batch_one_runs_each_image_alone():
    results, calls = _batched(list(range(5)), max_batch=1, max_wait=0.05)
    assert results == [0, 10, 20, 30, 40] and [len(c) for c in calls] == [1] * 5


def test_a_lone_request_waits_at_most_max_wait():
    results, calls = _batched([1, 2], max_batch=8, max_wait=0.0, stagger=0.05)
    assert results == [10, 20] and calls == [[1], [2]]  # the second came after the first's wait ended


def test_a_failed_model_call_fails_its_batch_and_the_next_batch_runs():
    def run(batch):
        if 3 in batch:
            raise RuntimeError("model broke")
        return [x for x in batch]

    results, calls = _batched([1, 2, 3, 4, 5, 6], max_batch=3, max_wait=0.05, run=run)
    assert [type(r).__name__ for r in results[:3]] == ["RuntimeError"] * 3
    assert results[3:] == [4, 5, 6] and len(calls) == 2


def test_a_request_that_went_away_is_not_computed():
    calls = []

    def run_batch(batch):
        calls.append(list(batch))
        return batch

    async def main():
        async with DynamicBatcher(run_batch, 4, 0.2) as batcher:
            gone = asyncio.ensure_future(batcher.submit("gone"))
            await asyncio.sleep(0.01)
            gone.cancel()
            return await batcher.submit("kept")

    assert asyncio.run(main()) == "kept" and calls == [["kept"]]


def test_batch_sizes_are_powers_of_two_up_to_max_batch():
    assert batch_sizes(1) == (1,) and batch_sizes(32) == (1, 2, 4, 8, 16, 32) and batch_sizes(12) == (1, 2, 4, 8, 12)


def test_sizes_parse_like_other_tools():
    assert parse_size("32M", "--max-body") == 32 << 20
    assert parse_size("1.5GiB", "--x") == int(1.5 * (1 << 30)) and parse_size("800kB", "--x") == 800 << 10
    assert parse_size("1000", "--x") == 1000
    for bad in ("", "lots", "-1G", "0", "12Q"):
        with pytest.raises(ConfigError, match="--max-body"):
            parse_size(bad, "--max-body")


def test_allowed_uris_cannot_leave_their_folder(tmp_path):
    service = Service(ServeConfig(ModelSpec(), allow_uris=(str(tmp_path / "ok"), "s3://bucket/public/")))
    assert service.allowed(str(tmp_path / "ok" / "a.jpg")) and service.allowed("s3://bucket/public/x.jpg")
    assert not service.allowed(str(tmp_path / "ok" / ".." / "secret.jpg"))
    assert not service.allowed(str(tmp_path / "okay.jpg")) and not service.allowed("s3://bucket/private/x.jpg")
    assert not service.allowed("/etc/passwd") and not Service(ServeConfig(ModelSpec())).allowed("/x.jpg")


# -- a real server ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_weights("MobileNetV2", tmp_path_factory.mktemp("weights"), PHOTO_PATHS)[0]


@pytest.fixture(scope="module")
def server(weights, tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve")
    s = Server("--weights", str(weights), "--task", "classify,features", "--top-k", "3", "--max-batch", "8",
               "--max-wait-ms", "20", "--max-images", "6", "--max-body", str(MAX_BODY), "--allow-uri", str(PHOTOS),
               log=folder / "serve.log", token=TOKEN)
    try:
        yield s.wait_ready()
    finally:
        s.stop()


@pytest.fixture(scope="module")
def run_rows(weights, tmp_path_factory):
    """What `batchinfer run` writes for the photos with the same model options."""
    out = tmp_path_factory.mktemp("run") / "rows.parquet"
    batchinfer("run", *map(str, PHOTO_PATHS), "--weights", str(weights), "--task", "classify,features",
               "--top-k", "3", "--output", str(out), "--quiet")
    return pd.read_parquet(out).set_index("uri")


def _upload(paths):
    return [("image", (p.name, p.read_bytes(), "image/jpeg")) for p in paths]


@pytest.mark.backends
def test_predict_equals_batchinfer_run(server, run_rows):
    with server.client() as client:
        one_by_one = [client.post("/predict", files=_upload([p])).json()["results"][0] for p in PHOTO_PATHS]
        together = client.post("/predict", files=_upload(PHOTO_PATHS)).json()["results"]
        by_uri = client.post("/predict", json={"uris": [str(p) for p in PHOTO_PATHS]}).json()["results"]
    assert [r["uri"] for r in by_uri] == [str(p) for p in PHOTO_PATHS]
    assert len({run_rows.loc[str(p), "label"] for p in PHOTO_PATHS}) > 1  # informative weights: labels differ
    for path, a, b, c in zip(PHOTO_PATHS, one_by_one, together, by_uri):
        expected = run_rows.loc[str(path)]
        assert a["filename"] == b["filename"] == path.name
        for got in (a, b, c):
            assert got["error"] is None and got["label"] == expected["label"]
            assert (got["width"], got["height"]) == (expected["width"], expected["height"])
            assert [t["index"] for t in got["top_k"]] == list(expected["top_k_indices"])
            assert [t["label"] for t in got["top_k"]] == list(expected["top_k_labels"])
            np.testing.assert_allclose([t["score"] for t in got["top_k"]], expected["top_k_scores"], atol=1e-5)
            assert got["score"] == got["top_k"][0]["score"]


def test_features_equal_batchinfer_run_as_json_and_raw_float32(server, run_rows):
    with server.client() as client:
        as_json = client.post("/features", files=_upload(PHOTO_PATHS)).json()
        raw = client.post("/features", files=_upload(PHOTO_PATHS), headers={"Accept": "application/octet-stream"})
    expected = np.stack([run_rows.loc[str(p), "features"] for p in PHOTO_PATHS])
    assert as_json["dims"] == {"features": 1280}
    np.testing.assert_allclose(np.array([r["features"] for r in as_json["results"]]), expected, atol=1e-5)
    assert raw.headers["content-type"] == "application/octet-stream"
    assert raw.headers["x-batchinfer-shape"] == f"{len(PHOTO_PATHS)},1280"
    matrix = np.frombuffer(raw.content, "<f4").reshape(len(PHOTO_PATHS), 1280)
    np.testing.assert_allclose(matrix, expected, atol=1e-5)


def test_a_broken_image_beside_good_ones_is_an_error_row(server):
    files = _upload(PHOTO_PATHS[:1]) + [("image", ("notes.jpg", b"not a jpeg at all", "image/jpeg"))]
    with server.client() as client:
        r = client.post("/predict", files=files)
    assert r.status_code == 200
    good, bad = r.json()["results"]
    assert good["error"] is None and good["label"]
    assert bad["filename"] == "notes.jpg" and "not an image" in bad["error"] and bad["label"] is None


def _bad_requests(server):
    """Each bad request, the status it must get and a word its error must contain."""
    big = b"\xff\xd8" + b"x" * (MAX_BODY + 10)

    def chunked():
        yield big[: MAX_BODY // 2]
        yield big[MAX_BODY // 2:]

    photo = PHOTO_PATHS[0]
    return [
        ("not an image", dict(files=[("image", ("a.txt", b"hello", "text/plain"))]), 422, "not an image"),
        ("empty body", dict(), 400, "empty request"),
        ("empty multipart", dict(files=[], data={}), 400, ""),
        ("too large", dict(files=[("image", ("big.jpg", big, "image/jpeg"))]), 413, "--max-body"),
        ("too large, chunked", dict(content=chunked(), headers={"content-type": "image/jpeg"}), 413, "--max-body"),
        ("too many images", dict(files=_upload([photo] * 7)), 413, "--max-images"),
        ("unknown field", dict(files=[("picture", (photo.name, photo.read_bytes(), "image/jpeg"))]), 400,
         "unknown field 'picture'"),
        ("text field", dict(data={"image": "cat.jpg"}, files=_upload([photo])), 400, "file upload"),
        ("form, no files", dict(data={"image": "cat.jpg"}), 415, "multipart/form-data"),
        ("bad json", dict(content=b"{nope", headers={"content-type": "application/json"}), 400, "not valid JSON"),
        ("json, unknown key", dict(json={"uris": [str(photo)], "k": 3}), 400, "unknown field 'k'"),
        ("json, not a list", dict(json={"uris": "x"}), 400, "list"),
        ("json, no images", dict(json={"uris": []}), 400, "no images"),
        ("uri not allowed", dict(json={"uris": ["/etc/hostname"]}), 403, "--allow-uri"),
        ("escaping uri", dict(json={"uris": [f"{PHOTOS}/../../pyproject.toml"]}), 403, "--allow-uri"),
        ("missing file", dict(json={"uris": [str(PHOTOS / "nope.jpg")]}), 422, "file not found"),
        ("wrong type", dict(content=b"abc", headers={"content-type": "text/plain"}), 415, "content type"),
    ]


def test_every_bad_request_is_a_4xx_with_a_json_error_and_the_server_lives(server):
    with server.client() as client:
        for name, kwargs, status, needle in _bad_requests(server):
            r = client.post("/predict", **kwargs)
            assert r.status_code == status, (name, r.status_code, r.text[:300])
            assert needle in r.json()["error"], (name, r.json())
        assert client.get("/search", params={"uri": "x"}).status_code == 404  # no index here
        assert client.post("/features", files=_upload(PHOTO_PATHS[:1]), params={"column": "nope"}).status_code == 400
        assert client.get("/nowhere").status_code == 404
        assert client.get("/predict").status_code == 405
        assert client.get("/healthz").json() == {"status": "ok"}
        assert client.post("/predict", files=_upload(PHOTO_PATHS[:1])).json()["results"][0]["error"] is None
    assert server.proc.poll() is None
    assert "Traceback" not in server.text()


def test_the_token_is_required_except_for_the_probes(server):
    photo = _upload(PHOTO_PATHS[:1])
    assert httpx.post(server.url + "/predict", files=photo).status_code == 401
    wrong = httpx.post(server.url + "/predict", files=photo, headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and wrong.headers["www-authenticate"] == "Bearer"
    assert httpx.get(server.url + "/metrics").status_code == 401
    assert [httpx.get(server.url + probe).status_code for probe in ("/healthz", "/readyz")] == [200, 200]


def _metric(text: str, name: str) -> float:
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")
               or line.startswith(name + "{"))


def test_concurrent_clients_are_batched_and_metrics_show_it(server):
    with server.client() as client:
        before = client.get("/metrics").text
    photo = PHOTO_PATHS[1]

    def one(_):
        with server.client() as c:
            return c.post("/predict", files=_upload([photo])).json()["results"][0]["label"]

    start = threading.Barrier(16)

    def together(i):
        start.wait()
        return one(i)

    with ThreadPoolExecutor(16) as pool:
        labels = list(pool.map(together, range(16)))
    assert len(set(labels)) == 1
    with server.client() as client:
        after = client.get("/metrics").text
    calls = _metric(after, "batchinfer_batch_size_count") - _metric(before, "batchinfer_batch_size_count")
    images = _metric(after, "batchinfer_batch_size_sum") - _metric(before, "batchinfer_batch_size_sum")
    assert images == 16 and calls < 16  # some calls carried several requests' images
    assert 'batchinfer_http_requests_total{method="POST",route="/predict",status="200"}' in after
    assert "batchinfer_http_request_seconds_bucket" in after and _metric(after, "batchinfer_ready") == 1


def test_service_description(server):
    with server.client() as client:
        info = client.get("/").json()
    assert info["model"] == "MobileNetV2" and info["ready"] and info["max_batch"] == 8
    assert info["feature_columns"] == {"features": 1280} and info["top_k"] == 3


# -- the command line --------------------------------------------------------------------------------------------
def test_bad_serve_options_are_one_line(cli, tmp_path):
    for args, needle in [
        (["--max-batch", "0"], "--max-batch"),
        (["--max-body", "huge"], "--max-body"),
        (["--batch-size", "8"], "--max-batch"),
        (["--decode", "gpu"], "CPU"),
        (["--index", str(tmp_path), "--model", "ResNet50"], "--model"),
    ]:
        assert_one_line_error(cli("serve", "--weights", "none", *args), needle)


def test_a_taken_port_and_a_model_that_cannot_load_are_one_line(weights, tmp_path):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        proc = batchinfer("serve", "--weights", str(weights), "--port", str(port), check=False, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr.strip().splitlines()[-1]

    env = {"KERAS_HOME": str(tmp_path / "keras"), "HTTPS_PROXY": "http://127.0.0.1:1",
           "HTTP_PROXY": "http://127.0.0.1:1"}
    s = Server("--model", "MobileNetV2", "--weights", "imagenet", log=tmp_path / "serve.log", env=env)
    try:
        assert s.proc.wait(180) != 0
    finally:
        s.stop()
    last = s.text().strip().splitlines()[-1]
    assert last.startswith("batchinfer: error: the model could not be loaded") and "--weights PATH" in last
    assert "Traceback" not in s.text()


def test_sigterm_lets_requests_in_flight_finish(weights, tmp_path):
    s = Server("--weights", str(weights), "--max-batch", "4", "--max-wait-ms", "300", log=tmp_path / "serve.log")
    try:
        s.wait_ready()
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(lambda: s.client().post("/predict", files=_upload(PHOTO_PATHS[:1])))
            import time

            time.sleep(0.1)  # the request waits in the batcher (--max-wait-ms 300) when SIGTERM comes
            code = s.terminate()
            r = answer.result(timeout=60)
        assert r.status_code == 200 and r.json()["results"][0]["label"]
        assert code in (0, 143) and "Traceback" not in s.text()
    finally:
        s.stop()


def test_json_is_what_the_readme_shows(server):
    with server.client() as client:
        body = client.post("/predict", files=_upload(PHOTO_PATHS[:1])).json()
    row = body["results"][0]
    assert set(row) == {"filename", "label", "score", "top_k", "width", "height", "error"}
    assert set(row["top_k"][0]) == {"index", "label", "score"}
    json.dumps(body)  # plain JSON types only


# -- search over HTTP ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def search_server(weights, tmp_path_factory):
    """A features job on the photos -> `batchinfer index` -> `batchinfer serve --index`."""
    folder = tmp_path_factory.mktemp("search")
    features = folder / "features.parquet"
    batchinfer("run", str(PHOTOS), "--weights", str(weights), "--task", "classify,features", "--output",
               str(features), "--quiet")
    batchinfer("index", str(features), "--output", str(folder / "index"))
    s = Server("--index", str(folder / "index"), "--max-batch", "4", log=folder / "serve.log")
    try:
        yield s.wait_ready()
    finally:
        s.stop()


def test_search_by_indexed_uri_and_by_upload_finds_the_photo_first(search_server):
    with search_server.client() as client:
        for path in PHOTO_PATHS:
            by_uri = client.get("/search", params={"uri": str(path), "k": 3}).json()
            assert by_uri["metric"] == "cosine" and by_uri["higher_is_closer"]
            hits = by_uri["results"][0]["neighbors"]
            assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["uri"] == str(path)
            assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4) and hits[0]["score"] >= hits[1]["score"]
        uploaded = client.post("/search", params={"k": 2}, files=_upload(PHOTO_PATHS)).json()["results"]
        assert [r["neighbors"][0]["uri"] for r in uploaded] == [str(p) for p in PHOTO_PATHS]
        assert all(r["query"] == p.name and r["error"] is None for r, p in zip(uploaded, PHOTO_PATHS))
        # the index's model also classifies: /predict works on the same server
        assert client.post("/predict", files=_upload(PHOTO_PATHS[:1])).json()["results"][0]["label"]


def test_bad_search_requests_are_4xx(search_server):
    with search_server.client() as client:
        photo = str(PHOTO_PATHS[0])
        assert client.get("/search", params={"uri": photo, "k": "many"}).status_code == 400
        assert client.get("/search", params={"uri": photo, "k": 0}).status_code == 400
        assert client.get("/search").status_code == 400
        missing = client.get("/search", params={"uri": "/nowhere/x.jpg"})
        assert missing.status_code == 404 and "not in the index" in missing.json()["error"]
        broken = client.post("/search", files=[("image", ("x.jpg", b"nope", "image/jpeg"))])
        assert broken.status_code == 422 and broken.json()["results"][0]["error"]
        assert client.get("/healthz").status_code == 200
    assert "Traceback" not in search_server.text()
