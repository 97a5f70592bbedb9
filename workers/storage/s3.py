"""S3 storage: ``s3://bucket/key`` through boto3, on AWS or any S3-compatible endpoint (MinIO, Ceph).

**One client per process**, made on first use (so after the Celery pool forks, never at import) and
shared by the pipeline's I/O threads; its endpoint, credentials, retries and the mapping of botocore's
errors (per object: the image's error row; for the whole store: ``ShardError``) are
``workers.storage.s3_client``'s, so the pipeline never sees botocore. A body cut off mid-download is read
again here.
"""

from __future__ import annotations

import contextlib
import io
import os
import threading
from collections.abc import Iterator
from typing import Any

from workers.errors import ConfigError, ShardError
from workers.storage.base import FileInfo, PendingFile
from workers.storage.s3_client import DENIED, convert, make_client, split_uri

_READS = 3  # tries of one GET whose body breaks off mid-stream (botocore retries only the request)


class S3Upload(PendingFile):
    """A local temporary file that ``commit()`` uploads to ``s3://bucket/key`` in one PUT.

    S3 stores an object whole or not at all, so readers never see half a file; a multipart upload
    (large files) also appears only when it completes. The temporary file is removed either way.
    """

    def __init__(self, storage: S3Storage, uri: str) -> None:
        self.storage, self.uri = storage, uri
        self.bucket, self.key = split_uri(uri)
        super().__init__(prefix="batchinfer-upload-")

    def commit(self) -> None:
        from boto3.exceptions import S3UploadFailedError
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.storage.client.upload_file(self.path, self.bucket, self.key)
        except (ClientError, BotoCoreError) as exc:
            raise convert(exc, self.uri, "write", per_object=False) from exc
        except S3UploadFailedError as exc:  # boto3 wraps the ClientError of a PUT in this
            cause = exc.__cause__ or exc.__context__
            if isinstance(cause, ClientError | BotoCoreError):
                raise convert(cause, self.uri, "write", per_object=False) from exc
            raise ShardError(f"cannot write {self.uri}: {exc}") from exc
        finally:
            self.discard()


PART_SIZE_ENV = "BATCHINFER_S3_PART_SIZE"


def _info(size: int, modified: Any, etag: str | None) -> FileInfo:
    return FileInfo(int(size), int(modified.timestamp() * 1_000_000), etag.strip('"') if etag else None)


class MultipartUpload(io.RawIOBase):
    """``with MultipartUpload(storage, uri) as fh: fh.write(...)``; see ``S3Storage.open_stream``.

    Parts of ``$BATCHINFER_S3_PART_SIZE`` bytes (default 16 MiB, S3's minimum is 5 MiB) are uploaded
    as soon as they fill; an output smaller than one part is a single PUT.
    """

    def __init__(self, storage: S3Storage, uri: str) -> None:
        super().__init__()
        self.storage, self.uri = storage, uri
        self.bucket, self.key = split_uri(uri)
        self.part_size = max(int(os.environ.get(PART_SIZE_ENV) or 16 << 20), 5 << 20)
        self.buffer = bytearray()
        self.parts: list[dict[str, Any]] = []
        self.upload_id: str | None = None
        self.position = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.buffer += view
        self.position += len(view)
        while len(self.buffer) >= self.part_size:
            self._send(bytes(self.buffer[:self.part_size]))
            del self.buffer[:self.part_size]
        return len(view)

    def _call(self, action: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(Bucket=self.bucket, Key=self.key, **kwargs)
        except (ClientError, BotoCoreError) as exc:
            raise convert(exc, self.uri, action, per_object=False) from exc

    def _send(self, part: bytes) -> None:
        client = self.storage.client
        if self.upload_id is None:
            self.upload_id = self._call("write", client.create_multipart_upload)["UploadId"]
        number = len(self.parts) + 1
        etag = self._call("write", client.upload_part, UploadId=self.upload_id, PartNumber=number, Body=part)["ETag"]
        self.parts.append({"ETag": etag, "PartNumber": number})

    def __enter__(self) -> MultipartUpload:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        client = self.storage.client
        if exc_type is not None:
            if self.upload_id is not None:
                with contextlib.suppress(Exception):
                    self._call("abort", client.abort_multipart_upload, UploadId=self.upload_id)
            super().close()
            return
        try:
            if self.upload_id is None:  # small: one PUT
                self._call("write", client.put_object, Body=bytes(self.buffer))
            else:
                if self.buffer:
                    self._send(bytes(self.buffer))
                self._call("write", client.complete_multipart_upload, UploadId=self.upload_id,
                           MultipartUpload={"Parts": self.parts})
        except BaseException:
            if self.upload_id is not None:
                with contextlib.suppress(Exception):
                    self._call("abort", client.abort_multipart_upload, UploadId=self.upload_id)
            raise
        finally:
            super().close()


class S3Storage:
    """Reads, lists and atomically writes ``s3://`` objects. Pass ``client`` to inject one (tests)."""

    def __init__(self, client: Any = None) -> None:
        self._injected = client
        self._client: Any = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        """This process's client, made on first use; a forked child makes its own."""
        if self._injected is not None:
            return self._injected
        pid = os.getpid()
        if self._client is None or self._pid != pid:
            with self._lock:
                if self._client is None or self._pid != pid:
                    self._client, self._pid = make_client(), pid
        return self._client

    def read(self, uri: str) -> bytes:
        return self.read_info(uri)[0]

    def read_info(self, uri: str) -> tuple[bytes, FileInfo]:
        """The object's bytes and the version they came from (size, LastModified, ETag of the GET)."""
        from botocore.exceptions import (
            BotoCoreError,
            ClientError,
            IncompleteReadError,
            ReadTimeoutError,
            ResponseStreamingError,
        )

        bucket, key = split_uri(uri)
        for attempt in range(1, _READS + 1):
            try:
                response = self.client.get_object(Bucket=bucket, Key=key)
                body = response["Body"]
                try:
                    return body.read(), _info(response["ContentLength"], response["LastModified"],
                                              response.get("ETag"))
                finally:
                    body.close()
            except (IncompleteReadError, ReadTimeoutError, ResponseStreamingError) as exc:
                if attempt == _READS:
                    raise convert(exc, uri, "read") from exc
            except (ClientError, BotoCoreError) as exc:
                raise convert(exc, uri, "read") from exc
        raise AssertionError("unreachable")

    def open_read(self, uri: str) -> Any:
        """A binary stream of the object (not seekable), for manifests read line by line."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_uri(uri)
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"]
        except (ClientError, BotoCoreError) as exc:
            raise convert(exc, uri, "read") from exc

    def list(self, prefix: str) -> Iterator[str]:
        """URIs of every object under ``prefix`` in key order, one listing page (1000 keys) at a time."""
        return (uri for uri, _ in self.list_info(prefix))

    def list_info(self, prefix: str) -> Iterator[tuple[str, FileInfo]]:
        """``list`` with each object's size, LastModified and ETag, which the listing returns anyway."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key_prefix = split_uri(prefix)
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key_prefix)
        try:
            for page in pages:
                for obj in page.get("Contents", ()):
                    yield f"s3://{bucket}/{obj['Key']}", _info(obj["Size"], obj["LastModified"], obj.get("ETag"))
        except (ClientError, BotoCoreError) as exc:
            raise convert(exc, prefix, "list", per_object=False) from exc

    def stat(self, uri: str) -> FileInfo | None:
        """One HEAD request; None when the object cannot be seen."""
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_uri(uri)
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except (ClientError, BotoCoreError):
            return None
        return _info(head["ContentLength"], head["LastModified"], head.get("ETag"))

    def exists(self, uri: str) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_uri(uri)
        try:
            self.client.head_object(Bucket=bucket, Key=key)
        except ClientError as exc:
            converted = convert(exc, uri, "check")
            if isinstance(converted, FileNotFoundError):
                return False
            raise converted from exc
        except BotoCoreError as exc:
            raise convert(exc, uri, "check") from exc
        return True

    def check_writable(self, uri: str, folder: bool) -> None:
        """A cheap permission probe: start a multipart upload next to ``uri`` and abort it (nothing is
        written, nothing is left). ``ConfigError`` for a missing bucket or denied access, ``ShardError``
        when the endpoint cannot be reached."""
        import uuid

        from botocore.exceptions import BotoCoreError, ClientError

        bucket, key = split_uri(uri)
        base = key.rstrip("/") if folder else key.rpartition("/")[0]
        probe = f"{base}/.batchinfer-write-check-{uuid.uuid4().hex}".lstrip("/")
        try:
            upload = self.client.create_multipart_upload(Bucket=bucket, Key=probe)
            self.client.abort_multipart_upload(Bucket=bucket, Key=probe, UploadId=upload["UploadId"])
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in DENIED:
                raise ConfigError(f"cannot write to {uri}: access denied ({code})") from exc
            raise convert(exc, uri, "write to", per_object=False) from exc
        except BotoCoreError as exc:
            raise convert(exc, uri, "write to", per_object=False) from exc

    def open_stream(self, uri: str) -> MultipartUpload:
        """A binary file whose bytes go up in parts as they fill (multipart upload); the object appears
        only when it completes, and an error aborts the upload. Nothing is staged on local disk."""
        return MultipartUpload(self, uri)

    def open_atomic(self, uri: str) -> S3Upload:
        """Write to a local temporary file; ``commit()`` uploads it to ``uri`` (a whole object or none)."""
        return S3Upload(self, uri)
