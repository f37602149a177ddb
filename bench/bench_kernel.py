"""The engine's half-precision kernel (csrc/halfmm.h) against torch's, on the shapes of a decode step.

    python bench/bench_kernel.py                  # bf16, the serving bench's model shapes, 1 thread
    python bench/bench_kernel.py --threads 2 --dtype float16

For each weight shape (out x in) and each row count, the time of ``rows_linear`` (what a decode step
calls: the float32 copy of the rows, the product, the rounding back) with the native kernel and with
its plain twin, torch's ``F.linear``, rounds interleaved, best of --rounds. The weights cycle through
64 MiB of copies so that, as in a real model, each call reads its weight from memory rather than from
the last call's cache. Printed: microseconds per call, the native kernel's speedup over torch's, and
how much 8 rows cost against 1 (the price of batching 8 sequences in a decode step; 1.0x would make
batching free).

This is an inner-loop figure: ``bench_serving.py`` shows what it does for a request end to end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from butterfly.engine import model  # noqa: E402

# q/o, k/v, gate/up, down and the LM head of bench_serving.py's model (hidden 768, 4 KV heads).
SHAPES = [(768, 768), (256, 768), (2112, 768), (768, 2112), (16384, 768)]
ROWS = [1, 2, 4, 8, 16]
POOL_BYTES = 64 << 20


def time_calls(x: torch.Tensor, weights: list[torch.Tensor], calls: int) -> float:
    t0 = time.perf_counter()
    for i in range(calls):
        model.rows_linear(x, weights[i % len(weights)])
    return (time.perf_counter() - t0) / calls


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args()
    if model.NATIVE_KERNEL is None:
        print("the native kernel is not available here (not built, or no AVX2/FMA/F16C): nothing to compare")
        return 1
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    print(f"{args.dtype}, {args.threads} thread(s), best of {args.rounds} interleaved rounds; us per call")
    print(f"{'weight':>12} {'rows':>4} {'native':>9} {'torch':>9} {'speedup':>8} {'8 rows / 1, native':>19}")
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        copies = max(1, POOL_BYTES // (n * k * 2))
        weights = [(torch.randn(n, k, generator=gen) / 30).to(dtype) for _ in range(copies)]
        calls = max(8, (1 << 27) // (n * k))
        native_at: dict[int, float] = {}
        for m in ROWS:
            x = torch.randn(m, k, generator=gen).to(dtype)
            best = {"native": float("inf"), "torch": float("inf")}
            for _ in range(args.rounds):
                for name, kernel in (("native", model.NATIVE_KERNEL), ("torch", None)):
                    model.NATIVE = kernel
                    best[name] = min(best[name], time_calls(x, weights, calls))
            native_at[m] = best["native"]
            batching = f"{native_at[8] / native_at[1]:.2f}x" if m == 8 else ""
            print(
                f"{n:>6}x{k:<5} {m:>4} {best['native'] * 1e6:>9.1f} {best['torch'] * 1e6:>9.1f} "
                f"{best['torch'] / best['native']:>7.2f}x {batching:>19}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
