"""Where a task may make a worker read and write, and which model files may run their own code.

A task message is data that whoever reaches the broker can write, so the worker, not the producer, is
where places are checked. ``BATCHINFER_ALLOWED_ROOTS`` (``Settings.allowed_roots``) lists local folders,
``s3://bucket/prefix`` and ``https://host/prefix`` roots; unset, a worker goes anywhere its user can.
``BATCHINFER_TRUST_MODELS`` (``Settings.trusted_models``): ``1`` or local folders whose model files may
run code (SavedModel graphs, Lambda layers); unset, none may.

    >>> roots = Roots.parse("/data,s3://photos/raw", "BATCHINFER_ALLOWED_ROOTS")
    >>> roots.contains("/data/a/../b.jpg"), roots.contains("/data/../etc/passwd")
    (True, False)
    >>> roots.contains("s3://photos/raw/a.jpg"), roots.contains("s3://photos/rawhide/a.jpg")
    (True, False)

Local paths are resolved (``os.path.realpath``: symbolic links, ``..``, relative paths against the
working folder) before they are compared, so the place checked is the place that would be opened; a
link inside a root pointing outside is outside. Object keys and URL paths are compared as written, on a
``/`` boundary, and a ``.`` or ``..`` segment in them is outside (a server may resolve it).
An image outside is its row's error (``OUTSIDE``); anything else outside fails the shard at once
(``ConfigError``), before it is read or written.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from workers.errors import ConfigError
from workers.storage import is_remote, scheme_of
from workers.storage.local import to_path

OUTSIDE = "outside BATCHINFER_ALLOWED_ROOTS"
HOW_TO_TRUST = ("to run it, set BATCHINFER_TRUST_MODELS=1 on the workers, or add its folder to "
                "BATCHINFER_TRUST_MODELS, if you trust whoever wrote it")
REMOTE = ("s3", "http", "https")


@dataclass(frozen=True)
class Roots:
    """Places a URI must be under. ``folders``: resolved local folders, each ending in the separator;
    ``prefixes``: ``(scheme, bucket or host[:port], key or path prefix)``, the prefix without a ``/`` at
    either end (empty: the whole bucket or site); ``anywhere``: no limit; ``text``: as configured."""

    folders: tuple[str, ...] = ()
    prefixes: tuple[tuple[str, str, str], ...] = ()
    anywhere: bool = False
    text: str = ""

    @classmethod
    def parse(cls, raw: str | None, name: str, local_only: bool = False) -> Roots:
        """Comma-separated roots from the variable ``name``; unset or empty: anywhere."""
        entries = [e.strip() for e in (raw or "").split(",") if e.strip()]
        if not entries:
            return ANYWHERE
        folders: list[str] = []
        prefixes: list[tuple[str, str, str]] = []
        for entry in entries:
            scheme = scheme_of(entry)
            if scheme == "file":
                path = os.path.expanduser(to_path(entry))
                if not os.path.isabs(path):
                    raise ConfigError(f"{name}: {entry!r} is a relative folder; give absolute folders")
                folders.append(os.path.join(os.path.realpath(path), ""))
            elif local_only:
                raise ConfigError(f"{name} lists local folders (model files are read from the worker's disk), "
                                  f"got {entry!r}")
            elif scheme in REMOTE:
                prefixes.append(_remote_root(entry, scheme, name))
            else:
                raise ConfigError(f"{name}: {entry!r} is not a local folder, s3:// or http(s):// prefix")
        return cls(tuple(folders), tuple(prefixes), text=",".join(entries))

    def contains(self, uri: str) -> bool:
        """Whether ``uri`` is under one of the roots (see the module docstring for how it is compared)."""
        if self.anywhere:
            return True
        scheme = scheme_of(uri)
        if scheme == "file":
            if not self.folders:
                return False
            path = os.path.realpath(to_path(uri))
            return any(path.startswith(folder) or path + os.sep == folder for folder in self.folders)
        parts = _remote_parts(uri, scheme) if scheme in REMOTE and self.prefixes else None
        if parts is None:
            return False
        where, key = parts
        return any((scheme, where) == (s, w) and (not p or key == p or key.startswith(p + "/"))
                   for s, w, p in self.prefixes)

    def extended(self, *uris: str | None) -> Roots:
        """These roots and the places ``uris`` name (the operator's own settings, such as the spool)."""
        more = ",".join(os.path.abspath(u) if not is_remote(u) else u for u in uris if u)
        if self.anywhere or not more:
            return self
        added = Roots.parse(more, "BATCHINFER_SPOOL")
        return Roots(self.folders + added.folders, self.prefixes + added.prefixes, text=self.text)

    def check(self, uri: str, what: str) -> None:
        """``ConfigError`` naming ``what`` unless ``uri`` is under a root."""
        if not self.contains(uri):
            raise ConfigError(f"{what} {uri} is {OUTSIDE} ({self.text})")


ANYWHERE = Roots(anywhere=True)
NOWHERE = Roots(text="none")


def trusted_models(raw: str | None) -> Roots:
    """``BATCHINFER_TRUST_MODELS``: ``1`` trusts every model file, a list of folders those under them,
    unset (or ``0``) none."""
    value = (raw or "").strip()
    if value.lower() in ("", "0", "false", "no"):
        return NOWHERE
    if value.lower() in ("1", "true", "yes"):
        return ANYWHERE
    return Roots.parse(value, "BATCHINFER_TRUST_MODELS", local_only=True)


def _segments_ok(key: str) -> bool:
    return not any(part in (".", "..") for part in unquote(key).replace("\\", "/").split("/"))


def _remote_parts(uri: str, scheme: str) -> tuple[str, str] | None:
    """(bucket or host[:port], key or path without its leading ``/``), or None when it cannot match a root."""
    if scheme == "s3":
        bucket, _, key = uri[len("s3://"):].partition("/")
        return (bucket, key) if bucket and _segments_ok(key) else None
    try:
        split = urlsplit(uri)
        host, port = split.hostname, split.port
    except ValueError:  # a port that is not a number
        return None
    if not host or not _segments_ok(split.path):
        return None
    default = 443 if scheme == "https" else 80
    return (host.lower() + (f":{port}" if port and port != default else ""), split.path.lstrip("/"))


def _remote_root(entry: str, scheme: str, name: str) -> tuple[str, str, str]:
    if scheme != "s3":
        split = urlsplit(entry)
        if split.username or split.password or split.query or split.fragment:
            raise ConfigError(f"{name}: {entry!r}: give a URL prefix without user, query or fragment")
    parts = _remote_parts(entry, scheme)
    if parts is None:
        raise ConfigError(f"{name}: {entry!r} names no bucket or host, or has a '.' or '..' segment")
    return scheme, parts[0], parts[1].strip("/")


def check_task(task: Any, roots: Roots, spool: str | None = None) -> None:
    """Every place ``task`` (a ``ShardTask``) names except its images, before anything is read or written:
    the output, the shard list (also allowed under the operator's ``BATCHINFER_SPOOL``), the model file
    with its sidecar, the weights and the labels. ``ConfigError`` for the first outside."""
    if roots.anywhere:
        return
    if task.output.path:
        roots.check(task.output.path, "output")
    if task.uris_ref and not task.uris_ref.startswith("state:"):  # ``workers.spool.STATE``: kept in Redis
        roots.extended(spool).check(task.uris_ref, "shard list")
    check_model(task.model, roots)


def check_model(model: Any, roots: Roots) -> None:
    """The files a ``ModelSpec`` loads: the model file with its sidecar, the weights and the labels."""
    if model.model_path:
        roots.check(model.model_path, "model")
        roots.check(model.model_path.rstrip("/") + ".json", "model sidecar")
    if model.weights and model.weights not in ("imagenet", "none") and not model.model_path:
        roots.check(model.weights, "weights file")
    if model.labels:
        roots.check(model.labels, "labels file")


def check_carry(files: list[str], roots: Roots) -> None:
    """The previous output files an incremental run's carry shard copies rows from."""
    for uri in files:
        roots.check(uri, "previous output")
