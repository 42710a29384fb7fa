"""Decode and prefill speed of our generation engine vs transformers' LlamaForCausalLM.generate, same weights.

Config (issue 6): ~135 M parameters — hidden 768, 12 layers, 12 heads, MLP 2048, vocabulary 32768,
θ 1e5 — fp32, greedy, prompt 64 tokens, 64 new tokens, batch 1 and 16, on this CPU, one process.
Compile time is reported separately (first call), then the median of --reps timed calls.

Roofline for batch-1 decode: every new token reads all weights except the embedding table once
(the embedding contributes one row): bytes/token = 4 · (params − vocab·hidden). At the machine's read
bandwidth (measured here with a numpy sum over a large array, ~26–29 GB/s with 2 threads) that bounds
tokens/s; we report the fraction reached.

Run: python bench/lm_bench.py [--reps 3] [--batches 1,16]
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np


def measure_bandwidth(gb: float = 1.0, reps: int = 5, threads: int | None = None) -> float:
    """Read bandwidth: every thread sums its own slice of a large array (numpy releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    threads = threads or os.cpu_count() or 2
    a = np.ones(int(gb * 1e9 / 4), np.float32)
    parts = np.array_split(a, threads)
    with ThreadPoolExecutor(threads) as ex:
        list(ex.map(np.sum, parts))
        ts = []
        for _ in range(reps):
            t = time.perf_counter()
            list(ex.map(np.sum, parts))
            ts.append(time.perf_counter() - t)
    return a.nbytes / min(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--scan", action="store_true", help="layers under nn.scan (training layout) instead of unrolled")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    from spiritlm_jax.converters.llama import convert_tensors
    from spiritlm_jax.config import LlamaConfig
    from spiritlm_jax.converters import torch_io
    from spiritlm_jax.infer.engine import SamplingConfig, generate

    jax.config.update("jax_default_matmul_precision", "float32")
    torch.set_num_threads(os.cpu_count() or 2)
    hf_cfg = HFConfig(vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=12, num_key_value_heads=12, rope_theta=1e5, max_position_embeddings=4096,
                      tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    hf = LlamaForCausalLM(hf_cfg).float().eval()
    n_params = sum(p.numel() for p in hf.parameters())
    # unrolled layers: the inference default (SpiritLM.from_pretrained); --scan measures the training layout
    cfg = LlamaConfig.from_hf(hf_cfg.to_dict(), scan_layers=a.scan)
    params = convert_tensors(((k, torch_io.to_numpy(v)) for k, v in hf.state_dict().items()), cfg,
                             scan_layers=a.scan)
    params = jax.tree.map(jnp.asarray, params)

    bw = measure_bandwidth()
    bytes_per_token = 4 * (n_params - cfg.vocab_size * cfg.hidden_size)
    roofline = bw / bytes_per_token
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}, "
          f"torch {torch.__version__}; read bandwidth {bw / 1e9:.1f} GB/s ({os.cpu_count()} threads); "
          f"layers {'scanned' if a.scan else 'unrolled'}")
    print(f"model: {n_params / 1e6:.1f} M params; batch-1 decode roofline {roofline:.1f} tokens/s "
          f"({bytes_per_token / 1e6:.0f} MB read per token)")

    rng = np.random.default_rng(0)
    rows = []
    for B in [int(x) for x in a.batches.split(",")]:
        prompts = rng.integers(3, 32000, size=(B, a.prompt))
        s = SamplingConfig(max_new_tokens=a.new)

        # --- ours (compile separately)
        t = time.perf_counter()
        generate(cfg, params, prompts.tolist(), s, eos_id=-1)
        compile_s = time.perf_counter() - t
        ours = []
        for _ in range(a.reps):
            t = time.perf_counter()
            generate(cfg, params, prompts.tolist(), s, eos_id=-1)
            ours.append(time.perf_counter() - t)
        # prefill alone: max_new_tokens=1 (prefill + one sampled token)
        s1 = SamplingConfig(max_new_tokens=1)
        generate(cfg, params, prompts.tolist(), s1, eos_id=-1)
        pre = []
        for _ in range(a.reps):
            t = time.perf_counter()
            generate(cfg, params, prompts.tolist(), s1, eos_id=-1)
            pre.append(time.perf_counter() - t)

        # --- transformers
        ids = torch.tensor(prompts)
        kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0,
                  attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            hf.generate(ids, **kw)
            theirs = []
            for _ in range(a.reps):
                t = time.perf_counter()
                hf.generate(ids, **kw)
                theirs.append(time.perf_counter() - t)
            their_pre = []
            for _ in range(a.reps):
                t = time.perf_counter()
                hf(ids)
                their_pre.append(time.perf_counter() - t)

        o, h = statistics.median(ours), statistics.median(theirs)
        op, hp = statistics.median(pre), statistics.median(their_pre)
        ours_tps = B * a.new / o
        hf_tps = B * a.new / h
        rows.append((B, ours_tps, hf_tps, B * a.prompt / op, B * a.prompt / hp, compile_s))
        line = (f"batch {B:2d}: ours {ours_tps:7.1f} new tok/s, transformers {hf_tps:7.1f} -> {ours_tps / hf_tps:.2f}x; "
                f"prefill ours {B * a.prompt / op:8.0f} tok/s vs {B * a.prompt / hp:8.0f} -> {hp / op:.2f}x; "
                f"compile {compile_s:.1f} s")
        if B == 1:
            line += f"; decode at {ours_tps / roofline:.0%} of the bandwidth roofline (transformers {hf_tps / roofline:.0%})"
        print(line, flush=True)


if __name__ == "__main__":
    main()
