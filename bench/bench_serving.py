"""The serving pipeline vs transformers: tokens/s and time to first token, 1-3 stages on loopback.

    python bench/bench_serving.py             # Llama-shaped bf16 model (~0.2 GB), 2 rounds
    python bench/bench_serving.py --quick     # a smaller model, 1 round
    python bench/bench_serving.py --model DIR

In one process with ``torch.set_num_threads(--threads)``: the pipeline of 1, 2 and 3 ``StageServer``s
(each its own listener, all computing on one thread, transformers too: see ``COMPUTE``; linked by
encrypted stage links over loopback TCP) serves

- batch 1: one greedy request of --prompt-len tokens and --new-tokens new tokens, alone;
- 8 concurrent: eight such requests (different prompts) submitted at once, continuously batched;

beside transformers' generate() at batch 1 on the same weights. Reported: median ttft and tok/s
(batch 1), aggregate tok/s of the 8 (all their tokens / the wall time until the last finished) and
their mean ttft. Then the per-hop overhead: a stage link's round trip of a decode step's activations
(and of a prefill chunk's) against a plain socket round trip of the same bytes over loopback.
Everything runs on uvloop, as the engine child does (``--loop asyncio`` for asyncio's own loop).

Goals: 1 stage batch 1 >= 1.0x transformers' tok/s; 8 concurrent >= 4x the batch-1 aggregate; a hop
<= 1.3x the plain send.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import torch
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from butterfly.engine.model import StageModel  # noqa: E402
from butterfly.engine.sampler import SamplingParams  # noqa: E402
from butterfly.engine.weights import ModelDir, open_model_dir  # noqa: E402
from butterfly.serving.backend import Finished, GenerationRequest, TokenEvent  # noqa: E402
from butterfly.serving.link import ROLE_STAGE, Link, LinkError, Step, accept_link, dial_link  # noqa: E402
from butterfly.serving.stage import StageAddress, StageServer  # noqa: E402
from butterfly.weights.testmodel import make_test_model  # noqa: E402

SECRET = os.urandom(32)
GREEDY = SamplingParams(temperature=0.0)
T = TypeVar("T")
LOOP = "uvloop"
# Every torch computation of the bench runs on this one thread, transformers' included: a second thread
# running torch's parallel operators gets an OpenMP team of its own, and with more threads than cores
# both teams slow down by ~40% (StageServer's ``compute``). A node has one compute thread per process.
COMPUTE = ThreadPoolExecutor(1, thread_name_prefix="compute")


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    return uvloop.run(coro) if LOOP == "uvloop" else asyncio.run(coro)


def ensure_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    dims = (
        {"layers": 6, "hidden": 256, "heads": 8, "kv_heads": 4, "vocab": 4096}
        if args.quick
        else {"layers": 6, "hidden": 768, "heads": 12, "kv_heads": 4, "vocab": 16384}
    )
    name = f"serving-{args.dtype}-" + "-".join(f"{k}{v}" for k, v in dims.items())
    path = Path(args.workdir) / name
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        make_test_model(path, dtype=args.dtype, shards=1, manifest=False, **dims)  # type: ignore[arg-type]
    return path


def cuts_for(n_stages: int, blocks: int) -> list[int]:
    return [round(i * blocks / n_stages) for i in range(n_stages + 1)]


async def start(md: ModelDir, n_stages: int) -> list[StageServer]:
    blocks = md.layout.num_blocks
    cuts = cuts_for(n_stages, blocks)
    servers = []
    for i, (a, b) in enumerate(zip(cuts, cuts[1:], strict=False)):
        m = StageModel(md.config, md.weights, a, b, blocks)
        s = StageServer(m, index=i, epoch=1, secret=SECRET, kv_cache_bytes=1 << 30, compute=COMPUTE)
        await s.listen()
        servers.append(s)
    addrs = [
        StageAddress(i, s.model.start, s.model.stop, "127.0.0.1", s.listen_port)
        for i, s in enumerate(servers)
    ]
    for s in servers:
        s.start(addrs)
    while not servers[0].ready:
        await asyncio.sleep(0.01)
    return servers


async def one(entry: StageServer, prompt: list[int], n: int) -> tuple[float, float, int]:
    """(ttft, total, tokens) of one request."""
    t0 = time.perf_counter()
    ttft = 0.0
    got = 0
    async for ev in entry.generate(GenerationRequest(tuple(prompt), n, GREEDY)):
        if isinstance(ev, TokenEvent):
            got += 1
            if got == 1:
                ttft = time.perf_counter() - t0
        elif isinstance(ev, Finished):
            break
    return ttft, time.perf_counter() - t0, got


async def bench_pipeline(
    md: ModelDir, n_stages: int, prompts: list[list[int]], n: int, rounds: int
) -> dict[str, float]:
    servers = await start(md, n_stages)
    try:
        entry = servers[0]
        await one(entry, prompts[0], n)  # warm
        b1_ttft, b1_tps, c_tps, c_ttft = [], [], [], []
        for _ in range(rounds):
            ttft, total, got = await one(entry, prompts[0], n)
            b1_ttft.append(ttft)
            b1_tps.append(got / total)
            t0 = time.perf_counter()
            res = await asyncio.gather(*(one(entry, p, n) for p in prompts[:8]))
            wall = time.perf_counter() - t0
            c_tps.append(sum(r[2] for r in res) / wall)
            c_ttft.append(statistics.mean(r[0] for r in res))
        return {
            "ttft": statistics.median(b1_ttft),
            "tps": statistics.median(b1_tps),
            "c_tps": statistics.median(c_tps),
            "c_ttft": statistics.median(c_ttft),
        }
    finally:
        for s in servers:
            await s.close()


def bench_hf(path: Path, dtype: torch.dtype, prompt: list[int], n: int, rounds: int) -> dict[str, float]:
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    ids = torch.tensor([prompt])

    def gen(k: int) -> float:
        with torch.inference_mode():
            t = time.perf_counter()
            hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                pad_token_id=0,
            )
            return time.perf_counter() - t

    gen(n)
    ttft = statistics.median(gen(1) for _ in range(rounds))
    full = statistics.median(gen(n) for _ in range(rounds))
    return {"ttft": ttft, "tps": n / full}


# ---- per-hop overhead ------------------------------------------------------------------------------


async def hop_link(payload: bytes, hidden: int, tokens: int, reps: int) -> float:
    """Median round trip of a Step carrying ``payload`` over an encrypted stage link (echoed back)."""
    got: asyncio.Queue[Link] = asyncio.Queue()

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        link = await accept_link(r, w, SECRET, lambda _h: None)
        await got.put(link)
        try:
            while True:
                msg, raw = await link.recv()
                await link.send(msg, raw)
        except (LinkError, asyncio.CancelledError):
            link.abort()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    link = await dial_link("127.0.0.1", port, SECRET, role=ROLE_STAGE, epoch=1, index=0)
    peer = await got.get()
    step = Step(1, [1], [0], [tokens], [True], [], time.time(), "BF16", [tokens, hidden])
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        await link.send(step, payload)
        await link.recv()
        times.append(time.perf_counter() - t)
    link.abort()
    peer.abort()
    server.close()
    return statistics.median(times)


async def hop_raw(payload: bytes, reps: int) -> float:
    """Median round trip of the same bytes, length-prefixed, over a plain loopback TCP connection."""

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await r.readexactly(4)
                body = await r.readexactly(int.from_bytes(head, "big"))
                w.write(head + body)
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            w.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    r, w = await asyncio.open_connection("127.0.0.1", port)
    head = len(payload).to_bytes(4, "big")
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        w.writelines((head, payload))
        await w.drain()
        n = int.from_bytes(await r.readexactly(4), "big")
        await r.readexactly(n)
        times.append(time.perf_counter() - t)
    w.close()
    server.close()
    return statistics.median(times)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=0, help="default: 2 (1 with --quick)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "butterfly-bench"))
    p.add_argument("--loop", default="uvloop", choices=["uvloop", "asyncio"])
    args = p.parse_args()
    global LOOP
    LOOP = args.loop
    rounds = args.rounds or (1 if args.quick else 2)
    torch.set_num_threads(args.threads)
    path = ensure_model(args)
    md = open_model_dir(path)
    try:
        run(md, path, args, rounds)
    finally:
        gc.collect()  # the stages' views of the weights, in the servers' reference cycles
        md.close()
    return 0


def run(md: ModelDir, path: Path, args: argparse.Namespace, rounds: int) -> None:
    cfg = md.config
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(1, cfg.vocab_size, (args.prompt_len,), generator=g).tolist() for _ in range(8)]
    n = args.new_tokens
    dtype = next(iter(md.weights.values())).dtype
    print(
        f"model {path.name}: {dtype}, {md.layout.num_blocks} blocks, hidden {cfg.hidden_size}; threads "
        f"{torch.get_num_threads()}; prompt {args.prompt_len}, {n} new tokens; {rounds} round(s); {LOOP}"
    )
    hf = COMPUTE.submit(bench_hf, path, dtype, prompts[0], n, max(rounds, 2)).result()
    print(f"  transformers     batch 1: ttft {hf['ttft'] * 1e3:7.1f} ms  tok/s {hf['tps']:7.1f}")
    results: dict[int, dict[str, Any]] = {}
    for stages in (1, 2, 3):
        r = run_loop(bench_pipeline(md, stages, prompts, n, rounds))
        results[stages] = r
        print(
            f"  pipeline {stages} stage{'s' if stages > 1 else ' '} batch 1: ttft {r['ttft'] * 1e3:7.1f} ms  "
            f"tok/s {r['tps']:7.1f}   8 concurrent: aggregate tok/s {r['c_tps']:7.1f}, "
            f"mean ttft {r['c_ttft'] * 1e3:7.1f} ms  ({r['c_tps'] / r['tps']:.2f}x batch 1)"
        )
    one_stage = results[1]
    print(
        f"ratios: 1 stage batch 1 / transformers tok/s {one_stage['tps'] / hf['tps']:.2f}x (goal >= 1.0); "
        f"8 concurrent / batch 1: "
        + ", ".join(f"{s} stage(s) {results[s]['c_tps'] / results[s]['tps']:.2f}x" for s in (1, 2, 3))
        + " (goal >= 4)"
    )
    elem = torch.empty((), dtype=dtype).element_size()
    for label, tokens in (
        ("decode step (1 token)", 1),
        (f"prefill chunk ({args.prompt_len} tokens)", args.prompt_len),
    ):
        payload = os.urandom(tokens * cfg.hidden_size * elem)
        reps = 400 if tokens == 1 else 200

        async def both(
            payload: bytes = payload, tokens: int = tokens, reps: int = reps
        ) -> tuple[float, float]:
            await hop_raw(payload, 20)
            await hop_link(payload, cfg.hidden_size, tokens, 20)
            raw = await hop_raw(payload, reps)
            enc = await hop_link(payload, cfg.hidden_size, tokens, reps)
            return raw, enc

        raw, enc = run_loop(both())
        print(
            f"  hop, {label}, {len(payload)} B: stage link {enc / 2 * 1e6:7.1f} us one way, plain socket "
            f"{raw / 2 * 1e6:7.1f} us: {enc / raw:.2f}x (goal <= 1.3)"
        )


if __name__ == "__main__":
    raise SystemExit(main())
