"""Reading a request's images: multipart uploads (field ``image``) or JSON ``{"uris": [...]}`` (allow-listed),
with the limits (body size, images per request) and every refusal a ``BadRequest``: a status and one line."""

from __future__ import annotations

import json
from typing import Any

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.feed import Loaded
from workers.serve.service import Service

FIELD = "image"


class BadRequest(HTTPException):
    """A request we refuse: its status and one-line reason (``{"error": ...}``)."""

    def __init__(self, status: int, error: str, **extra: Any) -> None:
        super().__init__(status, error)
        self.extra = extra


class BodyTooLarge(Exception):
    pass


class BodyLimit:
    """413 for a body over ``limit`` bytes: at once when Content-Length says so, else while it streams in."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > self.limit:
                await too_large(self.limit)(scope, receive, send)
                return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise BodyTooLarge
            return message

        await self.app(scope, counted, send)


def too_large(limit: int) -> JSONResponse:
    return JSONResponse({"error": f"request body over the limit of {limit} bytes (--max-body)"}, 413)


async def images_of(request: Request, service: Service) -> tuple[list[Loaded], str]:
    """The request's images (decoded, or their error) and the key naming them (filename or uri)."""
    check_ready(service)
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind == "multipart/form-data":
        files = await _uploads(request, service.config.max_images)
        return await service.decode_uploads(files), "filename"
    if kind == "application/json":
        uris = await _uris(request, service)
        return await service.load_uris(uris), "uri"
    body_empty = not (await request.body())
    if body_empty:
        raise BadRequest(400, f"empty request: send images as multipart field {FIELD!r} or JSON "
                         '{"uris": [...]}')
    raise BadRequest(415, f"unsupported content type {kind or 'none'!r}: use multipart/form-data (field "
                     f"{FIELD!r}) or application/json")

async def _uploads(request: Request, limit: int) -> list[tuple[str, bytes]]:
    form = await request.form(max_files=limit + 1, max_fields=limit + 1)
    try:
        files: list[tuple[str, bytes]] = []
        for key, value in form.multi_items():
            if key != FIELD:
                raise BadRequest(400, f"unknown field {key!r}: send images in the field {FIELD!r}")
            if not isinstance(value, UploadFile):
                raise BadRequest(400, f"field {FIELD!r} must be a file upload, not a text value")
            files.append((value.filename or f"{FIELD}{len(files)}", await value.read()))
    finally:
        await form.close()
    _count(len(files), limit)
    return files

async def _uris(request: Request, service: Service) -> list[str]:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(400, f"the body is not valid JSON: {exc}") from None
    if not isinstance(body, dict) or set(body) != {"uris"}:
        extra = sorted(set(body) - {"uris"}) if isinstance(body, dict) else None
        prefix = f"unknown field {extra[0]!r}: " if extra else ""
        raise BadRequest(400, prefix + 'the JSON body must be {"uris": ["s3://...", ...]}')
    uris = body["uris"]
    if not isinstance(uris, list) or not all(isinstance(u, str) and u for u in uris):
        raise BadRequest(400, '"uris" must be a list of non-empty strings')
    _count(len(uris), service.config.max_images)
    refused = [u for u in uris if not service.allowed(u)]
    if refused:
        raise BadRequest(403, f"this server does not read {refused[0]!r}: start it with --allow-uri PREFIX "
                         "for the places clients may name (or upload the image)")
    return uris

def _count(n: int, limit: int) -> None:
    if n == 0:
        raise BadRequest(400, f"no images: send them as multipart field {FIELD!r} or JSON {{\"uris\": [...]}}")
    if n > limit:
        raise BadRequest(413, f"{n} images in one request; the limit is {limit} (--max-images)")

def check_ready(service: Service) -> None:
    if not service.ready:
        raise BadRequest(503, f"not ready: {service.not_ready_reason}")

def all_failed(loaded: list[Loaded], results: list[dict[str, Any]]) -> None:
    """A request none of whose images could be used is refused (422), with each one's error row."""
    if loaded and all(item.image is None for item in loaded):
        first = loaded[0].error
        raise BadRequest(422, f"no image could be used: {first}" if len(loaded) == 1 else
                         f"none of the {len(loaded)} images could be used (first: {first})", results=results)
