"""OpenAI's request and response shapes for /v1/completions and /v1/chat/completions.

Owns reading a request body into a checked ``CompletionRequest`` (every field's type and range, with
an ``ApiError`` that names the field), the error body (``{"error": {message, type, param, code}}``)
and the response/chunk bodies. Unknown fields are refused rather than ignored: a client asking for
something this server does not do (n > 1, logprobs, tools) gets told, never a silently different
answer. A field given as null counts as not given, known or not.

Must not: tokenize, talk to the backend, or know aiohttp.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from butterfly.engine.samplingparams import SamplingParams

__all__ = [
    "ApiError",
    "ChatMessage",
    "CompletionRequest",
    "error_body",
    "parse_chat_request",
    "parse_completion_request",
]

MAX_STOP_SEQUENCES = 4
# OpenAI's default for /v1/completions; chat defaults to whatever the context leaves.
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """A request answered with an error: HTTP ``status`` and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: int | None = None,
        retryable: bool | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _error_type(status)
        # Sent as Retry-After: when a retry may succeed (429, a 503 that passes). OpenAI's SDKs honour it
        # (up to two minutes) in place of their own backoff.
        self.retry_after = retry_after
        # False: a retry cannot help (a node with no backend), sent as x-should-retry: false, the header
        # OpenAI's SDKs obey instead of retrying every 5xx.
        self.retryable = retryable


def _error_type(status: int) -> str:
    if status == 429:
        return "rate_limit_error"
    if status == 503:
        return "service_unavailable"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(e: ApiError) -> dict[str, Any]:
    return {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code="invalid_value")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str
    name: str | None = None

    def as_template_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"role": self.role, "content": self.content}
        if self.name is not None:
            d["name"] = self.name
        return d


@dataclass(frozen=True)
class CompletionRequest:
    """One checked request: exactly one of ``prompt`` (text), ``prompt_ids`` or ``messages`` is set."""

    kind: Literal["completion", "chat"]
    model: str | None
    prompt: str | None
    prompt_ids: tuple[int, ...] | None
    messages: tuple[ChatMessage, ...] | None
    max_tokens: int | None
    params: SamplingParams
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    echo: bool = False


class _Fields:
    """Typed reads of a request object's fields; each failure names the field."""

    def __init__(self, body: Mapping[str, Any], allowed: frozenset[str]) -> None:
        self.body = body
        # A field set to null is a field not given (as for the known ones): clients that build the
        # body from a dict of optional arguments send them so.
        unknown = sorted(k for k, v in body.items() if k not in allowed and v is not None)
        if unknown:
            raise ApiError(
                400,
                f"unrecognized request argument{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}",
                param=unknown[0],
                code="unknown_parameter",
            )

    def present(self, key: str) -> bool:
        return self.body.get(key) is not None

    def bool_(self, key: str, default: bool) -> bool:
        v = self.body.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise _bad(key, f"must be true or false, got {_show(v)}")
        return v

    def int_(self, key: str, lo: int, hi: int | None = None) -> int | None:
        v = self.body.get(key)
        if v is None:
            return None
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool):
            raise _bad(key, f"must be an integer, got {_show(v)}")
        if v < lo or (hi is not None and v > hi):
            raise _bad(key, f"must be {_range(lo, hi)}, got {v}")
        return v

    def number(self, key: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
        v = self.body.get(key)
        if v is None:
            return default
        if not isinstance(v, int | float) or isinstance(v, bool):
            raise _bad(key, f"must be a number, got {_show(v)}")
        f = float(v)
        if not math.isfinite(f) or f > hi or f < lo or (lo_open and f == lo):
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
            raise _bad(key, f"must be in {interval}, got {v}")
        return f

    def only(self, key: str, allowed: tuple[object, ...], why: str) -> None:
        """Fields accepted only at their neutral value (n=1, logprobs off, ...)."""
        v = self.body.get(key)
        if v is None:
            return
        # Python's 0 == False: each type must be the one the neutral value has, or logprobs: 0 passes
        # as false and n: true as 1.
        wants_bool = any(isinstance(a, bool) for a in allowed)
        if isinstance(v, bool) and not wants_bool:
            raise _bad(key, f"must be a number, got {_show(v)}")
        if wants_bool and not isinstance(v, bool):
            raise _bad(key, f"must be true or false, got {_show(v)}")
        if v not in allowed:
            raise ApiError(400, f"{key}: {why}, got {_show(v)}", param=key, code="unsupported_value")


def _show(v: object) -> str:
    text = repr(v) if not isinstance(v, str) else f'"{v}"'
    text = {"True": "true", "False": "false", "None": "null"}.get(text, text)
    return text if len(text) <= 40 else text[:37] + "..."


def _range(lo: int, hi: int | None) -> str:
    return f">= {lo}" if hi is None else f"between {lo} and {hi}"


_COMMON = frozenset(
    {
        "model",
        "max_tokens",
        "temperature",
        "top_p",
        "seed",
        "stop",
        "stream",
        "stream_options",
        "n",
        "logprobs",
        "presence_penalty",
        "frequency_penalty",
        "logit_bias",
        "user",
        # user's successors in OpenAI's API: opaque ids, not used here.
        "safety_identifier",
        "prompt_cache_key",
        # Tags for stored completions; nothing is stored here (store: false is the only answer).
        "metadata",
        "store",
    }
)
_COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "best_of", "suffix"}
_CHAT_FIELDS = _COMMON | {"messages", "max_completion_tokens", "top_logprobs", "response_format"}


def _model(f: _Fields) -> str | None:
    v = f.body.get("model")
    if v is None:
        return None
    if not isinstance(v, str) or not v:
        raise _bad("model", f"must be a model id (a non-empty string), got {_show(v)}")
    return v


def _stop(f: _Fields) -> tuple[str, ...]:
    v = f.body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list):
        raise _bad("stop", f"must be a string or a list of strings, got {_show(v)}")
    if len(items) > MAX_STOP_SEQUENCES:
        raise _bad("stop", f"at most {MAX_STOP_SEQUENCES} sequences, got {len(items)}")
    for i, s in enumerate(items):
        if not isinstance(s, str):
            raise _bad(f"stop[{i}]" if v is items else "stop", f"must be a string, got {_show(s)}")
        if not s:
            raise _bad(f"stop[{i}]" if v is items else "stop", "must not be empty")
    return tuple(items)


def _stream(f: _Fields) -> tuple[bool, bool]:
    stream = f.bool_("stream", False)
    opts = f.body.get("stream_options")
    if opts is None:
        return stream, False
    if not stream:
        raise _bad("stream_options", "is only allowed when stream is true")
    if not isinstance(opts, dict):
        raise _bad("stream_options", f"must be an object, got {_show(opts)}")
    # include_obfuscation asks for (or, false, turns off) random padding in each chunk: this server
    # never pads, which is what false asks for and what true only makes harder to measure.
    extra = sorted(set(opts) - {"include_usage", "include_obfuscation"})
    if extra:
        raise _bad(f"stream_options.{extra[0]}", "is not a recognized stream option")
    usage = opts.get("include_usage", False)
    if not isinstance(usage, bool):
        raise _bad("stream_options.include_usage", f"must be true or false, got {_show(usage)}")
    obfuscation = opts.get("include_obfuscation", False)
    if not isinstance(obfuscation, bool):
        raise _bad("stream_options.include_obfuscation", f"must be true or false, got {_show(obfuscation)}")
    return stream, usage


def _sampling(f: _Fields) -> SamplingParams:
    temperature = f.number("temperature", 1.0, 0.0, 2.0)
    top_p = f.number("top_p", 1.0, 0.0, 1.0, lo_open=True)
    seed = f.int_("seed", 0, 2**63 - 1)
    return SamplingParams(temperature=temperature, top_p=top_p, seed=seed)


def _unsupported(f: _Fields) -> None:
    f.only("n", (1,), "only n=1 is supported (one choice per request)")
    f.only("presence_penalty", (0,), "penalties are not supported (only 0)")
    f.only("frequency_penalty", (0,), "penalties are not supported (only 0)")
    lb = f.body.get("logit_bias")
    if lb is not None and lb != {}:
        raise ApiError(400, "logit_bias: is not supported", param="logit_bias", code="unsupported_value")
    for key in ("user", "safety_identifier", "prompt_cache_key"):
        v = f.body.get(key)
        if v is not None and not isinstance(v, str):
            raise _bad(key, f"must be a string, got {_show(v)}")
    f.only("store", (False,), "completions are not stored here (only false)")
    metadata = f.body.get("metadata")
    if metadata is not None and (
        not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values())
    ):
        raise _bad("metadata", f"must be an object of strings, got {_show(metadata)}")


def _prompt(f: _Fields) -> tuple[str | None, tuple[int, ...] | None]:
    if "prompt" not in f.body or f.body["prompt"] is None:
        raise ApiError(400, "prompt: is required", param="prompt", code="missing_required_parameter")
    v = f.body["prompt"]
    where = "prompt"
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str | list):
        v, where = v[0], "prompt[0]"  # a batch of one prompt: a string or token ids, nothing deeper
    if isinstance(v, str):
        if not v:
            raise _bad(where, "must not be empty")
        return v, None
    if isinstance(v, list):
        if not v:
            raise _bad(where, "must not be empty")
        if where == "prompt" and (all(isinstance(x, str) for x in v) or all(isinstance(x, list) for x in v)):
            raise ApiError(
                400,
                f"prompt: only one prompt per request is supported, got {len(v)}",
                param="prompt",
                code="unsupported_value",
            )
        for i, x in enumerate(v):
            if not isinstance(x, int) or isinstance(x, bool) or x < 0:
                raise _bad(f"{where}[{i}]", f"must be a token id (an integer >= 0), got {_show(x)}")
        return None, tuple(v)
    raise _bad("prompt", f"must be a string or a list of token ids, got {_show(v)}")


def _body(body: object) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def parse_completion_request(raw: object) -> CompletionRequest:
    f = _Fields(_body(raw), _COMPLETION_FIELDS)
    model = _model(f)
    prompt, prompt_ids = _prompt(f)
    _unsupported(f)
    f.only("best_of", (1,), "only best_of=1 is supported")
    f.only("logprobs", (), "logprobs are not supported")
    f.only("suffix", ("",), "suffix is not supported")
    echo = f.bool_("echo", False)
    stream, usage = _stream(f)
    max_tokens = f.int_("max_tokens", 1)
    return CompletionRequest(
        kind="completion",
        model=model,
        prompt=prompt,
        prompt_ids=prompt_ids,
        messages=None,
        max_tokens=COMPLETIONS_DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        params=_sampling(f),
        stop=_stop(f),
        stream=stream,
        include_usage=usage,
        echo=echo,
    )


def _content(i: int, v: object) -> str:
    param = f"messages[{i}].content"
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        parts: list[str] = []
        for j, part in enumerate(v):
            where = f"{param}[{j}]"
            if not isinstance(part, dict):
                raise _bad(where, f"must be a content part object, got {_show(part)}")
            if part.get("type") != "text":
                raise ApiError(
                    400,
                    f"{where}.type: only text content parts are supported, got {_show(part.get('type'))}",
                    param=f"{where}.type",
                    code="unsupported_value",
                )
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}.text", f"must be a string, got {_show(text)}")
            parts.append(text)
        return "".join(parts)
    raise _bad(param, f"must be a string or a list of text parts, got {_show(v)}")


def _messages(f: _Fields) -> tuple[ChatMessage, ...]:
    v = f.body.get("messages")
    if v is None:
        raise ApiError(400, "messages: is required", param="messages", code="missing_required_parameter")
    if not isinstance(v, list):
        raise _bad("messages", f"must be a list of messages, got {_show(v)}")
    if not v:
        raise _bad("messages", "must not be empty")
    out: list[ChatMessage] = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", f"must be an object, got {_show(m)}")
        # Null fields are fields not given: a message the SDK returned, sent back with model_dump(),
        # carries refusal, tool_calls, audio ... as null.
        extra = sorted(k for k, x in m.items() if k not in ("role", "content", "name") and x is not None)
        if extra:
            raise ApiError(
                400,
                f"messages[{i}].{extra[0]}: is not supported",
                param=f"messages[{i}].{extra[0]}",
                code="unsupported_value",
            )
        role = m.get("role")
        if role not in _ROLES:
            raise _bad(f"messages[{i}].role", f"must be one of {', '.join(_ROLES)}, got {_show(role)}")
        if "content" not in m or m["content"] is None:
            raise ApiError(
                400,
                f"messages[{i}].content: is required",
                param=f"messages[{i}].content",
                code="missing_required_parameter",
            )
        name = m.get("name")
        if name is not None and not isinstance(name, str):
            raise _bad(f"messages[{i}].name", f"must be a string, got {_show(name)}")
        out.append(ChatMessage(str(role), _content(i, m["content"]), name))
    return tuple(out)


def parse_chat_request(raw: object) -> CompletionRequest:
    f = _Fields(_body(raw), _CHAT_FIELDS)
    model = _model(f)
    messages = _messages(f)
    _unsupported(f)
    f.only("logprobs", (False,), "logprobs are not supported")
    f.only("top_logprobs", (0,), "logprobs are not supported")
    fmt = f.body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise ApiError(
            400,
            'response_format: only {"type": "text"} is supported',
            param="response_format",
            code="unsupported_value",
        )
    stream, usage = _stream(f)
    max_tokens = f.int_("max_tokens", 1)
    max_completion = f.int_("max_completion_tokens", 1)
    if max_tokens is not None and max_completion is not None and max_tokens != max_completion:
        raise _bad("max_completion_tokens", "differs from max_tokens; give one of them")
    return CompletionRequest(
        kind="chat",
        model=model,
        prompt=None,
        prompt_ids=None,
        messages=messages,
        max_tokens=max_completion if max_completion is not None else max_tokens,
        params=_sampling(f),
        stop=_stop(f),
        stream=stream,
        include_usage=usage,
    )
