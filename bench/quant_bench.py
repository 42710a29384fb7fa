"""Quantized decode (qwix int8 / int4 weight-only, models/quantization.py) vs our fp32 and bf16 and vs
transformers fp32, on the 135 M benchmark model of bench/lm_bench.py (hidden 768, 12 layers, 12 heads,
MLP 2048, vocabulary 32768), random weights, greedy, prompt 64 tokens, one process.

Reported per variant and batch: new tokens/s (median of --reps after a compile call), the fraction of
the bandwidth roofline at batch 1 (bytes of weights read per token ÷ measured read bandwidth), the
logit error against fp32 (max |Δ| / max |logit| over the first 8 decode steps, teacher-forced on the
fp32 tokens) and greedy agreement over --agree-steps new tokens at batch 1 (identical tokens, and the
first step that differs). Random weights give flatter logits than a trained model, so agreement here
is a lower bound of what a real checkpoint shows.

Run: python bench/quant_bench.py [--reps 3] [--batches 1,16] [--no-torch] [--accuracy-only]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from lm_bench import measure_bandwidth  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--agree-steps", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=768)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--no-torch", action="store_true", help="skip the transformers fp32 baseline")
    ap.add_argument("--accuracy-only", action="store_true",
                    help="only the logit error and greedy agreement (load-independent: runs on a busy machine)")
    a = ap.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from spiritlm_jax.config import LlamaConfig
    from spiritlm_jax.infer.engine import SamplingConfig, generate
    from spiritlm_jax.models.llama import Llama
    from spiritlm_jax.models.quantization import quantize_params, weight_bytes

    print(f"load average {os.getloadavg()}, jax {jax.__version__}", flush=True)
    cfg = LlamaConfig(vocab_size=32768, hidden_size=a.hidden, intermediate_size=a.hidden * 8 // 3 // 256 * 256 or 256,
                      num_hidden_layers=a.layers, num_attention_heads=max(1, a.hidden // 64),
                      num_key_value_heads=max(1, a.hidden // 64), rope_theta=1e5, scan_layers=False,
                      max_position_embeddings=max(512, a.prompt + a.agree_steps + 16))
    params = nn.meta.unbox(Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 4), jnp.int32))["params"])
    bf16_cfg = cfg.replace(dtype="bfloat16", param_dtype="bfloat16")
    variants = {
        "fp32": (cfg, params),
        "bf16": (bf16_cfg, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)),
        "int8": (cfg.replace(quantize="int8"), None),
        "int4": (cfg.replace(quantize="int4"), None),
    }
    for name in ("int8", "int4"):
        qcfg = variants[name][0]
        variants[name] = (qcfg, quantize_params(qcfg, params))
    bw = measure_bandwidth()
    embed_bytes = cfg.vocab_size * cfg.hidden_size * 4
    print(f"read bandwidth {bw / 1e9:.1f} GB/s; params {cfg.num_params() / 1e6:.1f} M", flush=True)

    rng = np.random.default_rng(0)
    rows = []
    for B in ([] if a.accuracy_only else [int(b) for b in a.batches.split(",")]):
        prompts = [rng.integers(3, cfg.vocab_size, a.prompt).tolist() for _ in range(B)]
        s = SamplingConfig(max_new_tokens=a.new)
        for name, (vcfg, vparams) in variants.items():
            generate(vcfg, vparams, prompts, s, eos_id=-1)  # compile
            ts = []
            for _ in range(a.reps):
                t = time.perf_counter()
                generate(vcfg, vparams, prompts, s, eos_id=-1)
                ts.append(time.perf_counter() - t)
            tps = B * a.new / statistics.median(ts)
            read = weight_bytes(vparams) - (embed_bytes if name != "bf16" else embed_bytes // 2)
            roof = bw / read
            rows.append((name, B, tps, read / 1e6, tps / roof if B == 1 else float("nan")))
            print(f"{name:5s} batch {B:3d}: {tps:8.1f} new tok/s; weights read/token {read / 1e6:.0f} MB; "
                  f"batch-1 roofline {roof:.0f} tok/s", flush=True)
        if not a.no_torch:
            rows.append(("transformers fp32", B, _torch_tps(cfg, params, prompts, a), float("nan"), float("nan")))
            print(f"transformers fp32 batch {B}: {rows[-1][2]:.1f} new tok/s", flush=True)

    # error and agreement at batch 1
    prompt = [rng.integers(3, cfg.vocab_size, a.prompt).tolist()]
    s = SamplingConfig(max_new_tokens=a.agree_steps)
    ref_ids, ref_logits = generate(cfg, params, prompt, s, eos_id=-1, return_logits=True)
    for name in ("bf16", "int8", "int4"):
        vcfg, vparams = variants[name]
        ids, _ = generate(vcfg, vparams, prompt, s, eos_id=-1)
        same = np.asarray(ids[0]) == np.asarray(ref_ids[0])
        first = int(np.argmin(same)) if not same.all() else len(same)
        forced = _teacher_forced_logits(vcfg, vparams, prompt[0] + ref_ids[0][:8])
        ref_forced = _teacher_forced_logits(cfg, params, prompt[0] + ref_ids[0][:8])
        err = float(np.abs(forced - ref_forced).max() / np.abs(ref_forced).max())
        print(f"{name}: greedy agreement {same.mean():.3f} over {a.agree_steps} steps (first difference at step "
              f"{first}); teacher-forced logit error {err:.4f} of max |logit|", flush=True)
    print(f"load average {os.getloadavg()}")


def _teacher_forced_logits(cfg, params, ids):
    import jax.numpy as jnp

    from spiritlm_jax.models.quantization import llama_module

    logits, _ = llama_module(cfg).apply({"params": params}, jnp.asarray([ids], jnp.int32))
    return np.asarray(logits[0, -9:], np.float32)


def _torch_tps(cfg, params, prompts, a) -> float:
    import torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    torch.set_num_threads(os.cpu_count() or 2)
    hf = LlamaForCausalLM(HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
                                   intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_hidden_layers,
                                   num_attention_heads=cfg.num_attention_heads,
                                   num_key_value_heads=cfg.num_key_value_heads, rope_theta=cfg.rope_theta,
                                   max_position_embeddings=cfg.max_position_embeddings)).eval()
    x = torch.tensor(prompts)
    kw = dict(max_new_tokens=a.new, min_new_tokens=a.new, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        hf.generate(x, **kw)
        ts = []
        for _ in range(a.reps):
            t = time.perf_counter()
            hf.generate(x, **kw)
            ts.append(time.perf_counter() - t)
    return len(prompts) * a.new / statistics.median(ts)


if __name__ == "__main__":
    main()
