"""`butterfly-admin generate`: send a prompt to a node's OpenAI-compatible API and stream the answer.

Owns the command: it builds a /v1/completions (or, with ``--chat``, /v1/chat/completions) request,
reads the SSE stream as it arrives and prints each piece of text at once, then the finish reason and
token counts on stderr. A refusal prints the API's error message. Exit status: 0 answered, 1 the node
refused (503 not serving, 400 bad request, ...) or the stream ended in an error, 2 usage, 3 node
unreachable, 78 bad --config.

Must not: import torch, the tokenizer or anything of the engine: it is a plain HTTP client (urllib).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any, TextIO

from butterfly.cli.admin_client import (
    EXIT_OK,
    EXIT_PROBLEM,
    EXIT_UNREACHABLE,
    add_target,
    resolve_url_or_exit,
)

__all__ = ["cmd_generate", "register"]

# A long answer may take a while between tokens on a busy cluster; a dead one is reported after this.
READ_TIMEOUT_S = 120.0


def _request_body(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"max_tokens": args.max_tokens, "stream": not args.no_stream}
    if args.chat:
        path = "/v1/chat/completions"
        body["messages"] = [{"role": "user", "content": args.prompt}]
    else:
        path = "/v1/completions"
        body["prompt"] = args.prompt
    for key in ("temperature", "top_p", "seed", "model"):
        value = getattr(args, key)
        if value is not None:
            body[key] = value
    if args.stop:
        body["stop"] = args.stop
    if body["stream"]:
        body["stream_options"] = {"include_usage": True}
    return path, body


def _events(resp: Any) -> Iterator[dict[str, Any]]:
    """The JSON events of an SSE stream, until ``data: [DONE]``."""
    for raw in resp:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        if data == "[DONE]":
            return
        yield json.loads(data)


def _text_of(event: dict[str, Any]) -> str:
    for choice in event.get("choices") or []:
        if "text" in choice:
            return str(choice["text"] or "")
        if "delta" in choice:
            return str(choice["delta"].get("content") or "")
        if "message" in choice:
            return str(choice["message"].get("content") or "")
    return ""


def _finish_of(event: dict[str, Any]) -> str | None:
    for choice in event.get("choices") or []:
        if choice.get("finish_reason"):
            return str(choice["finish_reason"])
    return None


def _summary(finish: str | None, usage: dict[str, Any] | None) -> str:
    parts = [f"finish_reason={finish}"]
    if usage:
        parts.append(f"prompt_tokens={usage.get('prompt_tokens')}")
        parts.append(f"completion_tokens={usage.get('completion_tokens')}")
    return "[" + ", ".join(parts) + "]"


def _error_message(raw: bytes, code: int) -> str:
    try:
        err = json.loads(raw)["error"]
        return f"HTTP {code}: {err['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {code}: {raw[:200].decode('utf-8', 'replace')}"


def generate(url: str, args: argparse.Namespace, out: TextIO, err: TextIO) -> int:
    path, body = _request_body(args)
    req = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json", "Accept": "text/event-stream, application/json"},
    )
    try:
        resp = urllib.request.urlopen(req, timeout=READ_TIMEOUT_S)
    except urllib.error.HTTPError as e:
        print(f"butterfly-admin generate: {_error_message(e.read(), e.code)}", file=err)
        return EXIT_PROBLEM
    except (urllib.error.URLError, OSError) as e:
        reason = e.reason if isinstance(e, urllib.error.URLError) else e
        print(f"butterfly-admin generate: cannot reach {url}: {reason}", file=err)
        return EXIT_UNREACHABLE
    with resp:
        finish: str | None = None
        usage: dict[str, Any] | None = None
        try:
            if not body["stream"]:
                whole = json.loads(resp.read())
                out.write(_text_of(whole))
                finish, usage = _finish_of(whole), whole.get("usage")
            else:
                for event in _events(resp):
                    if "error" in event:
                        said = event["error"]
                        out.write("\n")
                        why = said.get("message") if isinstance(said, dict) else said
                        print(f"butterfly-admin generate: {why}", file=err)
                        return EXIT_PROBLEM
                    out.write(_text_of(event))
                    out.flush()
                    finish = _finish_of(event) or finish
                    usage = event.get("usage") or usage
        except (OSError, ValueError) as e:
            out.write("\n")
            print(f"butterfly-admin generate: the answer broke off: {e}", file=err)
            return EXIT_PROBLEM
        except (AttributeError, TypeError, KeyError) as e:
            # Valid JSON of another shape: not an OpenAI completion (not a Butterfly node, or a proxy).
            out.write("\n")
            print(f"butterfly-admin generate: the answer is not an OpenAI completion ({e!r})", file=err)
            return EXIT_PROBLEM
    out.write("\n")
    out.flush()
    print(_summary(finish, usage), file=err)
    return EXIT_OK


def cmd_generate(args: argparse.Namespace) -> int:
    url = resolve_url_or_exit(args)
    if isinstance(url, int):
        return url
    return generate(url, args, sys.stdout, sys.stderr)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    g = sub.add_parser(
        "generate",
        help="send a prompt to a node and stream the answer",
        description="Send PROMPT to a node's OpenAI-compatible API (any node of the cluster) and print "
        "the answer as it streams; the finish reason and token counts go to stderr. Exit status: 0 "
        "answered, 1 refused or broken off, 3 node unreachable, 78 bad --config.",
    )
    add_target(g)
    g.add_argument("prompt", metavar="PROMPT")
    g.add_argument("--chat", action="store_true", help="send PROMPT as a user message (chat template)")
    g.add_argument("--max-tokens", type=int, default=32, metavar="N", help="at most N tokens (default 32)")
    g.add_argument("--temperature", type=float, help="0 is greedy; the server's default is 1")
    g.add_argument("--top-p", dest="top_p", type=float)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", metavar="TEXT", help="end the answer before TEXT (repeatable)")
    g.add_argument("--model", help="the model id (default: whatever the node serves)")
    g.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    g.set_defaults(func=cmd_generate)
