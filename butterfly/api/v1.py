"""The OpenAI-compatible routes: GET /v1/models (and /v1/models/{id}), POST /v1/completions and
/v1/chat/completions.

Owns admission (in this order: a backend exists, the serving gate says yes, the model's tokenizer is
loaded, the body fits, arrives in time (``BODY_TIMEOUT_S``) and decodes, the request is well formed,
the model is the one served, the prompt fits the context), turning the backend's token events into
text (incremental detokenizing, stop strings cut out of the answer and the backend's iterator closed
at once), SSE framing, and the serving metrics.
Every error is OpenAI's error body (``openai.error_body``).

A client that goes away ends its request: the handler is cancelled (the runner is started with
``handler_cancellation``) or its next write fails, and either way the backend's iterator is closed,
which cancels the sequence and frees its cache.

Must not: block the event loop (prompts are tokenized in a thread), schedule or batch sequences (the
backend does), or change node state.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from butterfly.api.openai import (
    ApiError,
    CompletionRequest,
    error_body,
    parse_chat_request,
    parse_completion_request,
)
from butterfly.api.served import ServedModel
from butterfly.api.servingmetrics import RequestTimer, ServingMetrics
from butterfly.api.tokenizer import ChatTemplateError, IncrementalDecoder, ServingTokenizer
from butterfly.serving.backend import Backend, Finished, GenerationRequest, ServingError, TokenEvent
from butterfly.status import NodeStatus

__all__ = ["MAX_V1_BODY_BYTES", "ServedModel", "V1Handlers", "body_limit", "error_response"]

# JSON bytes a prompt may take per token of context: far above what real text needs (a token is a
# few characters, escaped at most 6 bytes each), so a max-context prompt always fits.
BODY_BYTES_PER_TOKEN = 64
BODY_BYTES_BASE = 64 * 1024
# The ceiling for any /v1 body whatever the model says (aiohttp's client_max_size for the app).
MAX_V1_BODY_BYTES = 64 * 2**20
_encoder = msgspec.json.Encoder()
_NO_STORE = {"Cache-Control": "no-store"}
# A body must arrive within this, plus a second per BODY_MIN_BYTES_PER_S of its length: the
# connection guard's head deadline ends once the head is in, and a client that sends a head and then
# trickles (or withholds) its body would otherwise hold a busy connection, which the guard never
# evicts, for good.
BODY_TIMEOUT_S = 10.0
BODY_MIN_BYTES_PER_S = 256 * 1024
# Retry-After, in seconds, on a refusal a retry may get past (429 KV cache full, 503 not serving yet
# or a stage lost): soon enough for a cache that frees as sequences end, and OpenAI's SDKs (two
# retries by default) then give up after about two seconds rather than hang on a node that loads.
RETRY_AFTER_S = 1


ModelSource = Callable[[], "ServedModel | None"]
StatusSource = Callable[[], NodeStatus]


def body_limit(model: ServedModel | None) -> int:
    """The largest /v1 body accepted: enough for a prompt of the model's whole context."""
    ctx = model.tokenizer.context_length if model is not None else 0
    return min(MAX_V1_BODY_BYTES, BODY_BYTES_BASE + BODY_BYTES_PER_TOKEN * ctx)


def error_response(e: ApiError, headers: dict[str, str] | None = None) -> web.Response:
    merged = dict(_NO_STORE)
    if e.retry_after is not None:
        merged["Retry-After"] = str(e.retry_after)
    if e.retryable is not None:
        merged["x-should-retry"] = "true" if e.retryable else "false"
    if headers:
        merged.update(headers)
    return web.Response(
        body=_encoder.encode(error_body(e)), status=e.status, content_type="application/json", headers=merged
    )


def _json(body: Any) -> web.Response:
    return web.Response(body=_encoder.encode(body), content_type="application/json", headers=_NO_STORE)


@dataclass
class _Outcome:
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # An error sent as an SSE event after the headers (its HTTP status, for the metrics).
    error_status: int | None = None

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


async def _aclose(it: AsyncIterator[object]) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        await close()


class _StopMatcher:
    """Holds back the last (longest stop - 1) characters so no part of a stop string is ever sent."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self.hold = max((len(s) for s in stops), default=1) - 1
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was found: the text before it was returned)."""
        self.pending += text
        if not self.stops:
            out, self.pending = self.pending, ""
            return out, False
        hits = [i for s in self.stops if (i := self.pending.find(s)) >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        cut = max(0, len(self.pending) - self.hold)
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


async def _deltas(
    backend: Backend,
    gen: GenerationRequest,
    req: CompletionRequest,
    tok: ServingTokenizer,
    timer: RequestTimer,
    outcome: _Outcome,
) -> AsyncGenerator[str, None]:
    """Text deltas of one request; fills ``outcome``. Raises ApiError for the backend's errors."""
    decoder = IncrementalDecoder(tok, gen.prompt_ids)
    stop = _StopMatcher(req.stop)
    outcome.prompt_tokens = len(gen.prompt_ids)
    events = backend.generate(gen)
    try:
        async for ev in events:
            if isinstance(ev, TokenEvent):
                timer.token()
                outcome.completion_tokens += 1
                text, hit = stop.feed(decoder.push(ev.token_id))
                if text:
                    yield text
                if hit:
                    outcome.finish_reason = "stop"
                    return  # finally closes the backend's iterator: the sequence ends now
            elif isinstance(ev, Finished):
                outcome.finish_reason = ev.reason
                outcome.prompt_tokens = ev.prompt_tokens
                outcome.completion_tokens = ev.completion_tokens
                text, hit = stop.feed(decoder.flush())
                if hit:
                    outcome.finish_reason = "stop"
                else:
                    text += stop.flush()
                if text:
                    yield text
                return
        raise ServingError(502, "backend_error", "the pipeline ended the request without finishing it")
    except ServingError as e:
        retry_after = RETRY_AFTER_S if e.status in (429, 503) else None
        raise ApiError(e.status, e.message, code=e.code, retry_after=retry_after) from None
    finally:
        await _aclose(events)


class V1Handlers:
    def __init__(
        self,
        status_source: StatusSource,
        backend: Backend | None,
        model_source: ModelSource,
        metrics: ServingMetrics,
    ) -> None:
        self._status = status_source
        self._backend = backend
        self._model = model_source
        self.metrics = metrics

    # ---- routes --------------------------------------------------------------------------------

    async def models(self, request: web.Request) -> web.Response:
        model = self._model()
        return _json({"object": "list", "data": [] if model is None else [_model_object(model)]})

    async def model(self, request: web.Request) -> web.Response:
        """GET /v1/models/{model} (the SDK's models.retrieve): by id or manifest root, else 404."""
        name = request.match_info["model"]
        model = self._model()
        if model is None or name not in (model.id, model.root):
            serves = (
                f"this node serves {model.id!r}" if model is not None else "this node serves no model yet"
            )
            return error_response(
                ApiError(
                    404,
                    f"model {name!r} does not exist here; {serves}",
                    param="model",
                    code="model_not_found",
                )
            )
        return _json(_model_object(model))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, parse_completion_request)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, parse_chat_request)

    # ---- admission -----------------------------------------------------------------------------

    async def _serve(
        self, request: web.Request, parse: Callable[[object], CompletionRequest]
    ) -> web.StreamResponse:
        try:
            backend, model = self._admit()
            req = parse(await self._read_json(request, model))
            self._check_model(req, model)
            gen = await self._generation_request(req, model)
        except ApiError as e:
            resp = error_response(e)
            if not request.content.is_eof() or request.content.exception() is not None:
                # The body was not read (refused before it, or it broke off): the connection closes
                # after this answer, and says so, so a client does not send its next request on it.
                resp.force_close()
            return resp
        timer = self.metrics.request(len(gen.prompt_ids))
        outcome = _Outcome()
        deltas = _deltas(backend, gen, req, model.tokenizer, timer, outcome)
        failed: int | None = None
        try:
            if req.stream:
                return await self._stream(request, req, model, gen, deltas, outcome)
            return await self._whole(req, model, gen, deltas, outcome)
        except ApiError as e:
            failed = e.status
            return error_response(e)
        finally:
            await deltas.aclose()
            timer.end(outcome.finish_reason, failed or outcome.error_status)

    def _admit(self) -> tuple[Backend, ServedModel]:
        if self._backend is None:
            raise ApiError(
                503,
                "serving not available: this node runs no inference backend",
                code="serving_not_available",
                retryable=False,
            )
        status = self._status()
        if not status.may_serve:
            reason = status.waiting_reason or f"state {status.state}"
            raise ApiError(
                503, f"this node may not serve now: {reason}", code="not_serving", retry_after=RETRY_AFTER_S
            )
        model = self._model()
        if model is None:
            raise ApiError(
                503,
                "the model's tokenizer is not loaded on this node yet",
                code="not_serving",
                retry_after=RETRY_AFTER_S,
            )
        return self._backend, model

    async def _read_json(self, request: web.Request, model: ServedModel) -> object:
        limit = body_limit(model)
        length = request.content_length
        if length is None:
            raise ApiError(411, "a request body with Content-Length is required", code="length_required")
        if length > limit:
            raise ApiError(
                413,
                f"request body of {length} bytes is over this model's limit of {limit} bytes",
                code="request_too_large",
            )
        deadline = BODY_TIMEOUT_S + length / BODY_MIN_BYTES_PER_S
        try:
            async with asyncio.timeout(deadline):
                raw = await request.read()
        except TimeoutError:
            raise ApiError(
                408,
                f"the request body of {length} bytes did not arrive within {deadline:.1f} s",
                code="request_timeout",
            ) from None
        except RequestPayloadError as e:
            # A body whose Content-Encoding does not decode (or decodes past aiohttp's limit), or that
            # ends before its Content-Length: the parser's error, which names what was wrong, is the cause.
            why = " ".join(str(getattr(e.__cause__, "message", None) or e).split())
            raise ApiError(400, f"the request body could not be read: {why}", code="invalid_body") from None
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
        bad = _lone_surrogate(body)
        if bad is not None:
            raise ApiError(
                400,
                f"the request body is not valid JSON: a string holds the lone UTF-16 surrogate {ascii(bad)}, "
                "which is not a Unicode character",
                code="invalid_json",
            )
        return body

    @staticmethod
    def _check_model(req: CompletionRequest, model: ServedModel) -> None:
        if req.model is not None and req.model not in (model.id, model.root):
            raise ApiError(
                404,
                f"model {req.model!r} does not exist here; this node serves {model.id!r}",
                param="model",
                code="model_not_found",
            )

    async def _generation_request(self, req: CompletionRequest, model: ServedModel) -> GenerationRequest:
        tok = model.tokenizer
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
            for i, t in enumerate(ids):
                if t >= tok.vocab_size:
                    raise ApiError(
                        400,
                        f"prompt[{i}]: token id {t} is not in the model's vocabulary of {tok.vocab_size}",
                        param=f"prompt[{i}]",
                        code="invalid_value",
                    )
        elif req.messages is not None:
            messages = [m.as_template_dict() for m in req.messages]
            try:
                # Large prompts take milliseconds to encode: never on the supervisor's loop.
                ids = await asyncio.to_thread(tok.chat_prompt_ids, messages)
            except ChatTemplateError as e:
                raise ApiError(400, f"messages: {e}", param="messages", code="invalid_value") from None
        else:
            assert req.prompt is not None
            ids = await asyncio.to_thread(tok.encode, req.prompt)
        param = "messages" if req.kind == "chat" else "prompt"
        ctx = tok.context_length
        if not ids:
            raise ApiError(400, f"{param}: encodes to no tokens", param=param, code="invalid_value")
        if len(ids) >= ctx:
            raise ApiError(
                400,
                f"{param}: is {len(ids)} tokens; this model's context length is {ctx} tokens, which must "
                "also leave room for at least one generated token",
                param=param,
                code="context_length_exceeded",
            )
        room = ctx - len(ids)
        if req.max_tokens is None:
            max_tokens = room
        elif req.kind == "completion" and req.max_tokens == 16 and req.max_tokens > room:
            max_tokens = room  # the default, not asked for: fit it to the room left
        else:
            max_tokens = req.max_tokens
        if max_tokens > room:
            raise ApiError(
                400,
                f"max_tokens: this model's context length is {ctx} tokens; you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the {param}, {max_tokens} for the "
                "completion)",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return GenerationRequest(
            prompt_ids=tuple(ids),
            max_tokens=max_tokens,
            params=req.params,
            stop_token_ids=tok.eos_token_ids,
        )

    # ---- answers -------------------------------------------------------------------------------

    async def _whole(
        self,
        req: CompletionRequest,
        model: ServedModel,
        gen: GenerationRequest,
        deltas: AsyncIterator[str],
        outcome: _Outcome,
    ) -> web.Response:
        parts = [_echo(req, model, gen)]
        async for text in deltas:
            parts.append(text)
        text = "".join(parts)
        created = int(time.time())
        if req.kind == "chat":
            body: dict[str, Any] = {
                "id": f"chatcmpl-{uuid.uuid4().hex}",
                "object": "chat.completion",
                "created": created,
                "model": model.id,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "logprobs": None,
                        "finish_reason": outcome.finish_reason,
                    }
                ],
                "usage": outcome.usage(),
            }
        else:
            body = {
                "id": f"cmpl-{uuid.uuid4().hex}",
                "object": "text_completion",
                "created": created,
                "model": model.id,
                "choices": [
                    {"index": 0, "text": text, "logprobs": None, "finish_reason": outcome.finish_reason}
                ],
                "usage": outcome.usage(),
            }
        return _json(body)

    async def _stream(
        self,
        request: web.Request,
        req: CompletionRequest,
        model: ServedModel,
        gen: GenerationRequest,
        deltas: AsyncIterator[str],
        outcome: _Outcome,
    ) -> web.StreamResponse:
        chat = req.kind == "chat"
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, finish: str | None, *, role: bool = False) -> dict[str, Any]:
            if chat:
                d: dict[str, str] = {}
                if role:
                    d["role"] = "assistant"
                if delta is not None:
                    d["content"] = delta
                choice: dict[str, Any] = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
            body: dict[str, Any] = {"id": ident, "object": obj, "created": created, "model": model.id}
            body["choices"] = [choice]
            if req.include_usage:
                body["usage"] = None
            return body

        # The first text (or the backend's refusal) comes before the headers: a request refused
        # before its first token gets a real HTTP error status, not a 200 with an error event.
        first: str | None
        try:
            first = await deltas.__anext__()
        except StopAsyncIteration:
            first = None
        resp = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await resp.prepare(request)

        async def send(body: object) -> None:
            await resp.write(b"data: " + _encoder.encode(body) + b"\n\n")

        try:
            if chat:
                await send(chunk("", None, role=True))
            echo = _echo(req, model, gen)
            if echo:
                await send(chunk(echo, None))
            if first is not None:
                await send(chunk(first, None))
                try:
                    async for text in deltas:
                        await send(chunk(text, None))
                except ApiError as e:
                    # Headers are gone: the error travels as an event, as OpenAI's API does.
                    outcome.error_status = e.status
                    outcome.finish_reason = None
                    await send(error_body(e))
                    await resp.write(b"data: [DONE]\n\n")
                    await resp.write_eof()
                    return resp
            await send(chunk(None if chat else "", outcome.finish_reason))
            if req.include_usage:
                await send(
                    {
                        "id": ident,
                        "object": obj,
                        "created": created,
                        "model": model.id,
                        "choices": [],
                        "usage": outcome.usage(),
                    }
                )
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
        except ConnectionResetError:
            pass  # the client went away: the caller's finally closes the backend's iterator
        return resp


def _model_object(model: ServedModel) -> dict[str, Any]:
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": "butterfly",
        "root": model.root,
        "max_model_len": model.tokenizer.context_length,
    }


def _lone_surrogate(body: object) -> str | None:
    """The first lone surrogate in any string of ``body`` (keys included), else None.

    json.loads takes ``"\\ud800"`` (and UTF-8-encoded surrogates) as a str that cannot be encoded back:
    the tokenizer refuses it and an error message quoting it cannot be sent, so such a body is refused
    as a whole, before any field is read.
    """
    stack: list[object] = [body]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError as e:
                return v[e.start]
        elif isinstance(v, dict):
            stack.extend(v)
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return None


def _echo(req: CompletionRequest, model: ServedModel, gen: GenerationRequest) -> str:
    if not req.echo:
        return ""
    return req.prompt if req.prompt is not None else model.tokenizer.decode(gen.prompt_ids)
