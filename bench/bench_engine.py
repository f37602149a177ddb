"""Engine vs transformers: single-stage generation at batch 1 on the same weights and thread count.

    python bench/bench_engine.py                     # Llama-shaped bf16 model (~0.4 GB), 3 rounds
    python bench/bench_engine.py --quick             # a smaller model, 2 rounds
    python bench/bench_engine.py --model DIR         # your own Llama/Mistral/Qwen2 checkpoint

Both sides generate greedily from the same prompt with the same number of new tokens, in one process
with ``torch.set_num_threads(--threads)``, rounds interleaved. Reported per side (medians):

- ttft:  time to first token (prefill of the prompt and the first sampled token);
- tok/s: new tokens / the whole generation's wall time (what a batch-1 user sees);
- decode tok/s: tokens after the first / the time after the first.

The engine's figures count everything it pays per request (KV reservation, position tensors, the
sampler); loading is timed separately (the engine maps the files, transformers copies them) and not
in the ratio. Greedy tokens of both sides are compared: how many leading tokens agree is printed (in
bf16 two correct implementations may split a near-tie differently; the tests check exact agreement
in fp32). Goal: tok/s ratio >= 1.0.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from butterfly.engine.generate import Pipeline, generate  # noqa: E402
from butterfly.engine.model import StageModel  # noqa: E402
from butterfly.engine.weights import ModelDir, open_model_dir  # noqa: E402
from butterfly.weights.testmodel import make_test_model  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def ensure_model(args: argparse.Namespace) -> Path:
    if args.model:
        return Path(args.model)
    dims = (
        {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 4, "vocab": 8192}
        if args.quick
        else {"layers": 12, "hidden": 1024, "heads": 16, "kv_heads": 4, "vocab": 16384}
    )
    name = f"engine-{args.dtype}-" + "-".join(f"{k}{v}" for k, v in dims.items())
    path = Path(args.workdir) / name
    if not path.exists():
        print(f"generating {path} ...", flush=True)
        make_test_model(path, dtype=args.dtype, shards=1, manifest=False, **dims)  # type: ignore[arg-type]
    return path


def timed(fn: Any) -> tuple[float, Any]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a checkpoint directory (default: generate a Llama-shaped one)")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="of the generated model")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=0, help="default: 3 (2 with --quick)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "butterfly-bench"))
    args = p.parse_args()
    rounds = args.rounds or (2 if args.quick else 3)
    torch.set_num_threads(args.threads)
    path = ensure_model(args)

    load_ours, md = timed(lambda: open_model_dir(path))
    try:
        run(md, path, args, rounds, load_ours)
    finally:
        md.close()
    return 0


def run(md: ModelDir, path: Path, args: argparse.Namespace, rounds: int, load_ours: float) -> None:
    import transformers

    auto = transformers.AutoModelForCausalLM  # resolved (imported) before the load is timed

    stage = StageModel(md.config, md.weights, 0, md.layout.num_blocks, md.layout.num_blocks)
    pipe = Pipeline([stage], 1 << 30)
    load_hf, hf = timed(lambda: auto.from_pretrained(path, dtype=stage.dtype).eval())
    print(
        f"model {path.name}: {stage.dtype}, {md.layout.num_blocks} blocks, hidden {md.config.hidden_size}, "
        f"vocab {md.config.vocab_size}; threads {torch.get_num_threads()}; prompt {args.prompt_len}, "
        f"{args.new_tokens} new tokens, batch 1"
    )
    print(f"load: engine {load_ours:.3f} s (maps the files), transformers {load_hf:.3f} s")
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, md.config.vocab_size, (args.prompt_len,), generator=gen)
    n = args.new_tokens

    def ours_ttft() -> float:
        return timed(lambda: generate(pipe, prompt.tolist(), 1))[0]

    def ours_full() -> tuple[float, list[int]]:
        t, toks = timed(lambda: generate(pipe, prompt.tolist(), n))
        return t, toks

    def hf_gen(k: int) -> tuple[float, list[int]]:
        with torch.inference_mode():
            t, out = timed(
                lambda: hf.generate(
                    prompt[None], max_new_tokens=k, min_new_tokens=k, do_sample=False, pad_token_id=0
                )
            )
        return t, out[0, args.prompt_len :].tolist()

    # Warm both once (allocator, kernels), then interleave.
    ours_full()
    hf_gen(n)
    res: dict[str, list[float]] = {k: [] for k in ("o_ttft", "o_full", "h_ttft", "h_full")}
    agree = n
    for _ in range(rounds):
        res["o_ttft"].append(ours_ttft())
        res["h_ttft"].append(hf_gen(1)[0])
        t_o, toks_o = ours_full()
        t_h, toks_h = hf_gen(n)
        res["o_full"].append(t_o)
        res["h_full"].append(t_h)
        # Leading tokens both chose; in half precision a near-tie may go either way after a while.
        agree = min(
            agree, next((i for i, (a, b) in enumerate(zip(toks_o, toks_h, strict=True)) if a != b), n)
        )
    med = {k: statistics.median(v) for k, v in res.items()}

    def row(name: str, ttft: float, full: float) -> tuple[float, float]:
        tps = n / full
        dec = (n - 1) / max(full - ttft, 1e-9)
        print(f"  {name:<13} ttft {ttft * 1e3:8.1f} ms   tok/s {tps:8.1f}   decode tok/s {dec:8.1f}")
        return tps, dec

    print(f"medians of {rounds} interleaved rounds:")
    o_tps, o_dec = row("engine", med["o_ttft"], med["o_full"])
    h_tps, h_dec = row("transformers", med["h_ttft"], med["h_full"])
    print(
        f"ratio engine/transformers: tok/s {o_tps / h_tps:.2f}x, decode {o_dec / h_dec:.2f}x, "
        f"ttft {med['h_ttft'] / med['o_ttft']:.2f}x faster (goal: tok/s >= 1.0x)"
    )
    print(f"greedy tokens: the first {agree} of {n} identical in every round")


if __name__ == "__main__":
    raise SystemExit(main())
