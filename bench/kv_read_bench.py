"""How fast one decode step's attention reads a slot cache: in place, or gathered first (the serving choice).

One layer of the 135 M benchmark model's cache, heads-major as ``models.llama.init_cache`` lays it out:
(slots 16, KV heads 12, positions 1,152, head dim 64), fp32, K and V. A decode query per row attends over
the first W positions of R rows (R = 16 by default):

  gather_dot   each row's window copied out (one dynamic slice per row, as serve/engine.py ``_gather_rows``),
               then the score and value einsums (the engine's gathered decode call)
  fused_minor  no dot: the multiply-reduce over head_dim reading the rows through ``jnp.take``
  fused_T      the same with K stored (slots, KV, D, S), so both reductions run over a major axis
  full_dot     the einsums on the whole cache (all slots, in order; W < 1,152 slices it): the engine's
               in-place decode step (``_decode_all``). Its rows are in slot order, the others reversed, so
               its "err" column is not 0 by construction; the other three agree to 1e-6.

Prints milliseconds and the GB/s of K and V read (2 · R · KV · W · D · 4 bytes). Session 7 (bench/RESULTS.md),
this host with and without ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``: W = 1,152 gathered 85 / 25 ms
(1.3 / 4.6 GB/s), in place 4.8 / 5.2 ms (~22 GB/s).

Run: python bench/kv_read_bench.py [--rows 16] [--reps 20]
"""
from __future__ import annotations

import argparse
import functools
import statistics
import time

SLOTS, KV, LENGTH, HEAD_DIM = 16, 12, 1152, 64


def build(rows: int):
    import jax
    import jax.numpy as jnp
    from jax import lax

    def masked_softmax(scores, positions, window):
        allowed = jnp.arange(window)[None, None] <= positions[:, None, None]
        return jax.nn.softmax(jnp.where(allowed, scores, -1e30), -1)

    @functools.partial(jax.jit, static_argnums=(5,))
    def gather_dot(k_cache, v_cache, q, idx, positions, window):
        def rows_of(c):  # (R, KV, W, D)
            return jnp.concatenate([lax.dynamic_slice(c, (idx[r], 0, 0, 0), (1, KV, window, HEAD_DIM))
                                    for r in range(rows)], 0)
        k, v = rows_of(k_cache), rows_of(v_cache)
        scores = jnp.einsum("bkd,bksd->bks", q, k) * HEAD_DIM ** -0.5  # (R, KV, W)
        return jnp.einsum("bks,bksd->bkd", masked_softmax(scores, positions, window), v)  # (R, KV, D)

    @functools.partial(jax.jit, static_argnums=(5,))
    def fused_minor(k_cache, v_cache, q, idx, positions, window):
        k = jnp.take(k_cache, idx, axis=0)[:, :, :window]
        v = jnp.take(v_cache, idx, axis=0)[:, :, :window]
        scores = jnp.sum(q[:, :, None, :] * k, -1) * HEAD_DIM ** -0.5
        return jnp.sum(masked_softmax(scores, positions, window)[..., None] * v, 2)

    @functools.partial(jax.jit, static_argnums=(5,))
    def fused_T(kt_cache, v_cache, q, idx, positions, window):
        k = jnp.take(kt_cache, idx, axis=0)[:, :, :, :window]  # (R, KV, D, W)
        v = jnp.take(v_cache, idx, axis=0)[:, :, :window]
        scores = jnp.sum(q[:, :, :, None] * k, 2) * HEAD_DIM ** -0.5
        return jnp.sum(masked_softmax(scores, positions, window)[..., None] * v, 2)

    @functools.partial(jax.jit, static_argnums=(5,))
    def full_dot(k_cache, v_cache, q, idx, positions, window):
        k, v = k_cache[:, :, :window], v_cache[:, :, :window]
        scores = jnp.einsum("bkd,bksd->bks", q, k) * HEAD_DIM ** -0.5
        return jnp.einsum("bks,bksd->bkd", masked_softmax(scores, positions, window), v)

    return {"gather_dot": gather_dot, "fused_minor": fused_minor, "fused_T": fused_T, "full_dot": full_dot}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=16, help="rows of the decode step (≤ 16 slots)")
    ap.add_argument("--reps", type=int, default=20)
    a = ap.parse_args(argv)
    import jax
    import jax.numpy as jnp

    rows = min(a.rows, SLOTS)
    k_cache = jax.random.normal(jax.random.key(0), (SLOTS, KV, LENGTH, HEAD_DIM))
    v_cache = jax.random.normal(jax.random.key(1), (SLOTS, KV, LENGTH, HEAD_DIM))
    kt_cache = jnp.swapaxes(k_cache, 2, 3)
    q = jax.random.normal(jax.random.key(2), (rows, KV, HEAD_DIM))
    idx = jnp.arange(rows, dtype=jnp.int32)[::-1]
    positions = jnp.full((rows,), 100, jnp.int32)
    fns = build(rows)

    def timed(fn, *args):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - t)
        return statistics.median(times) * 1e3

    for window in (128, LENGTH):
        megabytes = 2 * rows * KV * window * HEAD_DIM * 4 / 1e6
        reference = None
        for name, fn in fns.items():
            if name == "full_dot" and rows != SLOTS:
                continue
            k = kt_cache if name == "fused_T" else k_cache
            out = fn(k, v_cache, q, idx, positions, window)
            reference = out if reference is None else reference
            ms = timed(fn, k, v_cache, q, idx, positions, window)
            print(f"rows {rows} window {window:5d} {name:12s} {ms:8.3f} ms {megabytes / ms:6.2f} GB/s "
                  f"err {float(jnp.max(jnp.abs(out - reference))):.1e}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
