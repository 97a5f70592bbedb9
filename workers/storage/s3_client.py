"""The S3 client (boto3) and botocore's errors as this package's (``workers.storage.s3`` uses them).

- **Connections**: the pool is sized for ``BATCHINFER_IO_THREADS`` concurrent GETs (boto3 clients are
  thread-safe; ``S3Storage`` keeps one per process).
- **Endpoint**: ``BATCHINFER_S3_ENDPOINT_URL`` (what ``--s3-endpoint-url`` sets), else boto3's own
  ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``; a custom endpoint gets path-style addressing.
- **Credentials and region** come only from boto3's standard chain (environment, ``~/.aws`` files,
  instance and container roles); nothing here takes a secret.
- **Retries** happen inside botocore: mode ``AWS_RETRY_MODE`` (default ``adaptive``: it also slows down
  after throttling), ``AWS_MAX_ATTEMPTS`` attempts (default 5). They cover throttling (``SlowDown``),
  5xx answers and connection resets.

Per object: a missing key is ``FileNotFoundError`` and access denied ``PermissionError`` (that image's
error row). Everything that would fail every object of a shard (no such bucket, invalid or expired
credentials, the endpoint unreachable after retries) is ``ShardError``: the shard is retried, then marked
failed; a bucket that does not exist is ``ConfigError`` at once.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping
from typing import Any

from workers.errors import ConfigError, ShardError

ENDPOINT_ENV = "BATCHINFER_S3_ENDPOINT_URL"
DEFAULT_RETRY_MODE = "adaptive"
DEFAULT_MAX_ATTEMPTS = 5

_NOT_FOUND = {"NoSuchKey", "404", "NotFound"}
DENIED = {"AccessDenied", "403", "Forbidden", "AllAccessDisabled"}
_ARCHIVED = {"InvalidObjectState"}  # Glacier / Deep Archive: restore the object first


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    _, sep, rest = uri.partition("://")
    bucket, _, key = rest.partition("/")
    if not sep or not bucket:
        raise ConfigError(f"{uri}: an S3 URI is s3://BUCKET/KEY")
    return bucket, key


def endpoint_url(env: dict[str, str] | None = None) -> str | None:
    """The custom endpoint in force, if any (ours first, then the variables boto3 reads itself)."""
    values: Mapping[str, str] = os.environ if env is None else env
    return values.get(ENDPOINT_ENV) or values.get("AWS_ENDPOINT_URL_S3") or values.get("AWS_ENDPOINT_URL") or None


def make_client() -> Any:
    """A new boto3 S3 client configured from the environment (see the module docstring)."""
    try:
        import boto3
        from botocore.config import Config
        from botocore.exceptions import BotoCoreError
    except ImportError as exc:
        raise ConfigError(f"s3:// needs boto3 ({exc}): pip install boto3") from exc
    from workers.settings import Settings

    raw_attempts = os.environ.get("AWS_MAX_ATTEMPTS") or str(DEFAULT_MAX_ATTEMPTS)
    try:
        attempts = int(raw_attempts)
    except ValueError:
        raise ConfigError(f"AWS_MAX_ATTEMPTS must be an integer, got {raw_attempts!r}") from None
    custom = endpoint_url()
    config = Config(
        retries={"mode": os.environ.get("AWS_RETRY_MODE") or DEFAULT_RETRY_MODE, "max_attempts": attempts},
        max_pool_connections=max(10, Settings.from_env().io_threads + 2),
        connect_timeout=10,
        read_timeout=60,
        s3={"addressing_style": "path"} if custom else None,  # MinIO and Ceph rarely have per-bucket DNS names
    )
    try:
        # A session of its own: boto3's default session is not thread-safe, the client is.
        return boto3.session.Session().client("s3", endpoint_url=os.environ.get(ENDPOINT_ENV) or None,
                                              config=config)
    except (BotoCoreError, ValueError) as exc:
        raise ConfigError(f"cannot configure the S3 client: {exc}") from exc


def convert(exc: Exception, uri: str, action: str, per_object: bool = True) -> Exception:
    """A botocore exception as this package's: see the module docstring."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):  # BotoCoreError: unreachable endpoint, no credentials, timeouts
        return ShardError(f"cannot {action} {uri}: {exc}")
    error = exc.response.get("Error", {})
    code = str(error.get("Code", ""))
    if code == "NoSuchBucket":  # retrying will not create it: fail the shard at once
        return ConfigError(f"cannot {action} {uri}: bucket {split_uri(uri)[0]!r} does not exist (NoSuchBucket)")
    if per_object and code in _NOT_FOUND:
        return FileNotFoundError(errno.ENOENT, "not found", uri)
    if per_object and code in DENIED:
        return PermissionError(errno.EACCES, "access denied", uri)
    if per_object and code in _ARCHIVED:
        return OSError(errno.EIO, "archived object (restore it first)", uri)
    if code in DENIED:
        return ShardError(f"cannot {action} {uri}: access denied ({code})")
    message = error.get("Message") or str(exc)
    return ShardError(f"cannot {action} {uri}: {code}: {message}")
