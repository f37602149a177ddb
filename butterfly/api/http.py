"""The node's HTTP API: /status, /health, /ready and /metrics, and the OpenAI-compatible /v1 routes
(``butterfly.api.v1``), served by the supervisor.

This module owns the routes, the response bodies and status codes, the error handling (JSON 404,
405 with Allow, JSON 500 that never stops the server, OpenAI error bodies for what aiohttp's HTTP
parser refuses, request size limits: 1 KiB everywhere but /v1, whose limit follows the model's
context) and starting/stopping the listener.

It runs on the supervisor's event loop and must answer while children are busy or restarting, so
handlers must not block, do I/O or await anything slow: each one calls the synchronous
``status_source`` (the supervisor's shared-memory board read) exactly once and renders that
snapshot. It must not change node state; the only state it holds is the serving metrics of the
requests it answered.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
from aiohttp import hdrs, web
from aiohttp.typedefs import Handler
from aiohttp.web_protocol import RequestHandler
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

from butterfly.api.guard import ConnectionGuard, ConnectionLimits, GuardedSite, RateLimitedLog, track_requests
from butterfly.api.metrics import make_registry
from butterfly.api.openai import ApiError
from butterfly.api.servingmetrics import ServingMetrics
from butterfly.api.v1 import MAX_V1_BODY_BYTES, ModelSource, ServedModel, V1Handlers, error_response
from butterfly.serving.backend import Backend
from butterfly.states import NodeState
from butterfly.status import NodeStatus

__all__ = ["ApiBindError", "ApiServer", "MAX_BODY_BYTES", "make_app", "start_api"]

log = logging.getLogger(__name__)

StatusSource = Callable[[], NodeStatus]

# No endpoint but /v1 takes a body; anything bigger than a stray form is refused before it is read.
MAX_BODY_BYTES = 1024
V1_PREFIX = "/v1/"
# How long close() waits for in-flight requests: a slow client must not hold up node shutdown.
SHUTDOWN_TIMEOUT_S = 2.0
# How long the server drains an unread request body before closing: short, as we never read bodies.
LINGERING_TIME_S = 2.0
# Responses describe a live node; a cached copy is a wrong answer.
_NO_STORE = {"Cache-Control": "no-store"}
_json_encoder = msgspec.json.Encoder()
_FAILURES = web.AppKey("failures", RateLimitedLog)


class ApiBindError(RuntimeError):
    """The API could not listen on the configured address (in use, no permission, bad host)."""


def _json(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    merged = dict(_NO_STORE)
    if headers:
        merged.update(headers)
    return web.Response(
        body=_json_encoder.encode(body), status=status, content_type="application/json", headers=merged
    )


def _unhealthy_reason(status: NodeStatus) -> str:
    """Why the supervisor judged the node unhealthy, in one line for the operator.

    ``status.healthy`` is the supervisor's verdict; this only explains it from the same snapshot.
    """
    reasons: list[str] = []
    if status.state == NodeState.FAILED.name:
        reasons.append("state FAILED")
    if status.last_error:
        reasons.append(status.last_error)
    for child in status.children:
        if not child.alive:
            detail = f" ({child.last_exit})" if child.last_exit else ""
            reasons.append(f"child {child.name} down{detail}")
    return "; ".join(reasons) or "unhealthy"


class _Handlers:
    def __init__(
        self, status_source: StatusSource, serves: bool, collectors: Sequence[Collector] = ()
    ) -> None:
        self._source = status_source
        self._registry = make_registry(status_source)
        for c in collectors:
            self._registry.register(c)
        self.serving = ServingMetrics(self._registry)
        self._serves = serves

    async def status(self, request: web.Request) -> web.Response:
        # msgspec encodes struct fields in declaration order: the seed's six fields come first.
        status = self._source()
        if self._serves:
            status = msgspec.structs.replace(status, serving=self.serving.stats())
        return _json(status)

    async def health(self, request: web.Request) -> web.Response:
        status = self._source()
        body: dict[str, Any] = {
            "status": "ok" if status.healthy else "unhealthy",
            "state": status.state,
            "phase": status.phase,
            "uptime_seconds": status.uptime_seconds,
        }
        if status.healthy:
            return _json(body)
        body["reason"] = _unhealthy_reason(status)
        body["last_error"] = status.last_error
        body["children_down"] = [c.name for c in status.children if not c.alive]
        return _json(body, status=503)

    async def ready(self, request: web.Request) -> web.Response:
        status = self._source()
        # The epoch and term the verdict was given in: a client (or the chaos suite's history) can tell
        # which committed plan an answer belongs to.
        body: dict[str, Any] = {
            "ready": status.may_serve,
            "state": status.state,
            "phase": status.phase,
            "epoch": status.epoch,
            "term": status.term,
        }
        if status.may_serve:
            return _json(body)
        body["waiting_reason"] = status.waiting_reason
        return _json(body, status=503)

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            encoder, content_type = choose_encoder(request.headers.get(hdrs.ACCEPT, ""))
        except (TypeError, ValueError):
            # prometheus_client raises on a malformed version= parameter; a bad Accept header from a
            # client is not a server error, so answer in the classic text format every scraper reads.
            encoder, content_type = choose_encoder("")
        payload = encoder(self._registry)
        headers = dict(_NO_STORE)
        headers[hdrs.CONTENT_TYPE] = content_type
        return web.Response(body=payload, headers=headers)


@web.middleware
async def _guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Size limits, JSON errors, and a last line of defence so one bad request never kills the API."""
    if request.path.startswith(V1_PREFIX) or request.path == V1_PREFIX.rstrip("/"):
        return await _guard_v1(request, handler)
    if request.body_exists:
        length = request.content_length
        if length is None:
            # Chunked upload: we would have to read it to know its size, and no endpoint wants it.
            resp = _json({"error": "request bodies are not accepted"}, status=411)
            resp.force_close()
            return resp
        if length > MAX_BODY_BYTES:
            resp = _json({"error": f"request body over {MAX_BODY_BYTES} bytes"}, status=413)
            resp.force_close()
            return resp
    try:
        return await handler(request)
    except web.HTTPException as exc:
        # aiohttp raises these for unknown paths (404) and wrong methods (405, carrying Allow);
        # re-render them as JSON, keeping their status and headers.
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
        }
        return _json({"error": exc.reason, "path": request.path}, status=exc.status, headers=headers)
    except Exception as exc:
        # One line per route and error kind per interval: a request that trips a bug, repeated by a
        # client in a loop, must not write a traceback per request.
        _log_handler_failure(request, exc)
        return _json({"error": "internal error"}, status=500)


def _log_handler_failure(request: web.Request, exc: Exception) -> None:
    route = request.match_info.route.resource
    where = route.canonical if route is not None else request.path[:100]
    record = log.makeRecord(
        log.name,
        logging.ERROR,
        __file__,
        0,
        "HTTP API handler failed: %s %s",
        (request.method, where),
        (type(exc), exc, exc.__traceback__),
    )
    if request.app[_FAILURES].allow_with_traceback(record):
        log.handle(record)


async def _guard_v1(request: web.Request, handler: Handler) -> web.StreamResponse:
    """/v1 checks its own body limit (the model's); its errors are OpenAI's error bodies."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        headers = {
            k: v for k, v in exc.headers.items() if k.lower() not in ("content-type", "content-length")
        }
        code = "not_found" if exc.status == 404 else "method_not_allowed" if exc.status == 405 else None
        return error_response(
            ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}", code=code), headers
        )
    except Exception as exc:
        _log_handler_failure(request, exc)
        return error_response(ApiError(500, "internal error", code="internal_error"))


class _JsonProtocolErrors(RequestHandler):
    """aiohttp answers a request its HTTP parser refuses (a garbage request line, a bad Content-Length,
    an oversized header) before any middleware runs, in text/plain. This keeps its status, logging and
    closing of the connection, and sends OpenAI's error body instead, like every other error here."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        super().handle_error(request, status, exc, message)  # logs; raises if a response was begun
        if status >= 500:
            err = ApiError(status, "internal error" if status == 500 else "the request timed out")
        else:
            # aiohttp's message quotes the offending line, then a line with a caret under the fault.
            lines = str(message or exc or "").splitlines()
            detail = " ".join(" ".join(x for x in lines if x.strip(" ^")).split())[:300]
            err = ApiError(status, f"malformed HTTP request: {detail}", code="bad_request")
        resp = error_response(err)
        resp.force_close()
        return resp


def _no_model() -> ServedModel | None:
    return None


def make_app(
    status_source: StatusSource,
    backend: Backend | None = None,
    model_source: ModelSource = _no_model,
    collectors: Sequence[Collector] = (),
) -> web.Application:
    """The API application; ``status_source`` must be cheap and synchronous (a board read).

    ``backend`` runs inference (None: /v1 answers 503 "serving not available"); ``model_source``
    returns the model this node serves once its tokenizer is loaded, else None (also cheap);
    ``collectors`` join /metrics (the pipeline's own: ``butterfly.serving.metrics.ServingCollector``).
    """
    # client_max_size is /v1's ceiling; every other route refuses bodies over MAX_BODY_BYTES first.
    app = web.Application(middlewares=[track_requests, _guard], client_max_size=MAX_V1_BODY_BYTES)
    app[_FAILURES] = RateLimitedLog(ConnectionLimits().log_interval_s)
    handlers = _Handlers(status_source, serves=backend is not None, collectors=collectors)
    v1 = V1Handlers(status_source, backend, model_source, handlers.serving)
    # add_get also registers HEAD; aiohttp then answers other methods with 405 and Allow: GET,HEAD.
    app.router.add_get("/status", handlers.status)
    app.router.add_get("/health", handlers.health)
    app.router.add_get("/ready", handlers.ready)
    app.router.add_get("/metrics", handlers.metrics)
    app.router.add_get("/v1/models", v1.models)
    app.router.add_get("/v1/models/{model:.+}", v1.model)
    app.router.add_post("/v1/completions", v1.completions)
    app.router.add_post("/v1/chat/completions", v1.chat)
    return app


class ApiServer:
    """A listening API; ``port`` is the bound port (useful when started with port 0)."""

    def __init__(self, runner: web.AppRunner, host: str, guard: ConnectionGuard) -> None:
        self._runner = runner
        self.host = host
        self.addresses: list[Any] = list(runner.addresses)
        self.port: int = int(self.addresses[0][1])
        self.guard = guard
        """Which connections the API keeps (``butterfly.api.guard``), with its counters."""

    async def close(self) -> None:
        await self._runner.cleanup()


def _format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def start_api(
    app: web.Application,
    host: str,
    port: int,
    *,
    access_log: bool = False,
    limits: ConnectionLimits | None = None,
) -> ApiServer:
    """Listen on ``host:port`` and serve ``app``; raises ApiBindError naming the address on failure.

    Connections are guarded (``butterfly.api.guard``): a request head must arrive within
    ``limits.head_timeout_s``, and connections are capped per client address and in total, idle ones
    evicted first. Access logging is off by default: Prometheus and health probes would flood the
    journal.
    """
    limits = limits or ConnectionLimits()
    # aiohttp's own error lines (malformed requests): rate-limited, no traceback per request. A logger
    # of this server's own (under butterfly.api, so it reaches the same handlers) holds the filter.
    protocol_log = logging.Logger("butterfly.api.protocol")
    protocol_log.parent = logging.getLogger("butterfly.api")
    protocol_log.addFilter(RateLimitedLog(limits.log_interval_s))
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=logging.getLogger("butterfly.api.access") if access_log else None,
        shutdown_timeout=SHUTDOWN_TIMEOUT_S,
        lingering_time=LINGERING_TIME_S,
        keepalive_timeout=limits.head_timeout_s,
        logger=protocol_log,
        # A client that disconnects cancels its handler, which closes its sequence's iterator and
        # frees its KV cache at once rather than at its next token.
        handler_cancellation=True,
    )
    await runner.setup()
    site = GuardedSite(runner, host, port, limits, handler_class=_JsonProtocolErrors)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ApiBindError(
            f"cannot listen for the HTTP API on {_format_address(host, port)}: {exc.strerror or exc}"
        ) from exc
    server = ApiServer(runner, host, site.guard)
    log.info("HTTP API listening on %s", _format_address(host, server.port))
    return server
