"""The OpenAI-compatible API through OpenAI's own Python SDK (``openai``), as its users call it.

Each test runs a real listening server over an in-process backend (``LocalBackend`` on the test model,
or a scripted fake where a test needs a refusal) and drives it with ``openai.OpenAI`` (in a thread: it
blocks) or ``openai.AsyncOpenAI`` (on the server's loop). Answers are compared with what our API
returns to a plain HTTP client for the same request and with the engine's greedy tokens; errors must
be the SDK's exception classes carrying our message and error fields. A middleware records the SDK's
``x-stainless-retry-count`` of every request, so the SDK's retries against our 429/503 are counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler

from butterfly.api import make_app, start_api
from butterfly.api.v1 import ServedModel
from butterfly.serving.backend import Backend, Finished, GenerationRequest, ServingError, TokenEvent
from butterfly.serving.local import LocalBackend
from butterfly.status import NodeStatus
from tests.test_api_openai import (
    LOADING,
    MODEL_ID,
    SERVING,
    Client,
    Model,
    ScriptedBackend,
    greedy,
    model,  # noqa: F401 - the module-scoped test model fixture
    run,
)

T = TypeVar("T")
# Every SDK call gets this bound: a server that never answers fails the test rather than hanging it.
SDK_TIMEOUT_S = 20.0
CHAT = [{"role": "user", "content": "Tell me about the sea."}]


@dataclass
class Node:
    base: str
    http: Client
    # The SDK's x-stainless-retry-count of each /v1 request the server received, in order.
    attempts: list[str]

    def sdk(self, **kw: Any) -> openai.OpenAI:
        kw.setdefault("max_retries", 0)
        return openai.OpenAI(base_url=self.base + "/v1", api_key="x", timeout=SDK_TIMEOUT_S, **kw)

    def async_sdk(self, **kw: Any) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        return openai.AsyncOpenAI(base_url=self.base + "/v1", api_key="x", timeout=SDK_TIMEOUT_S, **kw)


@asynccontextmanager
async def node(
    backend: Backend | None, served: ServedModel | None, status: Callable[[], NodeStatus] = lambda: SERVING
) -> AsyncIterator[Node]:
    app = make_app(status, backend, lambda: served)
    attempts: list[str] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/v1/"):
            attempts.append(request.headers.get("x-stainless-retry-count", "none"))
        return await handler(request)

    app.middlewares.insert(0, record)
    server = await start_api(app, "127.0.0.1", 0)
    base = f"http://127.0.0.1:{server.port}"
    try:
        async with aiohttp.ClientSession() as session:
            yield Node(base, Client(session, base), attempts)
    finally:
        await server.close()


def with_node(
    model: Model,  # noqa: F811
    body: Callable[[Node], Awaitable[T]],
    backend: Backend | None = None,
    status: Callable[[], NodeStatus] = lambda: SERVING,
) -> T:
    """Runs ``body`` against a node serving the test model (``LocalBackend`` unless given)."""
    local = LocalBackend(model.pipe) if backend is None else None

    async def main() -> T:
        async with node(local or backend, model.served, status) as n:
            return await body(n)

    try:
        return run(main())
    finally:
        if local is not None:
            local.close()
            assert not local.active, "a sequence kept its KV cache"


def in_thread(fn: Callable[[], T]) -> Awaitable[T]:
    """A call of the blocking client, off the loop that serves it."""
    return asyncio.to_thread(fn)


def expect(
    cls: type[openai.APIStatusError], status: int, call: Callable[[], object]
) -> openai.APIStatusError:
    with pytest.raises(cls) as info:
        call()
    e = info.value
    assert e.status_code == status
    # body is our error object; the SDK's message is "Error code: N - <our message>" (before 2.x: the
    # whole body after the dash).
    assert isinstance(e.body, dict) and set(e.body) == {"message", "type", "param", "code"}, e.body
    assert e.message.startswith(f"Error code: {status} - ") and e.body["message"] in e.message
    assert e.code == e.body["code"] and e.param == e.body["param"] and e.type == e.body["type"]
    return e


# --- Answers ----------------------------------------------------------------------------------------


def test_completion_is_our_apis_greedy_answer(model: Model) -> None:  # noqa: F811
    prompt = "The quick brown fox"
    ids = model.tok.encode(prompt)
    want = greedy(model, ids, 12)
    eos = [i for i, t in enumerate(want) if t in model.tok.eos_token_ids]
    n = eos[0] + 1 if eos else 12
    req: dict[str, Any] = {"model": MODEL_ID, "prompt": prompt, "max_tokens": 12, "temperature": 0}

    async def body(node: Node) -> None:
        _, raw = await node.http.post("/v1/completions", req)
        with node.sdk() as client:
            r = await in_thread(lambda: client.completions.create(**req, top_p=1.0, seed=5, user="alice"))
        async with node.async_sdk() as aclient:
            ar = await aclient.completions.create(**req)
        for got in (r, ar):
            assert isinstance(got, openai.types.Completion)
            assert got.id.startswith("cmpl-") and got.object == "text_completion" and got.model == MODEL_ID
            assert abs(got.created - time.time()) < 60
            (choice,) = got.choices
            assert choice.index == 0 and choice.logprobs is None
            assert choice.text == raw["choices"][0]["text"] == model.tok.decode(want[:n])
            assert choice.finish_reason == ("stop" if eos else "length")
            assert got.usage is not None and got.usage.model_dump(exclude_none=True) == raw["usage"]
            assert (got.usage.prompt_tokens, got.usage.completion_tokens) == (len(ids), n)
            assert got.usage.total_tokens == len(ids) + n

    with_node(model, body)


def test_chat_completion_is_our_apis_answer(model: Model) -> None:  # noqa: F811
    ids = model.tok.chat_prompt_ids(CHAT)
    want = greedy(model, ids, 10)
    req: dict[str, Any] = {"model": MODEL_ID, "messages": CHAT, "temperature": 0}

    async def body(node: Node) -> None:
        _, raw = await node.http.post("/v1/chat/completions", {**req, "max_tokens": 10})
        text = raw["choices"][0]["message"]["content"]
        n = raw["usage"]["completion_tokens"]
        assert text and text == model.tok.decode(want[:n])  # a real answer, not an immediate stop
        with node.sdk() as client:
            answers = [
                await in_thread(lambda: client.chat.completions.create(**req, max_tokens=10)),
                # the newer name of the limit, and the parameters users add
                await in_thread(
                    lambda: client.chat.completions.create(
                        **req, max_completion_tokens=10, seed=3, top_p=0.5, user="alice", stop="never said"
                    )
                ),
            ]
        async with node.async_sdk() as aclient:
            answers.append(await aclient.chat.completions.create(**req, max_tokens=10, n=1))
        for r in answers:
            assert isinstance(r, openai.types.chat.ChatCompletion)
            assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL_ID
            assert abs(r.created - time.time()) < 60
            (choice,) = r.choices
            assert choice.message.role == "assistant" and choice.message.content == text
            assert choice.finish_reason == raw["choices"][0]["finish_reason"]
            assert r.usage is not None and r.usage.model_dump(exclude_none=True) == raw["usage"]

    with_node(model, body)


def test_streams_parse_into_the_whole_answer(model: Model) -> None:  # noqa: F811
    async def body(node: Node) -> None:
        chat: dict[str, Any] = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 10, "temperature": 0}
        _, whole = await node.http.post("/v1/chat/completions", chat)
        with node.sdk() as client:

            def stream_chat(**kw: Any) -> list[openai.types.chat.ChatCompletionChunk]:
                with client.chat.completions.create(**chat, stream=True, **kw) as s:
                    return list(s)  # ends at [DONE]

            plain = await in_thread(stream_chat)
            counted = await in_thread(lambda: stream_chat(stream_options={"include_usage": True}))
        for chunks in (plain, counted):
            with_choice = [c for c in chunks if c.choices]
            assert with_choice[0].choices[0].delta.role == "assistant"
            assert all(c.id == chunks[0].id and c.id.startswith("chatcmpl-") for c in chunks)
            assert all(c.object == "chat.completion.chunk" and c.model == MODEL_ID for c in chunks)
            assert [c.choices[0].finish_reason for c in with_choice[:-1]] == [None] * (len(with_choice) - 1)
            last = with_choice[-1].choices[0]
            assert last.finish_reason == whole["choices"][0]["finish_reason"] and last.delta.content is None
            text = "".join(c.choices[0].delta.content or "" for c in with_choice)
            assert text == whole["choices"][0]["message"]["content"]
            assert len(with_choice) > 3  # token by token
        assert all(c.usage is None for c in plain) and len(plain) == len(counted) - 1
        assert counted[-1].choices == [] and counted[-1].usage is not None
        assert counted[-1].usage.model_dump(exclude_none=True) == whole["usage"]

        cmpl: dict[str, Any] = {"model": MODEL_ID, "prompt": "Once upon a time", "max_tokens": 12}
        _, whole = await node.http.post("/v1/completions", {**cmpl, "temperature": 0})
        async with node.async_sdk() as aclient:
            stream = await aclient.completions.create(
                **cmpl, temperature=0, stream=True, stream_options={"include_usage": True}
            )
            chunks = [c async for c in stream]
        assert all(c.object == "text_completion" and c.id.startswith("cmpl-") for c in chunks)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole["choices"][0]["text"]
        assert chunks[-2].choices[0].finish_reason == whole["choices"][0]["finish_reason"]
        assert (
            chunks[-1].usage is not None and chunks[-1].usage.model_dump(exclude_none=True) == whole["usage"]
        )

    with_node(model, body)


def test_stop_as_a_string_and_a_list(model: Model) -> None:  # noqa: F811
    ids = model.tok.encode("The five boxing wizards")
    text = model.tok.decode(greedy(model, ids, 30))
    stop = text[8:11]
    assert stop.strip(), text
    want = text[: text.index(stop)]

    async def body(node: Node) -> None:
        async with node.async_sdk() as client:
            for stops in (stop, ["never said", stop]):
                r = await client.completions.create(
                    model=MODEL_ID, prompt=ids, max_tokens=30, temperature=0, stop=stops
                )
                assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
                assert r.usage is not None and r.usage.completion_tokens < 30
                s = await client.completions.create(
                    model=MODEL_ID, prompt=ids, max_tokens=30, temperature=0, stop=stops, stream=True
                )
                chunks = [c async for c in s]
                assert "".join(c.choices[0].text for c in chunks) == want
                assert chunks[-1].choices[0].finish_reason == "stop"

    with_node(model, body)


def test_a_returned_message_sent_back_is_accepted(model: Model) -> None:  # noqa: F811
    """A reply sent back in the conversation as model_dump() gives it (refusal, tool_calls, audio ...
    null), or as the pydantic message itself, and a field given as null: answered as the plain
    request is."""

    async def body(node: Node) -> None:
        req: dict[str, Any] = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 6, "temperature": 0}
        with node.sdk() as client:
            first = await in_thread(lambda: client.chat.completions.create(**req))
            reply = first.choices[0].message
            follow = {"role": "user", "content": "And then?"}
            dumped = reply.model_dump()
            assert dumped["tool_calls"] is None and dumped["refusal"] is None
            _, want = await node.http.post(
                "/v1/chat/completions",
                {**req, "messages": [*CHAT, {"role": "assistant", "content": reply.content}, follow]},
            )
            for sent_back in (dumped, reply):
                again = await in_thread(
                    lambda m=sent_back: client.chat.completions.create(
                        **{**req, "messages": [*CHAT, m, follow]}
                    )
                )
                assert again.choices[0].message.content == want["choices"][0]["message"]["content"]
            nulls = await in_thread(lambda: client.chat.completions.create(**req, extra_body={"top_k": None}))
            assert nulls.choices[0].message.content == reply.content

    with_node(model, body)


def test_newer_sdk_parameters_at_values_we_honour(model: Model) -> None:  # noqa: F811
    """user's successors (safety_identifier, prompt_cache_key), metadata, store=false and
    stream_options.include_obfuscation: accepted, the answer unchanged."""

    async def body(node: Node) -> None:
        req: dict[str, Any] = {"model": MODEL_ID, "messages": CHAT, "max_tokens": 6, "temperature": 0}
        with node.sdk() as client:
            plain = (
                (await in_thread(lambda: client.chat.completions.create(**req))).choices[0].message.content
            )
            extras = await in_thread(
                lambda: client.chat.completions.create(
                    **req,
                    safety_identifier="user-1234",
                    prompt_cache_key="k",
                    metadata={"team": "a"},
                    store=False,
                )
            )
            assert extras.choices[0].message.content == plain
            for obfuscation in (False, True):

                def streamed(o: bool = obfuscation) -> str:
                    s = client.chat.completions.create(
                        **req, stream=True, stream_options={"include_usage": True, "include_obfuscation": o}
                    )
                    return "".join(c.choices[0].delta.content or "" for c in s if c.choices)

                assert await in_thread(streamed) == plain

    with_node(model, body)


def test_models_list_and_retrieve(model: Model) -> None:  # noqa: F811
    async def body(node: Node) -> None:
        with node.sdk() as client:
            (m,) = (await in_thread(client.models.list)).data
            assert (m.id, m.object, m.owned_by) == (MODEL_ID, "model", "butterfly")
            assert m.model_extra is not None and m.model_extra["root"] == model.served.root
            for name in (MODEL_ID, model.served.root):
                got = await in_thread(lambda name=name: client.models.retrieve(name))
                assert got == m
            e = await in_thread(
                lambda: expect(openai.NotFoundError, 404, lambda: client.models.retrieve("gpt-4o"))
            )
            assert e.code == "model_not_found" and MODEL_ID in e.message
        async with node.async_sdk() as aclient:
            assert [x.id async for x in aclient.models.list()] == [MODEL_ID]
            assert (await aclient.models.retrieve(MODEL_ID)).id == MODEL_ID

    with_node(model, body)


# --- Errors -----------------------------------------------------------------------------------------


def test_refusals_are_the_sdks_exception_classes(model: Model) -> None:  # noqa: F811
    async def body(node: Node) -> None:
        msgs = [{"role": "user", "content": "hi"}]
        with node.sdk(max_retries=2) as client:
            cmpl = client.completions.create
            chat = client.chat.completions.create

            def refused(cls: type[openai.APIStatusError], status: int, call: Callable[[], object]) -> Any:
                return expect(cls, status, call)

            cases: list[tuple[Callable[[], object], str | None, str, str]] = [
                (lambda: cmpl(model=MODEL_ID, prompt="hi", n=2), "n", "unsupported_value", "only n=1"),
                (lambda: chat(model=MODEL_ID, messages=msgs, n=3), "n", "unsupported_value", "only n=1"),
                (lambda: cmpl(model=MODEL_ID, prompt="hi", logprobs=2), "logprobs", "unsupported_value", ""),
                (
                    lambda: chat(model=MODEL_ID, messages=msgs, logprobs=True),
                    "logprobs",
                    "unsupported_value",
                    "",
                ),
                (
                    lambda: cmpl(model=MODEL_ID, prompt="hi", temperature=3),
                    "temperature",
                    "invalid_value",
                    "",
                ),
                (lambda: chat(model=MODEL_ID, messages=msgs, store=True), "store", "unsupported_value", ""),
                (
                    lambda: cmpl(model=MODEL_ID, prompt="hi", extra_body={"top_k": 5}),
                    "top_k",
                    "unknown_parameter",
                    "unrecognized request argument: top_k",
                ),
                (
                    lambda: cmpl(model=MODEL_ID, prompt="hi", max_tokens=1_000_000),
                    "max_tokens",
                    "context_length_exceeded",
                    "context length",
                ),
            ]
            for call, param, code, words in cases:
                e = await in_thread(lambda call=call: refused(openai.BadRequestError, 400, call))
                assert (e.param, e.code, e.type) == (param, code, "invalid_request_error")
                assert words in e.message
            assert node.attempts == ["0"] * len(cases)  # a 400 is never retried

            e = await in_thread(
                lambda: refused(openai.NotFoundError, 404, lambda: chat(model="gpt-4o", messages=msgs))
            )
            assert e.code == "model_not_found" and e.param == "model"
            assert "'gpt-4o' does not exist here" in e.message and MODEL_ID in e.message
            e = await in_thread(
                lambda: refused(
                    openai.NotFoundError, 404, lambda: client.embeddings.create(model=MODEL_ID, input="x")
                )
            )
            assert e.code == "not_found" and "/v1/embeddings" in e.message

    with_node(model, body)


def test_a_node_that_may_not_serve_fails_fast_with_its_reason(model: Model) -> None:  # noqa: F811
    """503 while not OPERATIONAL: InternalServerError with the waiting reason; Retry-After: 1, which
    the SDK honours, so its default two retries end within seconds, never a hang."""

    async def body(node: Node) -> None:
        msgs = [{"role": "user", "content": "hi"}]
        with node.sdk() as client:
            for call in (
                lambda: client.completions.create(model=MODEL_ID, prompt="hi"),
                lambda: client.chat.completions.create(model=MODEL_ID, messages=msgs, stream=True),
            ):
                e = await in_thread(lambda call=call: expect(openai.InternalServerError, 503, call))
                assert "may not serve now: loading blocks 0-1" in e.message
                assert (e.code, e.type) == ("not_serving", "service_unavailable")
                assert e.response.headers["retry-after"] == "1"
        assert node.attempts == ["0", "0"]
        node.attempts.clear()
        start = time.monotonic()
        async with node.async_sdk(max_retries=2) as aclient:
            with pytest.raises(openai.InternalServerError, match="loading blocks 0-1"):
                await aclient.chat.completions.create(model=MODEL_ID, messages=msgs)
        took = time.monotonic() - start
        assert node.attempts == ["0", "1", "2"]
        assert 1.9 < took < 10, took  # two waits of the Retry-After second

    with_node(model, body, status=lambda: LOADING)


def test_a_node_without_backend_is_not_retried(model: Model) -> None:  # noqa: F811
    async def main() -> None:
        async with node(None, model.served) as n, n.async_sdk(max_retries=2) as client:
            with pytest.raises(openai.InternalServerError) as info:
                await client.completions.create(model=MODEL_ID, prompt="hi")
            assert "runs no inference backend" in info.value.message
            assert info.value.response.headers["x-should-retry"] == "false"
            assert "retry-after" not in info.value.response.headers
            assert n.attempts == ["0"]

    run(main())


class FullOnce:
    """Refuses its first request with 429 (the KV cache full), then answers."""

    def __init__(self, answer: list[int]) -> None:
        self.answer = answer
        self.calls = 0

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        self.calls += 1
        if self.calls == 1:
            raise ServingError(429, "kv_cache_full", "busy, retry later: the KV cache is full")
        for t in self.answer:
            yield TokenEvent(t)
        yield Finished("length", len(request.prompt_ids), len(self.answer))


def test_kv_cache_full_is_a_rate_limit_error_the_sdk_retries(model: Model) -> None:  # noqa: F811
    answer = model.tok.encode("fine, thanks")

    async def body(node: Node) -> None:
        async with node.async_sdk() as client:
            with pytest.raises(openai.RateLimitError) as info:
                await client.completions.create(model=MODEL_ID, prompt="hi")
            e = info.value
            assert e.status_code == 429 and e.code == "kv_cache_full" and e.type == "rate_limit_error"
            assert "the KV cache is full" in e.message and e.response.headers["retry-after"] == "1"
        backend.calls = 0
        node.attempts.clear()
        async with node.async_sdk(max_retries=2) as client:
            r = await client.completions.create(model=MODEL_ID, prompt="hi")
        assert r.choices[0].text == model.tok.decode(answer) and node.attempts == ["0", "1"]

    backend = FullOnce(answer)
    with_node(model, body, backend=backend)


def test_a_stream_that_fails_after_its_first_token_raises_api_error(model: Model) -> None:  # noqa: F811
    ids = model.tok.encode("one two three four")
    backend = ScriptedBackend(ids, fail_after=2)

    async def body(node: Node) -> None:
        got: list[str] = []
        async with node.async_sdk() as client:
            stream = await client.completions.create(model=MODEL_ID, prompt="x", stream=True)
            with pytest.raises(openai.APIError) as info:
                async for c in stream:
                    got.append(c.choices[0].text)
        assert "".join(got) == model.tok.decode(ids[:2])
        assert info.value.message == "stage 2 stopped answering"
        assert isinstance(info.value.body, dict) and info.value.body["code"] == "stage_failed"

    with_node(model, body, backend=backend)
