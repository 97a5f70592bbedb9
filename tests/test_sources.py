"""Unit tests of source scanning (folders, manifests) and sharding, on real temporary folders."""

from __future__ import annotations

import csv
import inspect
import itertools
import os
import time
from pathlib import Path

import pytest

import producer.sources as sources_mod
from producer.manifests import read_manifest, read_manifest_rows
from producer.shards import shards
from producer.sources import Filters, check_sources, is_image_name, iter_uris, walk_folder
from workers.errors import SourceError

IMAGE_NAMES = ["A.JPG", "b.Jpeg", "c.png", "d.BMP", "e.gif", "f.WebP", "g.tif", "h.TIFF"]
NON_IMAGE_NAMES = ["notes.txt", "x.jpg.bak", "jpg", "README", "photo.jpgx", "archive.tar.gz", "data.csv"]


def touch(root: Path, *relpaths: str) -> list[str]:
    """Create empty files (and their folders); return their absolute paths as strings."""
    out = []
    for rel in relpaths:
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")
        out.append(str(path))
    return out


def rel(paths, root: Path) -> list[str]:
    return [os.path.relpath(p, root).replace(os.sep, "/") for p in paths]


def scan(root: Path, filters: Filters = Filters()) -> list[str]:
    """What ``walk_folder`` finds, relative to ``root`` and sorted (order has tests of its own);
    fails on duplicates."""
    found = rel(walk_folder(str(root), filters), root)
    assert len(found) == len(set(found)), found
    return sorted(found)


# --- folders -----------------------------------------------------------------------------------------


def test_walk_finds_every_image_extension_case_insensitively(tmp_path):
    touch(tmp_path, *IMAGE_NAMES, *NON_IMAGE_NAMES)
    found = list(walk_folder(str(tmp_path)))
    assert sorted(rel(found, tmp_path)) == sorted(IMAGE_NAMES)
    assert all(os.path.isabs(p) for p in found)


@pytest.mark.parametrize("name", IMAGE_NAMES + ["x.JPG", "y.TiF", "z.jpeg"])
def test_is_image_name_accepts_images(name):
    assert is_image_name(name)


@pytest.mark.parametrize("name", NON_IMAGE_NAMES)
def test_is_image_name_rejects_other_files(name):
    assert not is_image_name(name)


def test_walk_is_recursive_and_ignores_other_files(tmp_path):
    touch(tmp_path, "top.jpg", "a/one.png", "a/b/c/deep.JPEG", "a/b/notes.txt", "a/x.jpg.bak",
          "folder.jpg/inside.png")
    found = scan(tmp_path)
    assert found == ["a/b/c/deep.JPEG", "a/one.png", "folder.jpg/inside.png", "top.jpg"]
    # a folder whose name looks like an image is walked into, never yielded itself
    assert "folder.jpg" not in found


def test_walk_skips_hidden_files_and_folders(tmp_path):
    touch(tmp_path, "visible.jpg", ".hidden.jpg", ".git/objects/x.jpg", "sub/.cache/y.png", "sub/ok.png",
          "sub/.also-hidden.png")
    assert scan(tmp_path) == ["sub/ok.png", "visible.jpg"]


def test_a_hidden_root_given_explicitly_is_still_walked(tmp_path):
    root = tmp_path / ".dataset"
    touch(root, "a.jpg", ".b.jpg")
    assert scan(root) == ["a.jpg"]


def test_walk_of_an_empty_folder_yields_nothing(tmp_path):
    (tmp_path / "empty").mkdir()
    assert list(walk_folder(str(tmp_path / "empty"))) == []


def test_walk_of_a_relative_root_yields_absolute_paths(tmp_path, monkeypatch):
    touch(tmp_path, "imgs/a.jpg")
    monkeypatch.chdir(tmp_path)
    assert list(walk_folder("imgs")) == [str(tmp_path / "imgs" / "a.jpg")]


def test_walk_order_is_deterministic(tmp_path):
    touch(tmp_path, *(f"d{i % 7}/{(i * 37) % 101:03d}.jpg" for i in range(200)), "top.png")
    first = list(walk_folder(str(tmp_path)))
    assert len(first) == len(set(first)) == len(list(tmp_path.rglob("*.*")))
    for _ in range(3):
        assert list(walk_folder(str(tmp_path))) == first


def test_walk_order_is_sorted_by_name_whatever_the_creation_order(tmp_path):
    names = ["b.jpg", "B.png", "10.jpg", "9.jpg", "_x.gif", "a.jpeg", "ä.jpg", "Z.webp"]
    subfolders = ["sub2", "Sub1", "sub10"]
    for name in reversed(names):  # created last-first: a listing in creation order is not sorted
        touch(tmp_path, name)
    for sub in reversed(subfolders):
        touch(tmp_path, *(f"{sub}/{name}" for name in reversed(names[:3])))
    found = rel(walk_folder(str(tmp_path)), tmp_path)
    files_first = sorted(names) + [f"{sub}/{name}" for sub in sorted(subfolders) for name in sorted(names[:3])]
    assert found == files_first, "files of a folder sorted by name (code points), then its subfolders in name order"
    assert found[:4] == ["10.jpg", "9.jpg", "B.png", "Z.webp"]


def test_symlink_loop_terminates_and_yields_each_file_once(tmp_path):
    root = tmp_path / "root"
    touch(root, "top.jpg", "sub/inner.png", "sub/deeper/leaf.gif")
    os.symlink(root, root / "sub" / "up")  # sub/up -> its parent's parent: a loop
    os.symlink(root / "sub", root / "sub" / "deeper" / "back")  # another loop, one level lower
    found = list(itertools.islice(walk_folder(str(root)), 1000))  # bounded, in case of a loop
    assert sorted(rel(found, root)) == ["sub/deeper/leaf.gif", "sub/inner.png", "top.jpg"]
    assert len(set(found)) == len(found)


def test_symlinked_folder_outside_the_root_is_followed(tmp_path):
    touch(tmp_path, "elsewhere/far.jpg", "root/near.jpg")
    try:
        os.symlink(tmp_path / "elsewhere", tmp_path / "root" / "linked")
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not supported here")
    assert scan(tmp_path / "root") == ["linked/far.jpg", "near.jpg"]


def test_broken_folder_symlink_is_ignored(tmp_path):
    touch(tmp_path, "ok.jpg")
    try:
        os.symlink(tmp_path / "missing", tmp_path / "dangling")
    except (OSError, NotImplementedError):
        pytest.skip("symlinks not supported here")
    assert scan(tmp_path) == ["ok.jpg"]


# --- include / exclude -------------------------------------------------------------------------------


@pytest.fixture
def pets(tmp_path) -> Path:
    touch(tmp_path, "cats/tom.jpg", "cats/felix.png", "dogs/rex.jpg", "dogs/puppies/bo.png", "bird.gif")
    return tmp_path


def test_include_by_name(pets):
    found = scan(pets, Filters(include=("*.png",)))
    assert found == ["cats/felix.png", "dogs/puppies/bo.png"]


def test_include_by_relative_path(pets):
    assert scan(pets, Filters(include=("cats/*",))) == ["cats/felix.png", "cats/tom.jpg"]


def test_exclude_by_relative_path(pets):
    found = scan(pets, Filters(exclude=("cats/*",)))
    assert found == ["bird.gif", "dogs/puppies/bo.png", "dogs/rex.jpg"]


def test_exclude_by_name(pets):
    found = scan(pets, Filters(exclude=("*.png", "bird.*")))
    assert found == ["cats/tom.jpg", "dogs/rex.jpg"]


def test_include_and_exclude_combine(pets):
    found = scan(pets, Filters(include=("dogs/*", "cats/*"), exclude=("*.png",)))
    assert found == ["cats/tom.jpg", "dogs/rex.jpg"]


def test_several_includes_are_a_union(pets):
    found = scan(pets, Filters(include=("bird.gif", "rex.jpg")))
    assert found == ["bird.gif", "dogs/rex.jpg"]


def test_filters_accepts():
    f = Filters(include=("cats/*", "*.png"), exclude=("*/bad*",))
    assert f.accepts("cats/a.jpg")
    assert f.accepts("dogs/b.png")
    assert not f.accepts("dogs/b.jpg")
    assert not f.accepts("cats/bad.jpg")
    assert Filters().accepts("anything/at/all.jpg")


# --- manifests ---------------------------------------------------------------------------------------


def test_txt_manifest_skips_blanks_and_comments_and_resolves_relative_paths(tmp_path, monkeypatch):
    lists = tmp_path / "lists"
    lists.mkdir()
    manifest = lists / "m.txt"
    manifest.write_text(
        "# a comment\n"
        "\n"
        "imgs/a.jpg\n"
        "   \n"
        "  ../b.png  \n"
        "   # indented comment\n"
        "/abs/c.jpg\n"
        "s3://bucket/d.jpg\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)  # relative entries follow the manifest, not the working folder
    got = list(read_manifest(str(manifest)))
    assert got == [
        os.path.join(str(lists), "imgs/a.jpg"),
        os.path.join(str(lists), "../b.png"),
        "/abs/c.jpg",
        "s3://bucket/d.jpg",
    ]


def test_txt_manifest_given_by_relative_path(tmp_path, monkeypatch):
    (tmp_path / "m.txt").write_text("a.jpg\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    assert list(read_manifest("m.txt")) == [os.path.join(str(tmp_path), "a.jpg")]


def test_csv_manifest_with_uri_column(tmp_path):
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "uri"])
        w.writerow(["cat", "imgs/cat.jpg"])
        w.writerow(["empty", ""])
        w.writerow(["abs", "/data/x.png"])
        w.writerow(["remote", "gs://b/y.jpg"])
    assert list(read_manifest(str(manifest))) == [
        os.path.join(str(tmp_path), "imgs/cat.jpg"),
        "/data/x.png",
        "gs://b/y.jpg",
    ]


def test_csv_manifest_without_uri_column_raises_source_error(tmp_path):
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,label\na.jpg,cat\n", encoding="utf-8")
    with pytest.raises(SourceError, match="uri"):
        list(read_manifest(str(manifest)))
    with pytest.raises(SourceError, match="uri"):
        list(iter_uris([str(manifest)]))


def test_parquet_manifest_with_uri_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    manifest = tmp_path / "m.parquet"
    table = pa.table({"label": ["a", "b", "c", "d"], "uri": ["imgs/a.jpg", None, "/abs/c.png", "s3://b/d.jpg"]})
    pq.write_table(table, manifest)
    assert list(read_manifest(str(manifest))) == [
        os.path.join(str(tmp_path), "imgs/a.jpg"),
        "/abs/c.png",
        "s3://b/d.jpg",
    ]


def test_manifest_rows_carry_the_kept_columns(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "m.csv").write_text("id,uri,caption\n7,a.jpg,a cat\n,,skipped\n08,/abs/b.png,\n9,c.jpg\n",
                                    encoding="utf-8")
    rows = list(read_manifest_rows(str(tmp_path / "m.csv"), [("caption", "string"), ("id", "string")]))
    assert rows == [(str(tmp_path / "a.jpg"), ("a cat", "7")), ("/abs/b.png", (None, "08")),
                    (str(tmp_path / "c.jpg"), (None, "9"))], "CSV cells as text; empty or absent cells are null"
    pq.write_table(pa.table({"uri": ["a.jpg", None, "b.jpg"], "id": pa.array([1, 2, None], pa.int32()),
                             "tag": pa.array(["x", "y", None]).dictionary_encode()}), tmp_path / "m.parquet")
    rows = list(read_manifest_rows(str(tmp_path / "m.parquet"), [("id", "int64"), ("tag", "string")]))
    assert rows == [(str(tmp_path / "a.jpg"), (1, "x")), (str(tmp_path / "b.jpg"), (None, None))]
    assert list(read_manifest_rows(str(tmp_path / "m.parquet"))) == [(str(tmp_path / "a.jpg"), ()),
                                                                     (str(tmp_path / "b.jpg"), ())]
    with pytest.raises(SourceError, match="no column 'nope' to keep"):
        list(read_manifest_rows(str(tmp_path / "m.csv"), [("nope", "string")]))


def test_large_parquet_manifest_keeps_order(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    uris = [f"/imgs/{i:06d}.jpg" for i in range(25_000)]  # more than one 10,000-row batch
    pq.write_table(pa.table({"uri": uris}), tmp_path / "big.parquet", row_group_size=7_000)
    assert list(read_manifest(str(tmp_path / "big.parquet"))) == uris


def test_parquet_manifest_without_uri_column_raises_source_error(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(SourceError, match="uri"):
        list(read_manifest(str(tmp_path / "m.parquet")))


def test_manifest_extension_is_case_insensitive(tmp_path):
    (tmp_path / "M.TXT").write_text("a.jpg\n", encoding="utf-8")
    assert list(read_manifest(str(tmp_path / "M.TXT"))) == [os.path.join(str(tmp_path), "a.jpg")]
    check_sources([str(tmp_path / "M.TXT")])


def test_unknown_manifest_kind_raises_source_error(tmp_path):
    (tmp_path / "m.json").write_text("[]", encoding="utf-8")
    with pytest.raises(SourceError):
        list(read_manifest(str(tmp_path / "m.json")))


def test_csv_manifest_with_utf8_bom(tmp_path):
    (tmp_path / "m.csv").write_bytes("uri\na.jpg\n".encode("utf-8-sig"))
    assert list(read_manifest(str(tmp_path / "m.csv"))) == [os.path.join(str(tmp_path), "a.jpg")]


def test_csv_manifest_whitespace_only_uri_is_skipped(tmp_path):
    (tmp_path / "m.csv").write_text("uri\n   \na.jpg\n", encoding="utf-8")
    assert list(read_manifest(str(tmp_path / "m.csv"))) == [os.path.join(str(tmp_path), "a.jpg")]


# --- check_sources -----------------------------------------------------------------------------------


def test_check_sources_accepts_folders_images_manifests_and_file_urls(tmp_path):
    touch(tmp_path, "imgs/a.jpg", "single.PNG")
    (tmp_path / "m.txt").write_text("imgs/a.jpg\n", encoding="utf-8")
    (tmp_path / "m.csv").write_text("uri\nimgs/a.jpg\n", encoding="utf-8")
    check_sources([str(tmp_path / "imgs"), str(tmp_path / "single.PNG"), str(tmp_path / "m.txt"),
                   str(tmp_path / "m.csv"), "file://" + str(tmp_path / "imgs")])


def test_check_sources_missing_path(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(SourceError, match="no such file or folder") as info:
        check_sources([str(tmp_path), missing])
    assert missing in str(info.value)


def test_check_sources_unsupported_file(tmp_path):
    touch(tmp_path, "report.docx")
    with pytest.raises(SourceError, match="not a folder, image or manifest"):
        check_sources([str(tmp_path / "report.docx")])


def test_check_sources_unsupported_scheme():
    with pytest.raises(SourceError, match="gs:// sources are not supported"):
        check_sources(["gs://bucket/prefix"])


# --- iter_uris ---------------------------------------------------------------------------------------


def test_iter_uris_chains_sources_in_order(tmp_path):
    touch(tmp_path, "imgs/a.jpg", "single.png", "imgs/notes.txt")
    (tmp_path / "m.txt").write_text("x.jpg\ny.png\n", encoding="utf-8")
    got = list(iter_uris([str(tmp_path / "m.txt"), str(tmp_path / "imgs"), str(tmp_path / "single.png"),
                          "file://" + str(tmp_path / "imgs")]))
    assert got == [
        os.path.join(str(tmp_path), "x.jpg"),
        os.path.join(str(tmp_path), "y.png"),
        str(tmp_path / "imgs" / "a.jpg"),
        str(tmp_path / "single.png"),
        str(tmp_path / "imgs" / "a.jpg"),
    ]


def test_iter_uris_applies_name_filters_to_folders_and_manifests(tmp_path):
    touch(tmp_path, "imgs/a.jpg", "imgs/b.png")
    (tmp_path / "m.txt").write_text("c.jpg\nd.png\n", encoding="utf-8")
    got = list(iter_uris([str(tmp_path / "imgs"), str(tmp_path / "m.txt")], Filters(exclude=("*.png",))))
    assert got == [str(tmp_path / "imgs" / "a.jpg"), os.path.join(str(tmp_path), "c.jpg")]


def test_iter_uris_is_a_lazy_generator(tmp_path):
    touch(tmp_path, "a/1.jpg", "b/2.jpg")
    consumed: list[str] = []

    def recording_sources():
        for s in (str(tmp_path / "a"), str(tmp_path / "b"), str(tmp_path / "not-there-yet")):
            consumed.append(s)
            yield s

    it = iter_uris(recording_sources())
    assert inspect.isgenerator(it)
    assert consumed == []  # nothing happens before the first item is asked for
    assert next(it) == str(tmp_path / "a" / "1.jpg")
    assert consumed == [str(tmp_path / "a")]  # later sources are not even looked at yet
    assert next(it) == str(tmp_path / "b" / "2.jpg")
    assert consumed == [str(tmp_path / "a"), str(tmp_path / "b")]


def test_walk_folder_is_a_generator_and_does_not_list_everything_up_front(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(2000):
        (flat / f"{i:05d}.jpg").write_bytes(b"")
    gen = walk_folder(str(flat))
    assert inspect.isgenerator(gen)
    started = time.perf_counter()
    first = next(gen)
    assert time.perf_counter() - started < 2.0
    rest = list(gen)
    assert len({first, *rest}) == 2000
    assert os.path.dirname(first) == str(flat) and first.endswith(".jpg")


def test_walk_folder_scans_subfolders_only_when_reached(tmp_path, monkeypatch):
    for d in range(50):
        for f in range(40):
            touch(tmp_path, f"d{d:02d}/{f:02d}.jpg")  # 2,000 files in 50 folders
    scanned: list[str] = []
    real_scandir = os.scandir

    def counting_scandir(path):
        scanned.append(os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(sources_mod.os, "scandir", counting_scandir)
    gen = iter_uris([str(tmp_path)])
    assert scanned == []
    assert os.path.dirname(next(gen)) == str(tmp_path / "d00")
    assert scanned == [str(tmp_path), str(tmp_path / "d00")]  # not the other 49 folders
    assert sum(1 for _ in gen) == 1999
    assert len(scanned) == 51


def test_txt_manifest_is_read_lazily(tmp_path):
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.jpg\n", encoding="utf-8")
    gen = read_manifest(str(manifest))
    assert inspect.isgenerator(gen)
    manifest.unlink()  # a generator opens the file only when iterated
    with pytest.raises(SourceError, match="No such file"):
        next(gen)


# --- shards ------------------------------------------------------------------------------------------


class Recording:
    """An iterator that records how many items were taken from it."""

    def __init__(self, items):
        self._it = iter(items)
        self.taken = 0

    def __iter__(self):
        return self

    def __next__(self):
        item = next(self._it)
        self.taken += 1
        return item


def test_shards_split_into_numbered_chunks():
    uris = (f"u{i}" for i in range(7))
    assert list(shards(uris, 3)) == [(0, ["u0", "u1", "u2"]), (1, ["u3", "u4", "u5"]), (2, ["u6"])]


def test_shards_exact_multiple_has_no_empty_tail():
    assert list(shards((f"u{i}" for i in range(6)), 3)) == [(0, ["u0", "u1", "u2"]), (1, ["u3", "u4", "u5"])]


def test_shards_of_nothing_is_nothing():
    assert list(shards(iter(()), 5)) == []


def test_shards_size_one():
    assert list(shards(["a", "b"], 1)) == [(0, ["a"]), (1, ["b"])]


@pytest.mark.parametrize("size", [0, -1])
def test_shards_rejects_size_below_one(size):
    with pytest.raises(ValueError):
        next(shards(["a"], size))


def test_shards_consume_the_input_lazily():
    source = Recording(f"u{i}" for i in range(10))
    gen = shards(source, 4)
    assert inspect.isgenerator(gen)
    assert source.taken == 0
    assert next(gen) == (0, ["u0", "u1", "u2", "u3"])
    assert source.taken == 4  # exactly one shard, not one item more
    assert next(gen) == (1, ["u4", "u5", "u6", "u7"])
    assert source.taken == 8
    assert next(gen) == (2, ["u8", "u9"])
    with pytest.raises(StopIteration):
        next(gen)


def test_shards_work_on_an_endless_stream():
    gen = shards((str(i) for i in itertools.count()), 1000)
    assert next(gen) == (0, [str(i) for i in range(1000)])
    shard_id, chunk = next(gen)
    assert shard_id == 1 and chunk[0] == "1000" and len(chunk) == 1000
