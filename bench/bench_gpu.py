"""The GPU path, measured on a machine with an NVIDIA GPU (scripts/gpu-check.sh runs it there).

Three rows, each beside a baseline measured in the same run, rounds interleaved:

1. Host -> device: our upload (``GpuUploader``: the arena page-locked in place, chunks round-robin on
   several streams, then the device checksum of every tensor compared with the host's) against one
   plain ``cudaMemcpy`` of the same bytes from pinned memory. Goal: >= 0.9x. The copy alone (no
   checksum) is shown beside it, labelled as such.
2. Time to READY: a real ``butterfly-node`` from process start to the READY=1 datagram on a generated
   Llama-shaped checkpoint (default 4 GiB, bf16), on the GPU path (upload, checksum, compile, warmup
   on the device), as bench/e2e.py measures it on the CPU.
3. Tokens/s at batch 1: our engine over the device copies (``device_weights``: DLPack views, no copy)
   against transformers' ``generate()`` on the same weights on the same GPU, greedy, same lengths;
   and the logits of both compared (bf16 tolerance).

Run: ``python bench/bench_gpu.py [--quick] [--json out.json]``. Asserts nothing; exits 2 without a GPU.
"""

from __future__ import annotations

import argparse
import json
import mmap
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from butterfly.loader import gpu  # noqa: E402

GiB = 1 << 30


def h2d(total_bytes: int, rounds: int) -> dict[str, float]:
    import cupy as cp
    import numpy as np

    tensor = 64 << 20
    placements = []
    off = 0
    while off < total_bytes:
        n = min(tensor, total_bytes - off)
        placements.append(gpu_placement(f"t{len(placements)}", off, n))
        off += n
    arena = mmap.mmap(-1, total_bytes)
    host = np.frombuffer(arena, dtype=np.uint8)
    host[:] = np.random.default_rng(1).integers(0, 255, size=total_bytes, dtype=np.uint8)
    pinned_mem = cp.cuda.alloc_pinned_memory(total_bytes)
    pinned = np.frombuffer(pinned_mem, dtype=np.uint8, count=total_bytes)
    pinned[:] = host
    dst = cp.empty(total_bytes, dtype=cp.uint8)
    gpu.compile_kernels(0)

    def plain() -> float:
        cp.cuda.Device(0).synchronize()
        t = time.perf_counter()
        cp.cuda.runtime.memcpy(
            dst.data.ptr, pinned.ctypes.data, total_bytes, cp.cuda.runtime.memcpyHostToDevice
        )
        cp.cuda.Device(0).synchronize()
        return time.perf_counter() - t

    def ours(verify: bool) -> float:
        t = time.perf_counter()
        with gpu.GpuUploader(arena, placements) as up:
            for p in placements:
                for o, n in gpu.pieces(p.arena_offset, p.length, 16 << 20):
                    up.submit(o, n)
            if verify:
                up.finish(placements)
            else:
                for s in up.streams:
                    s.synchronize()
        return time.perf_counter() - t

    rows: dict[str, list[float]] = {"plain": [], "ours": [], "copy_only": []}
    for _ in range(rounds):
        rows["plain"].append(plain())
        rows["ours"].append(ours(True))
        rows["copy_only"].append(ours(False))
    med = {k: statistics.median(v) for k, v in rows.items()}
    arena.close()
    gb = total_bytes / 1e9
    return {
        "bytes": total_bytes,
        "plain_gbps": gb / med["plain"],
        "ours_gbps": gb / med["ours"],
        "copy_only_gbps": gb / med["copy_only"],
        "ratio": med["plain"] / med["ours"],
        "copy_only_ratio": med["plain"] / med["copy_only"],
    }


@dataclass(frozen=True)
class _Placement:
    name: str
    arena_offset: int
    length: int


def gpu_placement(name: str, offset: int, length: int) -> _Placement:
    return _Placement(name, offset, length)


def ready(model_gb: float, work: Path) -> dict[str, Any]:
    from e2e import ensure_manifest, run_node

    from butterfly.weights.testmodel import make_test_model

    hidden = 4096
    layers = max(1, round(model_gb * GiB / (2 * 12.5 * hidden * hidden)))
    model = work / f"ready-{layers}x{hidden}"
    if not model.exists():
        make_test_model(model, layers=layers, hidden=hidden, heads=32, kv_heads=8, vocab=32000,
                        dtype="bfloat16", shards=4)  # fmt: skip
    ensure_manifest(model)
    run = run_node(model)
    return {"layers": layers, "ready_s": run.ready_s, "operational_s": run.operational_s, "steps": run.steps}


def tokens(work: Path, quick: bool, rounds: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    from butterfly.engine.generate import Pipeline, generate
    from butterfly.engine.model import StageModel
    from butterfly.engine.weights import open_model_dir
    from butterfly.weights.testmodel import make_test_model

    dims = {"layers": 4, "hidden": 512, "heads": 8, "kv_heads": 4, "vocab": 8192} if quick else \
        {"layers": 16, "hidden": 2048, "heads": 16, "kv_heads": 4, "vocab": 32000}  # fmt: skip
    model = work / ("tok-" + "-".join(f"{k}{v}" for k, v in dims.items()))
    if not model.exists():
        make_test_model(model, dtype="bfloat16", shards=1, manifest=False, **dims)  # type: ignore[arg-type]
    md = open_model_dir(model)
    cfg = md.config
    weights = {k: v.to("cuda:0") for k, v in md.weights.items()}
    pipe = Pipeline([StageModel(cfg, weights, 0, cfg.num_layers, cfg.num_layers, "cuda:0")], 1 << 30)
    hf = AutoModelForCausalLM.from_pretrained(model, torch_dtype=torch.bfloat16).to("cuda:0").eval()
    prompt = [(i * 7919 + 1) % cfg.vocab_size for i in range(64)]
    new = 64

    def ours() -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = generate(pipe, prompt, new, stop_ids=())
        torch.cuda.synchronize()
        assert len(out) == new
        return new / (time.perf_counter() - t)

    def theirs() -> float:
        ids = torch.tensor([prompt], device="cuda:0")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False)
        torch.cuda.synchronize()
        assert out.shape[1] == len(prompt) + new
        return new / (time.perf_counter() - t)

    ours(), theirs()  # warm both
    a, b = [], []
    for _ in range(rounds):
        a.append(ours())
        b.append(theirs())
    with torch.inference_mode():
        ref = hf(torch.tensor([prompt], device="cuda:0")).logits[0, -1].float()
    pipe2 = Pipeline([StageModel(cfg, weights, 0, cfg.num_layers, cfg.num_layers, "cuda:0")], 1 << 28)
    from butterfly.engine.model import SeqChunk

    pipe2.reserve(0, len(prompt))
    mine = pipe2.step(torch.tensor(prompt), [SeqChunk(0, 0, len(prompt))])[0]
    md.close()
    return {
        "ours_tok_s": statistics.median(a),
        "transformers_tok_s": statistics.median(b),
        "ratio": statistics.median(a) / statistics.median(b),
        "logits_max_abs_diff": float((mine - ref).abs().max()),
        "logits_scale": float(ref.abs().max()),
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--json", help="write the results here too")
    p.add_argument("--model-gb", type=float, default=4.0)
    p.add_argument("--skip", default="", help="comma-separated rows to skip: h2d,ready,tokens")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "butterfly-bench-gpu"))
    args = p.parse_args()
    if not gpu.gpu_available():
        print("no cupy or no CUDA device: nothing to measure", file=sys.stderr)
        return 2
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    results: dict[str, Any] = {}
    rounds = 3 if args.quick else 5
    if "h2d" not in skip:
        r = results["h2d"] = h2d((1 if args.quick else 4) * GiB, rounds)
        print(f"H2D: ours {r['ours_gbps']:.1f} GB/s (upload + device checksum) vs plain pinned cudaMemcpy "
              f"{r['plain_gbps']:.1f} GB/s: {r['ratio']:.2f}x (goal >= 0.9x); copy only (inner loop) "
              f"{r['copy_only_gbps']:.1f} GB/s: {r['copy_only_ratio']:.2f}x", flush=True)  # fmt: skip
    if "tokens" not in skip:
        r = results["tokens"] = tokens(work, args.quick, rounds)
        print(
            f"tokens/s batch 1 (bf16): ours {r['ours_tok_s']:.1f} vs transformers "
            f"{r['transformers_tok_s']:.1f}: {r['ratio']:.2f}x; last-token logits max |diff| "
            f"{r['logits_max_abs_diff']:.4f} (scale {r['logits_scale']:.2f})",
            flush=True,
        )
    if "ready" not in skip:
        r = results["ready"] = ready(0.25 if args.quick else args.model_gb, work)
        print(f"start -> READY on the GPU, {r['layers']} layers: {r['ready_s']:.2f} s "
              f"(OPERATIONAL {r['operational_s']}); steps {r['steps']}", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
