"""`batchinfer report`: one self-contained HTML page of a job or an output, read back like a browser would.

Pages are parsed with the standard library's HTML parser; one is opened in the system's Chromium (headless,
through Playwright) to prove it renders and makes no request. Outputs come from real `batchinfer run`s on
real photos mixed with broken files, one job runs through a real worker and Redis, and a synthetic
1,000,000-row output checks that the page stays small.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.conftest import PHOTOS, ROOT, assert_one_line_error, batchinfer, collect, submit

LABELS = ["reddish", "greenish", "bluish"]
# a model with a readable answer: the mean colour of the image, through a softmax (no training, no download)
COLOUR_MODEL = """
import sys
import keras, numpy as np
inputs = keras.Input((32, 32, 3))
x = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255.0)(inputs))
head = keras.layers.Dense(3, activation="softmax")
model = keras.Model(inputs, head(x))
head.set_weights([(np.eye(3) * 12 - 4).astype("float32"), np.zeros(3, "float32")])
model.save(sys.argv[1])
"""
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"


# --- reading a page back ------------------------------------------------------------------------------------

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str | None], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)

    def words(self) -> str:
        """The text as a browser shows it: runs of white space as one space."""
        return " ".join(self.text().split())

    def find_all(self, tag: str, **attrs: str) -> list[Node]:
        found = []
        for child in self.children:
            if isinstance(child, Node):
                if child.tag == tag and all(attrs[k] in (child.attrs.get(k) or "").split() for k in attrs):
                    found.append(child)
                found += child.find_all(tag, **attrs)
        return found

    def by_id(self, ident: str) -> Node:
        for child in self.children:
            if isinstance(child, Node):
                if child.attrs.get("id") == ident:
                    return child
                with_id = child.by_id_or_none(ident)
                if with_id is not None:
                    return with_id
        raise AssertionError(f"no element with id {ident!r}")

    def by_id_or_none(self, ident: str) -> Node | None:
        try:
            return self.by_id(ident)
        except AssertionError:
            return None


class Page(HTMLParser):
    """A tree of the page (``root``), built the way a browser nests elements."""

    def __init__(self, html: str) -> None:
        super().__init__(convert_charrefs=True)
        self.root = self.current = Node("#document", {}, None)
        self.feed(html)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, dict(attrs), self.current)
        self.current.children.append(node)
        if tag not in VOID:
            self.current = node

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.current.children.append(Node(tag, dict(attrs), self.current))

    def handle_endtag(self, tag: str) -> None:
        node: Node | None = self.current
        while node is not None and node.tag != tag:
            node = node.parent
        if node is not None and node.parent is not None:
            self.current = node.parent

    def handle_data(self, data: str) -> None:
        self.current.children.append(data)


def read_page(path: Path) -> Node:
    return Page(path.read_text(encoding="utf-8")).root


def images_of(node: Node) -> list[Image.Image]:
    """Every ``<img>``'s embedded picture, decoded (the page embeds JPEG data URIs only)."""
    out = []
    for img in node.find_all("img"):
        src = img.attrs["src"] or ""
        assert src.startswith("data:image/jpeg;base64,"), src[:60]
        picture = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        picture.load()
        out.append(picture)
    return out


def error_groups(page: Node) -> dict[str, list[tuple[str, str]]]:
    """Reason -> the (URI, message) rows listed under it."""
    groups = {}
    for details in page.by_id("errors").find_all("details"):
        summary = details.find_all("summary")[0]
        reason = "".join(c for c in summary.children if isinstance(c, str)).strip()
        rows = [(tds[0].text(), tds[1].text()) for tds in (tr.find_all("td") for tr in details.find_all("tr"))]
        groups[reason] = rows
    return groups


def report(cli, source, output: Path | str, *extra: str, timeout: float = 120) -> Node:
    """`batchinfer report` as a user runs it, with TensorFlow and Keras unimportable (the `cli` fixture); the
    page read back (an S3 output through the storage backend)."""
    result = cli("report", str(source), "--output", str(output), "--quiet", *extra, timeout=timeout)
    assert result.returncode == 0, result.stderr
    assert f"wrote {output}" in result.stderr
    if str(output).startswith("s3://"):
        from workers.storage import storage_for

        return Page(storage_for(str(output)).read(str(output)).decode("utf-8")).root
    return read_page(Path(output))


def cards_of(page: Node) -> dict[str, str]:
    """The Counts section's cards: label -> value."""
    return {c.find_all("div")[0].text(): c.find_all("div")[1].text() for c in page.find_all("div", **{"class": "card"})}


def timings_table(page: Node) -> dict[str, str]:
    """The stage table of the Timings section: stage name -> seconds."""
    out = {}
    for tr in page.by_id("timings").find_all("tr"):
        tds = tr.find_all("td")
        if len(tds) == 3:
            out[tds[0].text()] = tds[1].text().replace(",", "")
    return out


# --- outputs of real runs ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def colour_model(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("colour")
    subprocess.run([sys.executable, "-c", COLOUR_MODEL, str(folder / "colour.keras")], check=True,
                   capture_output=True, timeout=300)
    (folder / "labels.txt").write_text("\n".join(LABELS) + "\n")
    return folder / "colour.keras", folder / "labels.txt"


@pytest.fixture(scope="module")
def classified(mixed_folder, colour_model, tmp_path_factory) -> Path:
    """`batchinfer run` of photos and broken files (error rows), with the colour model: a Parquet file."""
    folder, _ = mixed_folder
    out = tmp_path_factory.mktemp("classified") / "colours.parquet"
    model, labels = colour_model
    batchinfer("run", str(folder), "--model-path", str(model), "--labels", str(labels), "--shard-size", "4",
               "--output", str(out), "--quiet")
    return out


@pytest.fixture(scope="module")
def featured(mixed_folder, tmp_path_factory) -> Path:
    """`batchinfer run --task features` of the same folder (MobileNetV2, seeded random weights, 96 px)."""
    folder, _ = mixed_folder
    out = tmp_path_factory.mktemp("featured") / "features.parquet"
    batchinfer("run", str(folder), "--task", "features", "--weights", "none", "--input-size", "96",
               "--shard-size", "4", "--output", str(out), "--quiet")
    return out


def test_classify_report_lists_every_error_thumbnails_classes_and_timings(classified, mixed_folder, cli, tmp_path):
    from producer.report.sample import reason_of
    from workers.schema import read_job_metadata

    _, expected = mixed_folder
    table = pq.read_table(classified)
    rows = table.to_pylist()
    page = report(cli, classified, tmp_path / "report.html")

    head = page.find_all("head")[0]
    assert any(m.attrs.get("http-equiv") == "Content-Security-Policy" and m.attrs.get("content") == CSP
               for m in head.find_all("meta"))
    assert not page.find_all("script") and not page.find_all("link") and not page.find_all("iframe")
    meta = read_job_metadata(table.schema)
    assert meta["model"] in page.find_all("h1")[0].words()
    assert meta["job_id"] in page.find_all("h1")[0].words()

    errors = [(r["uri"], r["error"]) for r in rows if r["error"]]
    assert len(errors) == sum(1 for want in expected.values() if want) == 5
    groups = error_groups(page)
    for uri, message in errors:
        assert (uri, message) in groups[reason_of(message)], (uri, message)
    assert sum(len(listed) for listed in groups.values()) == len(errors), "each error row listed once"
    assert "decompression bomb" in groups and "empty file (0 bytes)" in groups

    labels = [r["label"] for r in rows if not r["error"]]
    shown = {tr.find_all("td")[0].text(): int(tr.find_all("td")[1].text().replace(",", ""))
             for tr in page.by_id("classes").find_all("tr") if tr.find_all("td")}
    assert shown == {label: labels.count(label) for label in set(labels)}
    assert len(shown) >= 2, "the colour model tells the photos and the coloured files apart"
    grids = [h3.text().split(" · ")[0] for h3 in page.by_id("classes").find_all("h3")[1:]]
    assert sorted(grids) == sorted(shown)

    pictures = images_of(page)
    assert len(pictures) >= 14 and all(max(p.size) <= 128 for p in pictures)
    cat = next(img for img in page.by_id("least").find_all("img") if img.attrs["alt"] == "cat.jpg")
    assert cat.attrs["width"] == "128" and int(cat.attrs["height"]) < 128, "thumbnails keep the aspect ratio"
    assert len(page.by_id("least").find_all("figure")) == len(labels), "fewer rows than the limit: all of them"

    stages = timings_table(page)
    assert {"predict (model)", "waiting for decoded images", "write (sink)"} <= set(stages)
    assert float(stages["predict (model)"]) > 0
    assert len(page.by_id("timings").find_all("svg")) == 2, "shard timeline and stage breakdown"
    assert "embedded" in page.by_id("timings").words(), "the one worker of `run`"
    assert len(page.by_id("scores").find_all("svg")) == 1


def test_features_report_projects_the_vectors_with_thumbnails(featured, cli, tmp_path):
    table = pq.read_table(featured, columns=["uri", "error"])
    page = report(cli, featured, tmp_path / "features.html")
    section = page.by_id("features")
    assert section.find_all("svg") and "dimension 1280" in section.words()
    marks = section.find_all("img", **{"class": "pt"})
    ok = sum(1 for e in table.column("error").to_pylist() if e is None)
    assert 1 <= len(marks) <= ok
    for mark in marks:
        style = mark.attrs["style"] or ""
        left, top = (float(style.split(f"{side}: ")[1].split("%")[0]) for side in ("left", "top"))
        assert 0 <= left <= 100 and 0 <= top <= 100, style
    assert images_of(section)
    assert page.by_id_or_none("classes") is None
    listed = sum(len(rows) for rows in error_groups(page).values())
    assert listed == table.num_rows - ok


def test_csv_and_jsonl_outputs_have_rows_but_no_timings(classified, featured, cli, tmp_path):
    from producer.collect import write_tables

    csv_path, jsonl_path = tmp_path / "colours.csv", tmp_path / "features.jsonl"
    write_tables([pq.read_table(classified)], str(csv_path), "csv")  # what `run --output x.csv` writes
    write_tables([pq.read_table(featured)], str(jsonl_path), "jsonl")
    from_parquet = report(cli, classified, tmp_path / "a.html")
    from_csv = report(cli, csv_path, tmp_path / "b.html")
    assert error_groups(from_csv) == error_groups(from_parquet)
    assert from_csv.by_id("classes").find_all("table")[0].words() == \
        from_parquet.by_id("classes").find_all("table")[0].words()
    assert [len(g.find_all("figure")) for g in from_csv.by_id("classes").find_all("div", **{"class": "grid"})] == \
        [len(g.find_all("figure")) for g in from_parquet.by_id("classes").find_all("div", **{"class": "grid"})]
    two = report(cli, classified, tmp_path / "two.html", "--samples", "2")
    sizes = [len(g.find_all("figure")) for g in two.by_id("classes").find_all("div", **{"class": "grid"})]
    assert max(sizes) == 2 and min(sizes) >= 1, sizes
    assert "Timings are not recorded in CSV output" in from_csv.by_id("timings").words()
    from_jsonl = report(cli, jsonl_path, tmp_path / "c.html")
    assert from_jsonl.by_id("features").find_all("img", **{"class": "pt"})
    assert "not recorded in JSONL output" in from_jsonl.find_all("main")[0].words()


def test_report_from_s3_to_s3(classified, s3, cli, tmp_path):
    """A file and a folder on S3 (downloaded, not read into memory whole); the page uploaded whole."""
    client = s3.client()
    client.create_bucket(Bucket="reports")
    client.upload_file(str(classified), "reports", "run/colours.parquet")
    for shard in (0, 1):  # a folder of shard files, as the Parquet sink writes it
        client.upload_file(str(classified), "reports", f"job/shard-{shard:06d}.parquet")
    from_file = report(cli, "s3://reports/run/colours.parquet", "s3://reports/pages/file.html")
    client.download_file("reports", "pages/file.html", str(tmp_path / "file.html"))
    page = read_page(tmp_path / "file.html")
    assert error_groups(page) == error_groups(from_file) and len(error_groups(page)) >= 4
    assert len(page.by_id("timings").find_all("svg")) == 2
    folder = report(cli, "s3://reports/job/", tmp_path / "folder.html")
    assert cards_of(folder)["images"] == str(2 * pq.read_metadata(classified).num_rows)
    assert "no _manifest.json" in folder.find_all("div", **{"class": "note"})[0].words()


# --- a job through a real worker ---------------------------------------------------------------------------


def test_report_of_a_job_id_its_folder_and_its_collected_file(worker, redis_url, cli, tmp_path):
    from workers.schema import read_job_metadata, read_job_record

    images = tmp_path / "in"
    images.mkdir()
    for photo in sorted(PHOTOS.iterdir()):
        shutil.copy(photo, images / photo.name)
    (images / "empty.jpg").write_bytes(b"")
    job_id = submit(str(images), "--weights", "none", "--input-size", "96", "--shard-size", "3",
                    "--output", str(tmp_path / "out"), broker=redis_url)
    collect(job_id, tmp_path / "all.parquet", broker=redis_url, timeout=240)

    schema = pq.read_schema(tmp_path / "all.parquet")
    assert read_job_metadata(schema)["job_id"] == job_id, "the job metadata key is as it was"
    record = read_job_record(schema)
    assert record is not None and record["job_id"] == job_id and record["done"] == 2
    assert record["shards"]["id"] == [0, 1] and [n.split("@")[0] for n in record["workers"]["name"]] == [worker.name]
    assert set(record["shards"]["stages"]) == {"read_decode", "wait", "predict", "write"}
    assert len(json.dumps(record)) < 2000

    pages = {"job": report(cli, job_id, tmp_path / "job.html", "--broker", redis_url),
             "folder": report(cli, tmp_path / "out", tmp_path / "folder.html"),
             "file": report(cli, tmp_path / "all.parquet", tmp_path / "file.html")}
    for what, page in pages.items():
        timings = page.by_id("timings")
        assert len(timings.find_all("svg")) == 2, what
        assert worker.name in timings.words(), what
        assert float(timings_table(page)["predict (model)"]) > 0, what
        cards = cards_of(page)
        assert cards["images"] == "6" and cards["errors"] == "1" and cards["shards done"] == "2", (what, cards)
        assert [u for u, _ in error_groups(page)["empty file (0 bytes)"]] == [str(images / "empty.jpg")], what
    assert "job state from Redis" in pages["job"].by_id("job").words()

    # the Redis sink: rows read back from Redis, shard by shard
    redis_job = submit(str(images), "--weights", "none", "--input-size", "96", "--shard-size", "3", "--sink", "redis",
                       broker=redis_url)
    collect(redis_job, tmp_path / "redis.parquet", broker=redis_url, timeout=240)
    page = report(cli, redis_job, tmp_path / "redis.html", "--broker", redis_url)
    assert "rows from its redis output" in page.by_id("job").words()
    assert [u for u, _ in error_groups(page)["empty file (0 bytes)"]] == [str(images / "empty.jpg")]
    assert len(page.by_id("least").find_all("img")) == 5, "the five photos, read back from Redis"


def test_a_job_not_finished_shows_what_is_done(redis_url, redis_client, cli, tmp_path):
    """Real job state in Redis, one shard of two done (its file written as the sink writes it)."""
    from workers.jobstate import Holder
    from workers.redis_jobstore import RedisJobStore
    from workers.schema import output_schema, with_job_metadata
    from workers.sinks.parquet import shard_uri

    store = RedisJobStore.from_url(redis_url)
    out = tmp_path / "out"
    out.mkdir()
    store.create_job("half-done", {"model": {"name": "MobileNetV2", "task": "classify"},
                                   "output": {"sink": "parquet", "path": str(out)}})
    for shard in (0, 1):
        store.add_shard("half-done", shard, [f"/photos/{shard}-{i}.jpg" for i in range(2)])
    store.finish_submit("half-done", 2, 4)
    holder = Holder("tester@host")
    store.begin("half-done", 0, holder, 60, 3)
    time.sleep(0.05)
    schema = with_job_metadata(output_schema("classify"), {"job_id": "half-done", "model": "MobileNetV2",
                                                          "task": "classify"})
    rows = pa.table({"uri": ["/photos/0-0.jpg", "/photos/0-1.jpg"], "error": [None, "file not found"],
                     "label": ["tabby", None], "score": [0.5, None]})
    full = pa.table({f.name: rows.column(f.name) if f.name in rows.column_names else pa.nulls(2, f.type)
                     for f in schema}).cast(schema)
    pq.write_table(full, shard_uri(str(out), 0))
    store.finish("half-done", 0, holder.token, {"images": 2, "errors": 1, "seconds": 0.05,
                                                "stages": {"read_decode": 0.02, "wait": 0.01, "predict": 0.03,
                                                           "write": 0.005}})
    store.begin("half-done", 1, Holder("tester@host"), 60, 3)

    page = report(cli, "half-done", tmp_path / "half.html", "--broker", redis_url)
    note = page.find_all("div", **{"class": "note"})[0].words()
    assert "not finished: 1 of 2 shards are done (1 running)" in note
    assert error_groups(page)["file not found"] == [("/photos/0-1.jpg", "file not found")]
    assert "tester@host" in page.by_id("timings").words()


# --- the page in a browser ---------------------------------------------------------------------------------


def test_page_renders_in_chromium_and_requests_nothing(classified, cli, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("chromium is not installed (apt-get install chromium; .ci/run does it)")
    from playwright.sync_api import sync_playwright

    output = tmp_path / "report.html"
    report(cli, classified, output)
    url = output.as_uri()
    requests: list[str] = []
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda request: requests.append(request.url))
            page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.goto(url, wait_until="load")
            shown = page.evaluate("Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
            total = page.evaluate("document.images.length")
            png = page.screenshot(full_page=True)
        finally:
            browser.close()
    assert requests == [url], "the page's own file is the only request"
    assert not problems, problems  # a CSP violation would be a console error
    assert total > 10 and shown == total, "every embedded image decodes in the browser"
    shot = Image.open(io.BytesIO(png)).convert("RGB")
    assert shot.height > 2000, "the whole page, not one screen"
    colours = shot.getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 500, "plots and photos, not a blank page"
    not_white = float((np.asarray(shot).min(axis=2) < 235).mean())
    assert not_white > 0.05, not_white  # a blank page has none


# --- one-line errors, atomic output, hostile text ------------------------------------------------------------


def test_errors_are_one_line_and_the_output_is_all_or_nothing(classified, redis_url, no_tf_path, cli, tmp_path):
    output = tmp_path / "report.html"
    report(cli, classified, output)
    before = output.read_bytes()

    assert_one_line_error(cli("report", str(tmp_path / "nope" / "x.parquet"), "-o", str(output)),
                          "no such file or folder")
    assert_one_line_error(cli("report", "no-such-job", "-o", str(output), "--broker", redis_url),
                          "unknown job 'no-such-job'")
    (tmp_path / "a-file").write_text("x")
    assert_one_line_error(cli("report", str(classified), "-o", str(tmp_path / "a-file" / "r.html")),
                          "cannot write to")
    assert_one_line_error(cli("report", str(classified), "-o", str(tmp_path)), "is a folder")
    assert_one_line_error(cli("report", str(classified), "-o", str(output), "--samples", "0"), "--samples")
    not_parquet = tmp_path / "notes.parquet"
    not_parquet.write_text("hello")
    assert_one_line_error(cli("report", str(not_parquet), "-o", str(output)), "cannot read it as Parquet")
    assert output.read_bytes() == before, "a failed report leaves the previous file as it was"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "notes.parquet", "report.html"], \
        "no temporary file left"

    stubs = tmp_path / "stubs"
    (stubs / "jinja2").mkdir(parents=True)
    (stubs / "jinja2" / "__init__.py").write_text("raise ImportError('No module named jinja2')\n")
    without = cli("report", str(classified), "-o", str(tmp_path / "x.html"),
                  env={"PYTHONPATH": os.pathsep.join([str(stubs), no_tf_path, str(ROOT)])})
    assert_one_line_error(without, "needs jinja2", "pip install 'keras-batch-inference[report]'")


def test_untrusted_text_stays_text(cli, tmp_path):
    """URIs, messages, labels and worker names from the data are escaped, in the HTML and in the SVG plots."""
    from workers.jobrecord import job_record
    from workers.jobstate import JobState
    from workers.schema import output_schema, with_job_metadata, with_job_record

    evil = '"><script>alert(1)</script><img src=http://example.com/x.png>'
    job = JobState("evil", {}, 1000.0, True, 2, 3, first_started=1001.0, finished_at=1004.0)
    for shard, worker_name in enumerate((evil, "$\\alpha$ worker")):
        job.shards[shard] = {"state": "done", "images": 2 - shard, "errors": 1 - shard, "started": 1001.0 + shard,
                             "finished": 1002.5 + shard, "seconds": 1.5, "worker": worker_name,
                             "stages": {"read_decode": 0.5, "wait": 0.2, "predict": 1.0, "write": 0.1}}
    schema = with_job_record(with_job_metadata(output_schema("classify,features", feature_dim=3),
                                               {"job_id": "evil", "model": evil, "task": "classify,features"}),
                             job_record(job))
    table = pa.table({"uri": [f"/x/{evil}.jpg", "/x/a$b$.jpg", "/x/y.jpg"],
                      "error": [f"cannot read {evil}: <b>boom</b>", None, None],
                      "label": [None, evil, "$x^2$"], "score": [None, 0.5, 0.25],
                      "features": [None, [1.0, 2.0, 3.0], [3.0, 1.0, 0.0]]})
    full = pa.table({f.name: table.column(f.name) if f.name in table.column_names else pa.nulls(3, f.type)
                     for f in schema}).cast(schema)
    pq.write_table(full, tmp_path / "evil.parquet")
    page = report(cli, tmp_path / "evil.parquet", tmp_path / "evil.html")
    assert not page.find_all("script")
    for img in page.find_all("img") + page.find_all("image"):
        assert (img.attrs.get("src") or img.attrs.get("xlink:href") or "").startswith("data:image/")
    assert evil in page.find_all("h1")[0].words()
    assert f"/x/{evil}.jpg" in [u for rows in error_groups(page).values() for u, _ in rows]
    assert evil in page.by_id("classes").words() and evil in page.by_id("timings").words()


# --- scale -------------------------------------------------------------------------------------------------


def test_a_million_rows_make_a_page_of_a_few_megabytes(cli, tmp_path):
    """Sampled, not embedded: bounded thumbnails, bounded error list, exact counts (timing: scripts/bench_report.py)."""
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from bench_report import synthetic_classify
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    source = tmp_path / "million.parquet"
    synthetic_classify(source, 1_000_000, error_rate=0.012)
    errors = pq.read_table(source, columns=["error"]).column("error").null_count
    errors = 1_000_000 - errors
    output = tmp_path / "million.html"
    page = report(cli, source, output, timeout=180)
    assert output.stat().st_size < 4_000_000, output.stat().st_size
    cards = cards_of(page)
    assert cards["images"] == "1,000,000" and cards["errors"] == f"{errors:,}" and cards["shards done"] == "3,907"
    listed = sum(len(rows) for rows in error_groups(page).values())
    assert errors > 10_000 and listed == 10_000
    assert f"{errors - 10_000:,} more are" in page.by_id("errors").words()
    figures = page.find_all("figure")
    assert len(figures) <= 16 * 8 + 24, "a sample of each of the largest classes, and the least confident"
    assert len(page.by_id("classes").find_all("tr")) == 51, "the 50 largest classes listed"


# --- the pure parts --------------------------------------------------------------------------------------


def test_errors_group_by_reason_without_their_paths():
    from producer.report.sample import reason_of

    assert reason_of("truncated image: image file is truncated (3 bytes not processed)") == "truncated image"
    assert reason_of("cannot read s3://bucket/a/b.jpg: AccessDenied") == reason_of(
        "cannot read s3://bucket/c.jpg: AccessDenied") == "cannot read …"
    assert reason_of("cannot decode image: OSError: broken data stream") == "cannot decode image: OSError"
    assert reason_of("HTTP 404 for https://example.com/a.jpg") == reason_of("HTTP 404 for https://example.com/b.jpg")
    assert reason_of("empty file (0 bytes)") == "empty file (0 bytes)"
    assert reason_of("read/decode failed") == "read/decode failed", "only whole paths are masked"


def test_samples_are_uniform_bounded_and_the_same_each_time():
    from producer.report.sample import Limits, Sampler

    def run(chunks: int) -> tuple:
        sampler = Sampler(Limits(per_class=5, least=3, points=50))
        for c in range(chunks):
            n = 1000
            labels = ["a" if i % 10 else "b" for i in range(n)]
            table = pa.table({"uri": [f"/{c}/{i}.jpg" for i in range(n)], "error": [None] * n, "label": labels,
                              "score": pa.array([((c * n + i) % 997) / 997 for i in range(n)], pa.float32()),
                              "features": pa.FixedSizeListArray.from_arrays(
                                  pa.array([float(i % 7) for i in range(3 * n)], pa.float32()), 3)})
            sampler.add(table)
        return sampler.finish()

    first, again = run(20), run(20)
    assert first.classes == {"a": 18_000, "b": 2_000}
    assert [r.uri for r in first.class_samples["a"]] == [r.uri for r in again.class_samples["a"]]
    assert all(len(rows) == 5 for rows in first.class_samples.values())
    assert len({r.uri.split("/")[1] for r in first.class_samples["a"]}) > 1, "drawn from the whole input"
    assert [round(r.score, 4) for r in first.least] == [0.0] * 3
    assert first.vectors is not None and first.vectors.shape == (50, 3)
    assert int(first.histogram.sum()) == 20_000


def test_a_job_record_stays_small_with_many_shards_and_keeps_exact_totals():
    from workers.jobrecord import MAX_SHARDS, job_record
    from workers.jobstate import JobState

    job = JobState("big", {}, 0.0, True, 40_000, 10_240_000)
    for i in range(40_000):
        job.shards[i] = {"state": "done", "images": 256, "errors": 1, "started": i * 0.1, "finished": i * 0.1 + 2,
                         "seconds": 2.0, "worker": f"w{i % 16}", "stages": {"wait": 0.5, "predict": 1.4}}
    record = job_record(job)
    assert record["images"] == 10_240_000 and record["stages"] == {"wait": 20_000.0, "predict": 56_000.0}
    assert record["shards"]["sampled"] and len(record["shards"]["id"]) == MAX_SHARDS
    assert sum(record["workers"]["shards"]) == 40_000
    assert len(json.dumps(record, separators=(",", ":"))) < 400_000


def test_the_verdict_tells_a_starved_model_from_a_busy_one():
    from producer.report.timings import verdict

    assert "starved" in verdict({"wait": 6.0, "predict": 3.0, "write": 0.5}, 10.0)
    assert "busy" in verdict({"wait": 1.0, "predict": 8.0, "write": 0.5}, 10.0)
    assert "sink" in verdict({"wait": 2.0, "predict": 4.0, "write": 3.5}, 10.0)
