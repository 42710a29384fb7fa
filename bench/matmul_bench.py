"""Small-M matmul rates of XLA:CPU vs torch (oneDNN/MKL) at the 135 M decode shapes: where the batch-16
decode step of bench/lm_bench.py loses against the fp32 peak, and what a quantized weight costs.

Decode at batch B runs (B, E) x (E, N) dots per layer: q/k/v/o 768→768, gate/up 768→2048, down 2048→768,
and the 768→32768 LM head. This times each shape at M = 1, 16, 64 rows, fp32, XLA (jit'd einsum) and
torch (``x @ w`` under no_grad), alternating call by call in one process so machine load hits both
alike, and prints GFLOP/s and the weight-read rate (GB/s). Rows ``int8 deq`` time the dot on an int8
weight converted in the jit (what the qwix weight-only path compiles to on XLA:CPU: the convert is a
separate loop fusion that writes the fp32 weight before the dot reads it). Rows ``(N,K)`` time the same
dot with the weight stored output-major, ``einsum("me,ne->mn")`` / ``F.linear`` (torch's nn.Linear layout):
at small M XLA:CPU serves it several times faster than (K, N), which is why the Llama stores its MLP and
LM-head weights that way (models/llama.py).

Run: python bench/matmul_bench.py [--reps 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def _time(fn, reps: int, inner: int) -> float:
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        ts.append((time.perf_counter() - t) / inner)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rows", default="1,16,64")
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch

    torch.set_num_threads(os.cpu_count() or 2)
    print(f"load average {os.getloadavg()}, jax {jax.__version__}, torch {torch.__version__}")
    rng = np.random.default_rng(0)
    dot = jax.jit(lambda x, w: jnp.einsum("me,en->mn", x, w))  # (M, E) x (E, N) -> (M, N)
    dot_nk = jax.jit(lambda x, w: jnp.einsum("me,ne->mn", x, w))  # (M, E) x (N, E) -> (M, N)
    deq = jax.jit(lambda x, w, s: jnp.einsum("me,en->mn", x, w.astype(jnp.float32)) * s)
    for E, N in ((768, 768), (768, 2048), (2048, 768), (768, 32768)):
        w = rng.standard_normal((E, N), dtype=np.float32)
        wj, wt = jnp.asarray(w), torch.from_numpy(w)
        wj_nk, wt_nk = jnp.asarray(np.ascontiguousarray(w.T)), torch.from_numpy(np.ascontiguousarray(w.T))
        wq, sc = jnp.asarray(rng.integers(-127, 128, (E, N)).astype(np.int8)), jnp.ones((N,), jnp.float32)
        inner = max(2, int(3e8 / (E * N * 4)))
        for M in [int(m) for m in a.rows.split(",")]:
            x = rng.standard_normal((M, E), dtype=np.float32)
            xj, xt = jnp.asarray(x), torch.from_numpy(x)
            fns = {"xla fp32": lambda: dot(xj, wj).block_until_ready(),
                   "torch fp32": lambda: torch.matmul(xt, wt),
                   "xla fp32 (N,K)": lambda: dot_nk(xj, wj_nk).block_until_ready(),
                   "torch fp32 (N,K)": lambda: torch.nn.functional.linear(xt, wt_nk),
                   "xla int8 deq": lambda: deq(xj, wq, sc).block_until_ready()}
            for f in fns.values():
                f()
            times = {k: [] for k in fns}
            with torch.no_grad():
                for _ in range(a.reps):
                    for k, f in fns.items():
                        times[k].append(_time(f, 1, inner))
            flops = 2 * M * E * N
            cells = []
            for k, v in times.items():
                t = statistics.median(v)
                wbytes = E * N * (1 if "int8" in k else 4)
                cells.append(f"{k} {t * 1e3:7.3f} ms {flops / t / 1e9:6.1f} GFLOP/s {wbytes / t / 1e9:5.1f} GB/s")
            print(f"{E:5d}x{N:<6d} M={M:3d}  " + " | ".join(cells), flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
