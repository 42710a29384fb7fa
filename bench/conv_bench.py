"""Conv1d formulations on XLA:CPU at the HifiGAN / HuBERT shapes, alternating call by call in one process
(so machine load hits every formulation alike): which one models/layers.conv1d should use.

  conv    lax.conv_general_dilated, channels-last (NWC / WIO) — what layers.conv1d uses today
  ncw     lax.conv_general_dilated, channels-first (NCW / OIW), transposes included
  im2col  the k dilated shifted slices concatenated on channels → ONE (B·T, k·C_in) x (k·C_in, C_out) dot
  taps    k dots (one per tap) summed: Σ_j x[t + j·d] · W_j

Run: python bench/conv_bench.py [--reps 5]
"""
from __future__ import annotations

import argparse
import os
import statistics
import time


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    import jax
    import jax.numpy as jnp

    def conv(x, w, d):
        k = w.shape[0]
        pad = d * (k - 1) // 2
        return jax.lax.conv_general_dilated(x, w, (1,), [(pad, pad)], rhs_dilation=(d,),
                                            dimension_numbers=("NWC", "WIO", "NWC"))

    def ncw(x, w, d):
        k = w.shape[0]
        pad = d * (k - 1) // 2
        y = jax.lax.conv_general_dilated(x.transpose(0, 2, 1), w.transpose(2, 1, 0), (1,), [(pad, pad)],
                                         rhs_dilation=(d,), dimension_numbers=("NCW", "OIW", "NCW"))
        return y.transpose(0, 2, 1)

    def im2col(x, w, d):
        k, cin, cout = w.shape
        pad = d * (k - 1) // 2
        xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
        T = x.shape[1]
        cols = jnp.concatenate([xp[:, j * d:j * d + T] for j in range(k)], axis=-1)  # (B, T, k·C_in)
        return jnp.einsum("btc,cd->btd", cols, w.reshape(k * cin, cout))

    def taps(x, w, d):
        k = w.shape[0]
        pad = d * (k - 1) // 2
        xp = jnp.pad(x, ((0, 0), (pad, pad), (0, 0)))
        T = x.shape[1]
        return sum(jnp.einsum("btc,cd->btd", xp[:, j * d:j * d + T], w[j]) for j in range(k))

    forms = {"conv": conv, "ncw": ncw, "im2col": im2col, "taps": taps}
    # (name, batch, T, C, k, dilation): HifiGAN resblock convs of stages 1, 3, 5 for 10 s (250 frames)
    shapes = [("hifigan s1 256ch k3 d1", 1, 1250, 256, 3, 1), ("hifigan s1 256ch k11 d5", 1, 1250, 256, 11, 5),
              ("hifigan s3 64ch k7 d3", 1, 20000, 64, 7, 3), ("hifigan s5 16ch k11 d5", 1, 160000, 16, 11, 5),
              ("hubert pos-like 768ch k3", 1, 250, 768, 3, 1)]
    print(f"load average {os.getloadavg()}, jax {jax.__version__}")
    for name, B, T, C, k, d in shapes:
        x = jax.random.normal(jax.random.PRNGKey(0), (B, T, C))
        w = jax.random.normal(jax.random.PRNGKey(1), (k, C, C)) * 0.05
        fns = {n: jax.jit(lambda x, w, f=f: f(x, w, d)) for n, f in forms.items()}
        ref = fns["conv"](x, w)
        times = {n: [] for n in fns}
        for n, f in fns.items():
            err = float(jnp.abs(f(x, w) - ref).max())
            assert err < 1e-3, (name, n, err)
        for _ in range(a.reps):
            for n, f in fns.items():
                t = time.perf_counter()
                f(x, w).block_until_ready()
                times[n].append(time.perf_counter() - t)
        flops = 2 * B * T * C * C * k
        med = {n: statistics.median(v) for n, v in times.items()}
        print(f"{name:28s} " + "  ".join(f"{n} {med[n] * 1e3:7.2f} ms ({flops / med[n] / 1e9:5.0f} GFLOP/s)"
                                           for n in fns) + f"   best: {min(med, key=med.get)}", flush=True)
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
