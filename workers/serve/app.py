"""The HTTP surface of ``batchinfer serve`` on Starlette (ASGI): routes, the bearer token, body limits, and
every bad request answered as a 4xx with a JSON ``error`` (never a 500, never a dead process).

Starlette, not Flask: one event loop holds thousands of waiting requests at the cost of a coroutine each,
which is what lets the batcher gather them; the model runs on its own thread and decoding on the pool.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from workers.feed import Loaded
from workers.serve.metrics import CONTENT_TYPE
from workers.serve.requests import BadRequest, BodyLimit, BodyTooLarge, all_failed, check_ready, images_of, too_large
from workers.serve.service import Service

OPEN_ROUTES = ("/healthz", "/readyz")  # probes answer without the token


def create_app(service: Service, on_loaded: Callable[[], None] | None = None) -> ASGIApp:
    """The ASGI app around ``service``. The model loads on a thread once the app starts; then ``on_loaded``
    is called, whether it worked or not (``service.load_error``: the CLI stops the server and says why)."""
    config, metrics = service.config, service.metrics

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with service.batcher:
            loading = asyncio.create_task(_load())
            try:
                yield
            finally:
                service.draining = True
                loading.cancel()

    async def _load() -> None:
        await asyncio.to_thread(service.load)
        if on_loaded is not None:
            on_loaded()

    async def predict(request: Request) -> Response:
        if "classify" not in service.spec.tasks:
            raise BadRequest(404, "this server makes features only (--task features): use /features")
        loaded, key = await images_of(request, service)
        rows = await service.rows(loaded)
        results = [_prediction(row, key) for row in rows]
        all_failed(loaded, results)
        return JSONResponse({"model": service.predictor.model_name, "results": results})

    async def features(request: Request) -> Response:
        columns = service.feature_columns
        if not columns:
            raise BadRequest(404, "this server only classifies: start it with --task features or "
                             "classify,features for /features")
        raw = "application/octet-stream" in request.headers.get("accept", "")
        column = request.query_params.get("column")
        if column is not None and column not in columns:
            raise BadRequest(400, f"unknown column {column!r}: this model makes {', '.join(columns)}")
        if raw and column is None and len(columns) > 1:
            raise BadRequest(400, f"name one ?column= for raw float32 ({', '.join(columns)})")
        loaded, key = await images_of(request, service)
        rows = await service.rows(loaded)
        wanted = [column] if column else columns
        results = [_described(row, key) | {c: row[c] for c in wanted} for row in rows]
        all_failed(loaded, [_described(row, key) for row in rows])
        if not raw:
            return JSONResponse({"model": service.predictor.model_name,
                                 "dims": {c: service.predictor.feature_columns[c] for c in wanted},
                                 "results": results})
        name = wanted[0]
        dim = service.predictor.feature_columns[name]
        matrix = np.full((len(rows), dim), np.nan, np.float32)
        for i, row in enumerate(rows):
            if row[name] is not None:
                matrix[i] = row[name]
        failed = [str(i) for i, row in enumerate(rows) if row["error"] is not None]
        return Response(matrix.astype("<f4").tobytes(), media_type="application/octet-stream",
                        headers={"X-Batchinfer-Shape": f"{len(rows)},{dim}", "X-Batchinfer-Column": name,
                                 "X-Batchinfer-Failed": ",".join(failed)})

    async def search(request: Request) -> Response:
        index = service.index
        if index is None:
            raise BadRequest(404, "this server has no index: start it with --index DIR (batchinfer index)")
        k = _k(request)
        check_ready(service)
        if request.method == "GET":
            uri = request.query_params.get("uri")
            if not uri:
                raise BadRequest(400, "GET /search needs ?uri=...; POST an image to search by example")
            vector = index.vector(uri)
            if vector is not None:
                queries: list[tuple[str, np.ndarray | None, str | None]] = [(uri, vector, None)]
            elif service.allowed(uri):
                loaded = await service.load_uris([uri])
                queries = await _embedded(loaded)
                all_failed(loaded, [{"query": uri, "error": loaded[0].error}])
            else:
                raise BadRequest(404, f"{uri!r} is not in the index (and this server reads no URI of a client's "
                                 "choosing there: --allow-uri)")
        else:
            loaded, _ = await images_of(request, service)
            queries = await _embedded(loaded)
            all_failed(loaded, [{"query": q, "error": e} for q, _, e in queries])
        good = [v for _, v, _ in queries if v is not None]
        hits = iter(await asyncio.to_thread(index.search, np.stack(good), k) if good else [])
        results = []
        for name, vector, error in queries:
            found = next(hits) if vector is not None else None
            results.append({"query": name, "error": error, "neighbors": None if found is None else [
                {"rank": r + 1, "uri": h.uri, "score": h.score, **h.extra} for r, h in enumerate(found)]})
        return JSONResponse({"metric": index.metric, "higher_is_closer": index.metric != "l2", "k": k,
                             "results": results})

    async def _embedded(loaded: list[Loaded]) -> list[tuple[str, np.ndarray | None, str | None]]:
        rows = await service.rows(loaded)
        column = service.index.column
        return [(item.uri, None if row[column] is None else np.asarray(row[column], np.float32), row["error"])
                for item, row in zip(loaded, rows)]

    def _k(request: Request) -> int:
        raw = request.query_params.get("k", "10")
        try:
            k = int(raw)
        except ValueError:
            raise BadRequest(400, f"k must be a whole number, got {raw!r}") from None
        if not 1 <= k <= config.max_k:
            raise BadRequest(400, f"k must be 1..{config.max_k}, got {k}")
        return k

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if service.ready:
            return JSONResponse({"ready": True, "model": service.predictor.model_name})
        return JSONResponse({"ready": False, "error": service.not_ready_reason}, 503)

    async def metrics_page(request: Request) -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    async def info(request: Request) -> Response:
        return JSONResponse(service.describe())

    routes = [
        Route("/", info, methods=["GET"]),
        Route("/predict", predict, methods=["POST"]),
        Route("/features", features, methods=["POST"]),
        Route("/search", search, methods=["GET", "POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_page, methods=["GET"]),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        extra = getattr(exc, "extra", {})
        headers = dict(exc.headers or {})
        return JSONResponse({"error": exc.detail, **extra}, exc.status_code, headers=headers)

    async def body_too_large(request: Request, exc: Exception) -> Response:
        return too_large(config.max_body)

    async def crashed(request: Request, exc: Exception) -> Response:  # a bug or a failed model call
        return JSONResponse({"error": f"internal error: {type(exc).__name__}: {exc}"}, 500)

    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: http_error, BodyTooLarge: body_too_large, Exception: crashed})
    return _Guard(BodyLimit(app, config.max_body), service, {route.path for route in routes})


def _described(row: dict[str, Any], key: str) -> dict[str, Any]:
    return {key: row["uri"], "width": row["width"], "height": row["height"], "error": row["error"]}


def _prediction(row: dict[str, Any], key: str) -> dict[str, Any]:
    top = None
    if row.get("top_k_indices") is not None:
        top = [{"index": i, "label": label, "score": s}
               for i, label, s in zip(row["top_k_indices"], row["top_k_labels"], row["top_k_scores"])]
    return {**_described(row, key), "label": row.get("label"), "score": row.get("score"), "top_k": top}


class _Guard:
    """The bearer token, and the request metrics (route, status, latency) around everything."""

    def __init__(self, app: ASGIApp, service: Service, routes: set[str]) -> None:
        self.app, self.service, self.routes = app, service, routes
        self.token = service.config.token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path, method = scope["path"], scope["method"]
        route = path if path in self.routes else "other"  # unknown paths: one label, not one each
        status = 500
        start = time.perf_counter()

        async def sent(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.token and path not in OPEN_ROUTES and not self._authorised(scope):
                await JSONResponse({"error": "missing or wrong bearer token (Authorization: Bearer ...)"}, 401,
                                   headers={"WWW-Authenticate": "Bearer"})(scope, receive, sent)
                return
            await self.app(scope, receive, sent)
        finally:
            metrics = self.service.metrics
            metrics.requests.labels(route, method, str(status)).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _authorised(self, scope: Scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, given = value.decode("latin-1").partition(" ")
                assert self.token is not None
                return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token.encode())
        return False
