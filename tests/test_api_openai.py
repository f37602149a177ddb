"""The OpenAI-compatible API against a real listening server and real tokens.

The backend is mostly ``LocalBackend`` over the engine on the test model (tokenizer read through the
manifest), so answers are the model's; fakes stand in where a test needs a backend that fails, stalls
or counts how it was closed. Every test runs its own server on 127.0.0.1 port 0 inside asyncio.run.
"""

from __future__ import annotations

import asyncio
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from butterfly.api import make_app, start_api, v1
from butterfly.api.tokenizer import ServingTokenizer, load_serving_tokenizer
from butterfly.api.v1 import ServedModel
from butterfly.engine.generate import Pipeline, generate
from butterfly.engine.model import StageModel
from butterfly.engine.sampler import SamplingParams
from butterfly.engine.weights import ModelDir, open_model_dir
from butterfly.serving.backend import Backend, Finished, GenerationRequest, ServingError, TokenEvent
from butterfly.serving.local import LocalBackend
from butterfly.status import NodeStatus
from butterfly.weights.manifest import MANIFEST_FILE, read_manifest
from butterfly.weights.sources import FilesystemSource
from butterfly.weights.testmodel import make_test_model
from tests.test_api import make_status

T = TypeVar("T")
torch.set_num_threads(1)

MODEL_ID = "test-model"
SERVING = make_status(state="OPERATIONAL", phase="operational", may_serve=True, waiting_reason=None)
LOADING = make_status(state="LOADING", phase="loading_weights", waiting_reason="loading blocks 0-1")


@dataclass
class Model:
    path: Path
    served: ServedModel
    md: ModelDir
    pipe: Pipeline

    @property
    def tok(self) -> ServingTokenizer:
        return self.served.tokenizer


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Model]:
    path = make_test_model(
        tmp_path_factory.mktemp("w") / MODEL_ID,
        layers=2,
        hidden=64,
        heads=4,
        kv_heads=2,
        vocab=384,
        shards=1,
        dtype="float32",
    )
    manifest = read_manifest(path / MANIFEST_FILE)
    src = FilesystemSource(path)
    try:
        tok = load_serving_tokenizer(manifest, src)
    finally:
        src.close()
    md = open_model_dir(path)
    stage = StageModel(md.config, md.weights, 0, md.config.num_layers, md.config.num_layers)
    pipe = Pipeline([stage], 64 << 20)
    yield Model(path, ServedModel(MODEL_ID, manifest.merkle_root, tok), md, pipe)  # type: ignore[misc]
    del stage, pipe
    md.weights.clear()


def run(coro: Awaitable[T]) -> T:
    async def wrapper() -> T:
        return await asyncio.wait_for(coro, timeout=60)

    return asyncio.run(wrapper())


@dataclass
class Client:
    session: aiohttp.ClientSession
    base: str

    async def post(self, path: str, body: object, **kw: Any) -> tuple[int, Any]:
        async with self.session.post(self.base + path, json=body, **kw) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text

    async def raw(self, path: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        async with self.session.post(self.base + path, data=data, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.session.get(self.base + path) as resp:
            return resp.status, (await resp.json() if path != "/metrics" else await resp.text())

    async def sse(self, path: str, body: dict[str, Any]) -> tuple[int, list[Any], str]:
        """Status, the decoded data events (the string "[DONE]" for the end marker), and the raw text."""
        async with self.session.post(self.base + path, json={**body, "stream": True}) as resp:
            raw = await resp.text()
            if resp.status != 200:
                return resp.status, [json.loads(raw)], raw
            assert resp.headers["Content-Type"].startswith("text/event-stream")
        events: list[Any] = []
        assert raw.endswith("\n\n"), raw[-50:]
        for block in raw[:-2].split("\n\n"):
            assert block.startswith("data: "), block
            payload = block[len("data: ") :]
            events.append("[DONE]" if payload == "[DONE]" else json.loads(payload))
        return 200, events, raw


@asynccontextmanager
async def serving(
    backend: Backend | None,
    served: ServedModel | None,
    status: Callable[[], NodeStatus] = lambda: SERVING,
) -> AsyncIterator[Client]:
    server = await start_api(make_app(status, backend, lambda: served), "127.0.0.1", 0)
    try:
        async with aiohttp.ClientSession() as session:
            yield Client(session, f"http://127.0.0.1:{server.port}")
    finally:
        await server.close()


def with_local(model: Model, body: Callable[[Client, LocalBackend], Awaitable[T]], **kw: Any) -> T:
    backend = LocalBackend(model.pipe)

    async def main() -> T:
        async with serving(backend, model.served, **kw) as client:
            return await body(client, backend)

    try:
        return run(main())
    finally:
        backend.close()
        assert not backend.active, "a sequence kept its KV cache"


def greedy(model: Model, prompt_ids: list[int], n: int) -> list[int]:
    return generate(model.pipe, prompt_ids, n, SamplingParams(temperature=0.0), seq_id=999_999)


def assert_error(status: int, body: Any, want_status: int, param: str | None = None) -> dict[str, Any]:
    assert status == want_status, body
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, err
    return dict(err)


# --- Completions against real tokens --------------------------------------------------------------


def test_completion_is_the_engines_greedy_answer(model: Model) -> None:
    prompt = "The quick brown fox"
    ids = model.tok.encode(prompt)
    want = greedy(model, ids, 12)

    async def body(c: Client, b: LocalBackend) -> None:
        status, r = await c.post(
            "/v1/completions", {"model": MODEL_ID, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        )
        assert status == 200, r
        assert r["object"] == "text_completion" and r["model"] == MODEL_ID and r["id"].startswith("cmpl-")
        choice = r["choices"][0]
        eos = [i for i, t in enumerate(want) if t in model.tok.eos_token_ids]
        n = eos[0] + 1 if eos else 12
        assert choice["text"] == model.tok.decode(want[:n])
        assert choice["finish_reason"] == ("stop" if eos else "length")
        assert r["usage"] == {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

    with_local(model, body)


def test_prompt_as_token_ids_and_by_manifest_root(model: Model) -> None:
    ids = model.tok.encode("Hello, world.")
    want = greedy(model, ids, 5)

    async def body(c: Client, b: LocalBackend) -> None:
        status, r = await c.post(
            "/v1/completions", {"model": model.served.root, "prompt": ids, "max_tokens": 5, "temperature": 0}
        )
        assert status == 200, r
        assert r["usage"]["prompt_tokens"] == len(ids)
        assert r["choices"][0]["text"] == model.tok.decode(want[: r["usage"]["completion_tokens"]])

    with_local(model, body)


def test_streamed_text_joins_to_the_whole_answer(model: Model) -> None:
    req = {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0}

    async def body(c: Client, b: LocalBackend) -> None:
        _, whole = await c.post("/v1/completions", req)
        status, events, raw = await c.sse(
            "/v1/completions", {**req, "stream_options": {"include_usage": True}}
        )
        assert status == 200
        assert events[-1] == "[DONE]" and raw.endswith("data: [DONE]\n\n")
        chunks, usage = events[:-2], events[-2]
        assert all(e["object"] == "text_completion" and e["id"] == chunks[0]["id"] for e in chunks)
        assert all(e["usage"] is None for e in chunks)
        assert [e["choices"][0]["finish_reason"] for e in chunks[:-1]] == [None] * (len(chunks) - 1)
        assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
        assert "".join(e["choices"][0]["text"] for e in chunks) == whole["choices"][0]["text"]
        assert len(chunks) > 2  # streamed token by token, not in one piece
        assert usage["choices"] == [] and usage["usage"] == whole["usage"]

    with_local(model, body)


def test_seeded_sampling_repeats_and_temperature_changes_the_answer(model: Model) -> None:
    req = {"prompt": "Tell me a story", "max_tokens": 16, "temperature": 1.5, "top_p": 0.95, "seed": 7}

    async def body(c: Client, b: LocalBackend) -> None:
        a = (await c.post("/v1/completions", req))[1]["choices"][0]["text"]
        again = (await c.post("/v1/completions", req))[1]["choices"][0]["text"]
        other = [
            (await c.post("/v1/completions", {**req, "seed": s}))[1]["choices"][0]["text"] for s in (1, 2, 3)
        ]
        assert a == again
        assert any(o != a for o in other)

    with_local(model, body)


# --- Stop strings ----------------------------------------------------------------------------------


def test_stop_string_cuts_the_answer_and_ends_the_sequence(model: Model) -> None:
    """A stop string taken from the model's own greedy answer: the answer ends just before it, the
    backend's iterator is closed there (fewer tokens than max_tokens), streamed or not."""
    ids = model.tok.encode("The five boxing wizards")
    full = greedy(model, ids, 30)
    text = model.tok.decode(full)
    assert len(text) > 12, text
    stop = text[8:11]
    assert stop and stop.strip(), text
    want = text[: text.index(stop)]

    async def body(c: Client, b: LocalBackend) -> None:
        req = {"prompt": ids, "max_tokens": 30, "temperature": 0, "stop": ["never-said", stop]}
        status, r = await c.post("/v1/completions", req)
        assert status == 200, r
        assert r["choices"][0]["text"] == want and r["choices"][0]["finish_reason"] == "stop"
        assert r["usage"]["completion_tokens"] < 30
        _, events, _ = await c.sse("/v1/completions", req)
        chunks = events[:-1]
        assert "".join(e["choices"][0]["text"] for e in chunks) == want
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        # A stop string as one string, and one that never appears.
        _, r = await c.post("/v1/completions", {**req, "stop": stop})
        assert r["choices"][0]["text"] == want
        _, r = await c.post("/v1/completions", {**req, "stop": "\u00a7\u00a7never"})
        assert r["choices"][0]["text"] == text and r["choices"][0]["finish_reason"] == "length"

    with_local(model, body)


class ScriptedBackend:
    """Yields the given token ids, then Finished; records how it ended."""

    def __init__(
        self, ids: list[int], *, stall_after: int | None = None, fail_after: int | None = None
    ) -> None:
        self.ids = ids
        self.stall_after = stall_after
        self.fail_after = fail_after
        self.closed = asyncio.Event()
        self.yielded = 0
        self.requests: list[GenerationRequest] = []

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        self.requests.append(request)
        try:
            for i, t in enumerate(self.ids):
                if i == self.fail_after:
                    raise ServingError(503, "stage_failed", "stage 2 stopped answering")
                if i == self.stall_after:
                    await asyncio.sleep(3600)
                self.yielded += 1
                yield TokenEvent(t)
            yield Finished("length", len(request.prompt_ids), len(self.ids))
        finally:
            self.closed.set()


def test_stop_string_across_tokens_never_leaks_a_prefix(model: Model) -> None:
    """A stop string split over several tokens: no streamed chunk ever holds a part of it."""
    ids = model.tok.encode("Hello there, general Kenobi. More text")
    stop = "general Kenobi"

    async def body(c: Client) -> None:
        status, events, _ = await c.sse("/v1/completions", {"prompt": "x", "stop": [stop], "max_tokens": 100})
        assert status == 200
        texts = [e["choices"][0]["text"] for e in events[:-1]]
        assert "".join(texts) == "Hello there, "
        assert not any("gen" in t for t in texts)
        assert events[-2]["choices"][0]["finish_reason"] == "stop"

    backend = ScriptedBackend(ids)
    run(_with(backend, model.served, body))
    assert backend.closed.is_set() and backend.yielded < len(ids)


async def _with(
    backend: Backend | None,
    served: ServedModel | None,
    body: Callable[[Client], Awaitable[T]],
    status: Callable[[], NodeStatus] = lambda: SERVING,
) -> T:
    async with serving(backend, served, status) as client:
        return await body(client)


def test_multibyte_characters_stream_whole(model: Model) -> None:
    """Byte-level tokens that split a character: no chunk carries a replacement character."""
    text = "caf\u00e9 \u2603 \U0001f98b done"
    ids = model.tok.encode(text)
    assert len(ids) > len(text.split())  # the characters span several byte tokens

    async def body(c: Client) -> None:
        _, events, _ = await c.sse("/v1/completions", {"prompt": "x", "max_tokens": 100})
        texts = [e["choices"][0]["text"] for e in events[:-1]]
        assert "".join(texts) == text and not any("\ufffd" in t for t in texts)

    run(_with(ScriptedBackend(ids), model.served, body))


# --- Chat -----------------------------------------------------------------------------------------


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": [{"type": "text", "text": "And "}, {"type": "text", "text": "why?"}]},
]


def test_chat_template_renders_as_transformers_does(model: Model) -> None:
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast.from_pretrained(str(model.path))
    plain = [
        {"role": m["role"], "content": m["content"] if isinstance(m["content"], str) else "And why?"}
        for m in MESSAGES
    ]
    for gen_prompt in (True, False):
        want = hf.apply_chat_template(plain, tokenize=False, add_generation_prompt=gen_prompt)
        assert model.tok.render_chat(plain, add_generation_prompt=gen_prompt) == want
    want_ids = hf.apply_chat_template(plain, tokenize=True, add_generation_prompt=True)
    if hasattr(want_ids, "keys"):  # newer transformers return a BatchEncoding
        want_ids = want_ids["input_ids"]
    assert model.tok.chat_prompt_ids(plain) == list(want_ids)
    # Completions encode as transformers' encode() does, special tokens and all.
    assert model.tok.encode("Hello, world.") == hf.encode("Hello, world.")


def test_template_features_transformers_templates_use(model: Model) -> None:
    """raise_exception, tojson, loop controls, trim_blocks/lstrip_blocks and special-token
    variables render as transformers renders them."""
    from transformers import PreTrainedTokenizerFast

    template = (
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m['role'] == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}\n"
        "  {% if loop.index > 3 %}{% break %}{% endif %}\n"
        "  {{ m['role'] | upper }}: {{ m['content'] | tojson }}{{ eos_token }}\n"
        "{% endfor %}"
        "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
    )
    cfg = json.loads((model.path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    tok = ServingTokenizer.from_bytes(
        (model.path / "tokenizer.json").read_bytes(),
        json.dumps(cfg).encode(),
        json.loads((model.path / "config.json").read_text()),
    )
    hf = PreTrainedTokenizerFast.from_pretrained(str(model.path))
    hf.chat_template = template
    msgs = [{"role": "user", "content": f'q{i} \u00e9"x"'} for i in range(5)]
    assert tok.render_chat(msgs) == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)

    async def body(c: Client) -> None:
        status, r = await c.post("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]})
        err = assert_error(status, r, 400, "messages")
        assert "no tools here" in err["message"]

    run(_with(ScriptedBackend([1]), ServedModel(MODEL_ID, "r", tok), body))


def test_chat_completion_answers_the_templated_prompt(model: Model) -> None:
    plain = [{"role": "user", "content": "Hello"}]
    ids = model.tok.chat_prompt_ids(plain)
    want = greedy(model, ids, 8)

    async def body(c: Client, b: LocalBackend) -> None:
        status, r = await c.post(
            "/v1/chat/completions", {"model": MODEL_ID, "messages": plain, "max_tokens": 8, "temperature": 0}
        )
        assert status == 200, r
        assert r["object"] == "chat.completion" and r["id"].startswith("chatcmpl-")
        n = r["usage"]["completion_tokens"]
        assert r["usage"]["prompt_tokens"] == len(ids)
        assert r["choices"][0]["message"] == {"role": "assistant", "content": model.tok.decode(want[:n])}
        status, events, _ = await c.sse(
            "/v1/chat/completions", {"messages": plain, "max_tokens": 8, "temperature": 0}
        )
        assert status == 200
        chunks = events[:-1]
        assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert all(e["object"] == "chat.completion.chunk" for e in chunks)
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in chunks) == model.tok.decode(
            want[:n]
        )
        assert chunks[-1]["choices"][0]["delta"] == {}
        assert chunks[-1]["choices"][0]["finish_reason"] == r["choices"][0]["finish_reason"]

    with_local(model, body)


# --- Validation: every field -----------------------------------------------------------------------

BAD_COMPLETIONS: list[tuple[dict[str, Any], int, str | None, str]] = [
    ({}, 400, "prompt", "required"),
    ({"prompt": 3}, 400, "prompt", "string or a list"),
    ({"prompt": ""}, 400, "prompt", "empty"),
    ({"prompt": []}, 400, "prompt", "empty"),
    ({"prompt": ["a", "b"]}, 400, "prompt", "one prompt"),
    ({"prompt": [1, "a"]}, 400, "prompt[1]", "token id"),
    ({"prompt": [["a", "b"]]}, 400, "prompt[0][0]", "token id"),
    ({"prompt": [[1, [2]]]}, 400, "prompt[0][1]", "token id"),
    ({"prompt": [[]]}, 400, "prompt[0]", "empty"),
    ({"prompt": [1, -2]}, 400, "prompt[1]", "token id"),
    ({"prompt": [1, 100000]}, 400, "prompt[1]", "vocabulary"),
    ({"prompt": "hi", "model": "gpt-4"}, 404, "model", "does not exist"),
    ({"prompt": "hi", "model": 5}, 400, "model", "string"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens", "integer"),
    ({"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens", "integer"),
    ({"prompt": "hi", "max_tokens": True}, 400, "max_tokens", "integer"),
    ({"prompt": "hi", "max_tokens": 5000}, 400, "max_tokens", "context length"),
    ({"prompt": "hi", "temperature": -0.1}, 400, "temperature", "[0, 2]"),
    ({"prompt": "hi", "temperature": 2.5}, 400, "temperature", "[0, 2]"),
    ({"prompt": "hi", "temperature": "hot"}, 400, "temperature", "number"),
    ({"prompt": "hi", "top_p": 0}, 400, "top_p", "(0, 1]"),
    ({"prompt": "hi", "top_p": 1.5}, 400, "top_p", "(0, 1]"),
    ({"prompt": "hi", "seed": -1}, 400, "seed", "between"),
    ({"prompt": "hi", "seed": 2**64}, 400, "seed", "between"),
    ({"prompt": "hi", "seed": "x"}, 400, "seed", "integer"),
    ({"prompt": "hi", "stop": 3}, 400, "stop", "string"),
    ({"prompt": "hi", "stop": ["a", 3]}, 400, "stop[1]", "string"),
    ({"prompt": "hi", "stop": [""]}, 400, "stop[0]", "empty"),
    ({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", "at most 4"),
    ({"prompt": "hi", "stream": "yes"}, 400, "stream", "true or false"),
    ({"prompt": "hi", "stream_options": {"include_usage": True}}, 400, "stream_options", "stream is true"),
    ({"prompt": "hi", "stream": True, "stream_options": {"x": 1}}, 400, "stream_options.x", "recognized"),
    (
        {"prompt": "hi", "stream": True, "stream_options": {"include_usage": 1}},
        400,
        "stream_options.include_usage",
        "true or false",
    ),
    ({"prompt": "hi", "n": 2}, 400, "n", "only n=1"),
    ({"prompt": "hi", "n": True}, 400, "n", "number"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of", "best_of=1"),
    ({"prompt": "hi", "logprobs": 2}, 400, "logprobs", "not supported"),
    ({"prompt": "hi", "presence_penalty": 0.5}, 400, "presence_penalty", "not supported"),
    ({"prompt": "hi", "frequency_penalty": 1}, 400, "frequency_penalty", "not supported"),
    ({"prompt": "hi", "logit_bias": {"5": 10}}, 400, "logit_bias", "not supported"),
    ({"prompt": "hi", "suffix": "end"}, 400, "suffix", "not supported"),
    ({"prompt": "hi", "echo": 1}, 400, "echo", "true or false"),
    ({"prompt": "hi", "user": 1}, 400, "user", "string"),
    ({"prompt": "hi", "top_k": 5}, 400, "top_k", "unrecognized"),
]

BAD_CHATS: list[tuple[dict[str, Any], int, str | None, str]] = [
    ({}, 400, "messages", "required"),
    ({"messages": "hi"}, 400, "messages", "list"),
    ({"messages": []}, 400, "messages", "empty"),
    ({"messages": ["hi"]}, 400, "messages[0]", "object"),
    ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role", "one of"),
    ({"messages": [{"content": "x"}]}, 400, "messages[0].role", "one of"),
    ({"messages": [{"role": "user"}]}, 400, "messages[0].content", "required"),
    ({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", "string"),
    (
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0].type",
        "text",
    ),
    (
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
        400,
        "messages[0].content[0].text",
        "string",
    ),
    (
        {"messages": [{"role": "user", "content": "x", "tool_calls": []}]},
        400,
        "messages[0].tool_calls",
        "not supported",
    ),
    ({"messages": [{"role": "user", "content": "x", "name": 3}]}, 400, "messages[0].name", "string"),
    ({"messages": [{"role": "user", "content": "x"}], "tools": []}, 400, "tools", "unrecognized"),
    (
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 3, "max_completion_tokens": 4},
        400,
        "max_completion_tokens",
        "differs",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": 0},
        400,
        "max_completion_tokens",
        ">= 1",
    ),
    (
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_object"}},
        400,
        "response_format",
        "text",
    ),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, 400, "logprobs", "not supported"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": 0}, 400, "logprobs", "true or false"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 3}, 400, "n", "only n=1"),
]


def test_every_field_is_checked_and_named(model: Model) -> None:
    backend = ScriptedBackend([5, 6, 7])

    async def body(c: Client) -> None:
        for path, cases in (("/v1/completions", BAD_COMPLETIONS), ("/v1/chat/completions", BAD_CHATS)):
            for req, want_status, param, words in cases:
                status, r = await c.post(path, req)
                err = assert_error(status, r, want_status, param)
                assert words in err["message"], (req, err)
                if want_status == 400:
                    assert err["type"] == "invalid_request_error"
                else:
                    assert err["code"] == "model_not_found"

    run(_with(backend, model.served, body))
    assert backend.requests == []  # nothing malformed reached the backend


def test_malformed_bodies(model: Model) -> None:
    async def body(c: Client) -> None:
        for data in (b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"', b"null"):
            status, r = await c.raw("/v1/completions", data, {"Content-Type": "application/json"})
            assert_error(status, r, 400)

        # A chunked body (no Content-Length) is refused before it is read.
        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"prompt": "hi"}'

        async with c.session.post(c.base + "/v1/completions", data=chunks()) as resp:
            assert_error(resp.status, await resp.json(), 411)

    run(_with(ScriptedBackend([5]), model.served, body))


def test_lone_surrogates_are_invalid_json_not_a_500(model: Model) -> None:
    """JSON's \\ud800 escapes (and UTF-8-encoded surrogates) decode to strings that are not Unicode
    text: the tokenizer raised on them, and an error quoting one could not be encoded (both a 500)."""
    backend = ScriptedBackend([5])
    cases = [
        ("/v1/completions", rb'{"prompt": "\ud800"}'),
        ("/v1/completions", rb'{"prompt": "hi", "suffix": "x\udfff"}'),
        ("/v1/completions", rb'{"prompt": "hi", "\ud800": 1}'),
        ("/v1/completions", b'{"prompt": "\xed\xa0\x80"}'),
        (
            "/v1/chat/completions",
            rb'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]}',
        ),
        ("/v1/chat/completions", rb'{"messages": [{"role": "\ud800", "content": "x"}]}'),
    ]

    async def body(c: Client) -> None:
        for path, data in cases:
            status, r = await c.raw(path, data, {"Content-Type": "application/json"})
            err = assert_error(status, r, 400)
            assert err["code"] == "invalid_json" and "surrogate" in err["message"], (data, err)
        # A surrogate pair is one character, and fine.
        status, r = await c.raw("/v1/completions", rb'{"prompt": "\ud83d\ude00"}')
        assert status == 200, r

    run(_with(backend, model.served, body))
    assert len(backend.requests) == 1


def test_undecodable_body_is_400_and_a_gzipped_one_is_read(model: Model) -> None:
    """aiohttp decodes Content-Encoding as the body is read; a body that does not decode raised out of
    the handler (a 500)."""
    good = json.dumps({"prompt": "hi", "max_tokens": 1}).encode()

    async def body(c: Client) -> None:
        for data in (b"{}", gzip.compress(good) + b"trailing"):
            status, r = await c.raw("/v1/completions", data, {"Content-Encoding": "gzip"})
            err = assert_error(status, r, 400)
            assert err["code"] == "invalid_body" and "content-encoding: gzip" in err["message"], err
        status, r = await c.raw("/v1/completions", gzip.compress(good), {"Content-Encoding": "gzip"})
        assert status == 200 and r["usage"]["completion_tokens"] == 1, r

    run(_with(ScriptedBackend([5]), model.served, body))


def test_a_body_that_never_arrives_is_408(model: Model, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard's deadline covers a request's head only, and a connection whose request is being
    handled is never evicted: a client that sent a head and withheld the body held it for good."""
    monkeypatch.setattr(v1, "BODY_TIMEOUT_S", 0.5)
    head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n"

    async def body(c: Client) -> None:
        port = int(c.base.rsplit(":", 1)[1])
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(head + b'{"prompt": "hi"')
            await w.drain()
            status_line = await asyncio.wait_for(r.readline(), 5)
            assert status_line.startswith(b"HTTP/1.1 408"), status_line
            while await r.readline() not in (b"\r\n", b""):
                pass
            err = assert_error(408, json.loads(await r.readuntil(b"}}")), 408)
            assert err["code"] == "request_timeout" and "100 bytes" in err["message"]
            # The server then closes the connection: it is not kept for the rest of that body.
            assert await asyncio.wait_for(r.read(), 10) == b""
        finally:
            w.close()
        assert (await c.get("/status"))[0] == 200

    run(_with(ScriptedBackend([5]), model.served, body))


def test_requests_the_http_parser_refuses_get_openai_error_bodies(model: Model) -> None:
    """aiohttp answers what its parser refuses before any handler or middleware runs; it sent those
    400s as text/plain. Each is OpenAI's error body naming the fault, the connection is closed, and the
    server goes on answering."""
    cases = [
        (b"GARBAGE\r\n\r\n", "Invalid method"),
        (b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", "Content-Length"),
        (b"GET /v1/models HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n", "more than 8190 bytes"),
        (b"GET /v1/\x00 HTTP/1.1\r\nHost: x\r\n\r\n", "url"),
        (
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            b"Content-Length: 3\r\n\r\n",
            "Transfer-Encoding",
        ),
    ]

    async def body(c: Client) -> None:
        port = int(c.base.rsplit(":", 1)[1])
        for raw, words in cases:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            try:
                w.write(raw)
                await w.drain()
                head, _, payload = (await asyncio.wait_for(r.read(), 10)).partition(b"\r\n\r\n")
            finally:
                w.close()
            assert head.split(b"\r\n")[0].endswith(b" 400 Bad Request"), (raw[:40], head)
            assert b"content-type: application/json" in head.lower(), head
            err = assert_error(400, json.loads(payload), 400)
            assert err["code"] == "bad_request" and err["type"] == "invalid_request_error", err
            assert err["message"].startswith("malformed HTTP request: ") and words in err["message"], err
            assert "\n" not in err["message"] and len(err["message"]) < 400, err
        status, _ = await c.get("/v1/models")
        assert status == 200

    run(_with(ScriptedBackend([5]), model.served, body))


def test_prompt_up_to_the_context_is_accepted_and_longer_refused(model: Model) -> None:
    ctx = model.tok.context_length
    ids = model.tok.encode("Pack my box with five dozen liquor jugs. ")
    long_ids = (ids * (ctx // len(ids) + 1))[: ctx - 1]
    # A text prompt of nearly the whole context: far over the old 1 KiB limit.
    text = model.tok.decode(ids) * (ctx // len(ids) - 1)
    text_tokens = len(model.tok.encode(text))
    assert ctx // 2 < text_tokens < ctx and len(text) > 2048

    async def body(c: Client) -> None:
        status, r = await c.post("/v1/completions", {"prompt": text, "max_tokens": 1})
        assert status == 200, r
        assert r["usage"]["prompt_tokens"] == text_tokens
        status, r = await c.post("/v1/completions", {"prompt": long_ids, "max_tokens": 1})
        assert status == 200, r
        assert r["usage"]["prompt_tokens"] == ctx - 1
        status, r = await c.post("/v1/completions", {"prompt": long_ids + ids[:1], "max_tokens": 1})
        err = assert_error(status, r, 400, "prompt")
        assert err["code"] == "context_length_exceeded" and str(ctx) in err["message"]
        status, r = await c.post("/v1/completions", {"prompt": long_ids[:-5], "max_tokens": 10})
        assert_error(status, r, 400, "max_tokens")
        # The default max_tokens (16) shrinks to the room left rather than failing.
        status, r = await c.post("/v1/completions", {"prompt": long_ids[:-3]})
        assert status == 200 and r["usage"]["completion_tokens"] <= 4
        # Bodies far beyond what a max-context prompt needs are refused before they are read.
        status, r = await c.raw("/v1/completions", b" " * (200 * ctx), {"Content-Type": "application/json"})
        assert_error(status, r, 413)
        # Other endpoints keep their small limit.
        async with c.session.post(c.base + "/status", data=b"x" * 4096) as resp:
            assert resp.status == 413

    run(_with(ScriptedBackend([5]), model.served, body))


# --- 503 paths, backend errors ---------------------------------------------------------------------


def test_503_while_the_node_may_not_serve(model: Model) -> None:
    backend = ScriptedBackend([5])
    state = {"status": LOADING}

    async def body(c: Client) -> None:
        for path, req in (
            ("/v1/completions", {"prompt": "hi"}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ):
            status, r = await c.post(path, req)
            err = assert_error(status, r, 503)
            assert "loading blocks 0-1" in err["message"] and err["type"] == "service_unavailable"
            status, r = await c.post(path, {**req, "stream": True})
            assert_error(status, r, 503)
        state["status"] = SERVING
        status, r = await c.post("/v1/completions", {"prompt": "hi"})
        assert status == 200, r

    run(_with(backend, model.served, body, status=lambda: state["status"]))
    assert len(backend.requests) == 1


def test_503_without_backend_or_tokenizer(model: Model) -> None:
    async def no_backend(c: Client) -> None:
        status, r = await c.post("/v1/completions", {"prompt": "hi"})
        err = assert_error(status, r, 503)
        assert "serving not available" in err["message"]
        assert (await c.get("/v1/models"))[1]["data"][0]["id"] == MODEL_ID

    async def no_model(c: Client) -> None:
        status, r = await c.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        assert "tokenizer" in assert_error(status, r, 503)["message"]
        assert await c.get("/v1/models") == (200, {"object": "list", "data": []})

    run(_with(None, model.served, no_backend))
    run(_with(ScriptedBackend([1]), None, no_model))


class RefusingBackend:
    def __init__(self, status: int, code: str) -> None:
        self.status, self.code = status, code

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        raise ServingError(self.status, self.code, f"refused with {self.code}")
        yield TokenEvent(0)  # pragma: no cover - makes this an async generator


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("status", "code"), [(429, "kv_cache_full"), (503, "not_serving"), (400, "x")])
def test_backend_refusal_is_the_http_status(model: Model, stream: bool, status: int, code: str) -> None:
    async def body(c: Client) -> None:
        got, r = await c.post("/v1/completions", {"prompt": "hi", "stream": stream})
        err = assert_error(got, r, status)
        assert err["code"] == code and code in err["message"]
        metrics = await c.get("/metrics")
        assert f'butterfly_request_failure_total{{status="{status}"}} 1.0' in metrics[1]

    run(_with(RefusingBackend(status, code), model.served, body))


def test_backend_failure_mid_stream_is_an_error_event(model: Model) -> None:
    ids = model.tok.encode("one two three four")
    backend = ScriptedBackend(ids, fail_after=2)

    async def body(c: Client) -> None:
        status, events, _ = await c.sse("/v1/completions", {"prompt": "x"})
        assert status == 200 and events[-1] == "[DONE]"
        err = events[-2]["error"]
        assert err["code"] == "stage_failed" and err["type"] == "service_unavailable"
        backend.fail_after = 1
        status, r = await c.post("/v1/completions", {"prompt": "x"})
        assert_error(status, r, 503)

    run(_with(backend, model.served, body))


def test_local_backend_kv_cache_full_is_429(model: Model) -> None:
    # 512 bytes of cache per token in this model: room for 192 tokens.
    pipe = Pipeline(model.pipe.stages, 96 * 1024)
    backend = LocalBackend(pipe)

    async def body(c: Client) -> None:
        status, r = await c.post("/v1/completions", {"prompt": "hi", "max_tokens": 1000})
        assert "whole budget" in assert_error(status, r, 400)["message"]  # it never fits
        pipe.reserve(12345, 100)  # another sequence holds half of the cache
        status, r = await c.post("/v1/completions", {"prompt": "hi", "max_tokens": 150})
        err = assert_error(status, r, 429)
        assert err["code"] == "kv_cache_full" and err["type"] == "rate_limit_error"
        pipe.free(12345)
        status, r = await c.post("/v1/completions", {"prompt": "hi", "max_tokens": 150})
        assert status == 200, r

    try:
        run(_with(backend, model.served, body))
    finally:
        backend.close()
    assert not backend.active


# --- Client disconnects ----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_closes_the_backend_iterator(model: Model, stream: bool) -> None:
    backend = ScriptedBackend(model.tok.encode("a b c d e f"), stall_after=3)

    async def body(c: Client) -> None:
        if stream:
            async with c.session.post(
                c.base + "/v1/completions", json={"prompt": "x", "stream": True}
            ) as resp:
                assert resp.status == 200
                await resp.content.readuntil(b"\n\n")  # the first chunk arrived: generation runs
                resp.connection.transport.abort()  # type: ignore[union-attr]
        else:
            # No headers before the whole answer: the client gives up while it waits for them.
            task = asyncio.create_task(c.post("/v1/completions", {"prompt": "x"}))
            while backend.yielded < 3:
                await asyncio.sleep(0.01)
            task.cancel()
        await asyncio.wait_for(backend.closed.wait(), 10)
        status, _ = await c.get("/status")
        assert status == 200  # the API lives on

    run(_with(backend, model.served, body))
    assert backend.closed.is_set() and backend.yielded == 3


def test_disconnect_frees_the_local_backends_cache(model: Model) -> None:
    async def body(c: Client, b: LocalBackend) -> None:
        async with c.session.post(
            c.base + "/v1/completions", json={"prompt": "x", "stream": True, "max_tokens": 2000}
        ) as resp:
            await resp.content.readuntil(b"\n\n")
            assert b.active
            resp.connection.transport.abort()  # type: ignore[union-attr]
        for _ in range(1000):
            if not b.active:
                break
            await asyncio.sleep(0.01)
        assert not b.active

    with_local(model, body)


# --- Metrics and /status ---------------------------------------------------------------------------


def test_serving_metrics_and_status(model: Model) -> None:
    async def body(c: Client, b: LocalBackend) -> None:
        _, before = await c.get("/status")
        assert before["serving"]["requests_served"] == 0
        r = [
            await c.post("/v1/completions", {"prompt": "Hello", "max_tokens": 5, "temperature": 0})
            for _ in range(2)
        ]
        prompt = sum(x[1]["usage"]["prompt_tokens"] for x in r)
        gen = sum(x[1]["usage"]["completion_tokens"] for x in r)
        _, status = await c.get("/status")
        s = status["serving"]
        assert s["requests_served"] == 2 and s["requests_running"] == 0 and s["requests_waiting"] == 0
        assert s["prompt_tokens_total"] == prompt and s["generation_tokens_total"] == gen
        assert s["generation_tokens_per_second"] > 0
        msgspec.json.decode(json.dumps(status), type=NodeStatus)  # /status still decodes as NodeStatus
        _, text = await c.get("/metrics")
        fams = {f.name: f for f in text_string_to_metric_families(text)}

        def value(name: str, suffix: str = "", **labels: str) -> float:
            for smp in fams[name].samples:
                if smp.name == name + suffix and all(smp.labels.get(k) == v for k, v in labels.items()):
                    return float(smp.value)
            raise AssertionError(f"{name}{suffix} {labels} not found")

        assert value("butterfly_prompt_tokens", "_total") == prompt
        assert value("butterfly_generation_tokens", "_total") == gen
        assert value("butterfly_time_to_first_token_seconds", "_count") == 2
        assert value("butterfly_inter_token_latency_seconds", "_count") == gen - 2
        assert value("butterfly_e2e_request_latency_seconds", "_count") == 2
        assert value("butterfly_num_requests_running") == 0 and value("butterfly_num_requests_waiting") == 0
        assert value("butterfly_request_success", "_total", finished_reason="length") == 2
        assert "node_state" in fams  # the node's own metrics are still there

    with_local(model, body)


def test_running_and_waiting_while_a_request_is_in_flight(model: Model) -> None:
    backend = ScriptedBackend(model.tok.encode("a b c"), stall_after=2)

    async def body(c: Client) -> None:
        task = asyncio.create_task(c.post("/v1/completions", {"prompt": "x"}))
        while backend.yielded < 2:
            await asyncio.sleep(0.01)
        _, status = await c.get("/status")
        assert status["serving"]["requests_running"] == 1
        _, text = await c.get("/metrics")
        assert "butterfly_num_requests_running 1.0" in text
        task.cancel()

    run(_with(backend, model.served, body))


def test_models_lists_the_served_model(model: Model) -> None:
    async def body(c: Client) -> None:
        status, r = await c.get("/v1/models")
        assert status == 200 and r["object"] == "list"
        (m,) = r["data"]
        assert m["id"] == MODEL_ID and m["object"] == "model" and m["root"] == model.served.root
        assert m["max_model_len"] == model.tok.context_length
        for path in ("/v1/nope", "/v1"):  # an OpenAI client's base URL itself, too
            async with c.session.get(c.base + path) as resp:
                assert_error(resp.status, await resp.json(), 404)
        async with c.session.get(c.base + "/v1/completions") as resp:
            assert_error(resp.status, await resp.json(), 405)
            assert "POST" in resp.headers["Allow"]

    run(_with(ScriptedBackend([1]), model.served, body))


def test_the_supervisor_does_not_import_torch_for_the_api() -> None:
    """The API runs in the supervisor, which must stay light: requests, sampling parameters and the
    tokenizer are built without torch (the engine runs elsewhere)."""
    import subprocess
    import sys

    code = (
        "import sys, butterfly.supervisor.main, butterfly.api.v1, butterfly.api.served;"
        "sys.exit(2 if 'torch' in sys.modules else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
