"""`butterfly-admin generate` against a real API server running the engine on the test model."""

from __future__ import annotations

import asyncio
import io
import subprocess
import sys
from collections.abc import Callable
from typing import TypeVar

from butterfly.api import make_app, start_api
from butterfly.api.served import ServedModel
from butterfly.cli.admin import build_parser
from butterfly.cli.admin_generate import generate
from butterfly.serving.backend import Backend
from butterfly.serving.local import LocalBackend
from tests.test_api_openai import LOADING, MODEL_ID, SERVING, Model, greedy, model  # noqa: F401

T = TypeVar("T")


def run_cli(
    backend: Backend | None, served: ServedModel | None, argv: list[str], status: object = SERVING
) -> tuple[int, str, str]:
    """Exit status, stdout and stderr of ``butterfly-admin generate ARGV --url <server>``."""

    async def main() -> tuple[int, str, str]:
        server = await start_api(make_app(lambda: status, backend, lambda: served), "127.0.0.1", 0)  # type: ignore[arg-type,return-value]
        try:
            args = build_parser().parse_args(["generate", *argv, "--url", f"http://127.0.0.1:{server.port}"])
            out, err = io.StringIO(), io.StringIO()
            code = await asyncio.to_thread(generate, args.url, args, out, err)
            return code, out.getvalue(), err.getvalue()
        finally:
            await server.close()

    return asyncio.run(main())


def with_local(m: Model, body: Callable[[LocalBackend], T]) -> T:
    backend = LocalBackend(m.pipe)
    try:
        return body(backend)
    finally:
        backend.close()


def test_generate_streams_the_models_answer(model: Model) -> None:  # noqa: F811
    ids = model.tok.encode("Hello, world.")
    want = greedy(model, ids, 10)

    def body(b: LocalBackend) -> None:
        code, out, err = run_cli(
            b, model.served, ["Hello, world.", "--max-tokens", "10", "--temperature", "0"]
        )
        assert code == 0, err
        n = int(err.split("completion_tokens=")[1].rstrip("]\n"))
        assert out == model.tok.decode(want[:n]) + "\n"
        assert f"prompt_tokens={len(ids)}" in err and "finish_reason=" in err
        code, whole, _ = run_cli(
            b, model.served, ["Hello, world.", "--max-tokens", "10", "--temperature", "0", "--no-stream"]
        )
        assert code == 0 and whole == out

    with_local(model, body)


def test_generate_chat(model: Model) -> None:  # noqa: F811
    ids = model.tok.chat_prompt_ids([{"role": "user", "content": "Hi"}])
    want = greedy(model, ids, 6)

    def body(b: LocalBackend) -> None:
        code, out, err = run_cli(b, model.served, ["Hi", "--chat", "--max-tokens", "6", "--temperature", "0"])
        assert code == 0, err
        n = int(err.split("completion_tokens=")[1].rstrip("]\n"))
        assert out == model.tok.decode(want[:n]) + "\n"

    with_local(model, body)


def test_generate_reports_refusals_and_unreachable_nodes(model: Model) -> None:  # noqa: F811
    code, out, err = with_local(model, lambda b: run_cli(b, model.served, ["hi"], status=LOADING))
    assert code == 1 and "HTTP 503" in err and "loading blocks 0-1" in err
    code, out, err = run_cli(None, model.served, ["hi", "--temperature", "5"])
    assert code == 1 and "HTTP 503" in err  # no backend: refused before the request is read
    code, out, err = with_local(model, lambda b: run_cli(b, model.served, ["hi", "--temperature", "5"]))
    assert code == 1 and "temperature" in err
    proc = subprocess.run(
        [sys.executable, "-m", "butterfly.cli.admin", "generate", "hi", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 3 and "cannot reach" in proc.stderr


def test_generate_reports_an_answer_of_another_shape_instead_of_a_traceback() -> None:
    """A server that is not a Butterfly node (or a proxy in between) answers valid JSON of another
    shape: one line and exit 1, never a traceback."""
    from aiohttp import web

    answers = {
        "string error": b'data: {"error": "overloaded"}\n\n',
        "list event": b"data: [1, 2]\n\n",
        "choice of another type": b'data: {"choices": ["x"]}\n\n',
    }

    async def main() -> None:
        for what, sse in answers.items():

            async def handle(request: web.Request, sse: bytes = sse) -> web.StreamResponse:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                await resp.write(sse)
                return resp

            app = web.Application()
            app.router.add_post("/v1/completions", handle)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            try:
                args = build_parser().parse_args(["generate", "hi", "--url", f"http://127.0.0.1:{port}"])
                out, err = io.StringIO(), io.StringIO()
                code = await asyncio.to_thread(generate, args.url, args, out, err)
                assert code == 1, (what, err.getvalue())
                lines = err.getvalue().strip().splitlines()
                assert len(lines) == 1 and lines[0].startswith("butterfly-admin generate: "), (what, lines)
                if what == "string error":
                    assert lines[0] == "butterfly-admin generate: overloaded"
                else:
                    assert "not an OpenAI completion" in lines[0], (what, lines)
            finally:
                await runner.cleanup()

    asyncio.run(main())
