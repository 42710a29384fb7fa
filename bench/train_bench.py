"""Train-step throughput on this CPU: our jitted JAX step vs a plain PyTorch loop over transformers'
LlamaForCausalLM, same ~100 M-parameter config, same batches, same optimizer (AdamW + global-norm clip),
fp32 on both sides (bf16 matmuls are emulated on this CPU). One process, one run, alternating rounds.

    python bench/train_bench.py [--steps 6] [--batch 4] [--seq 256] [--write bench/RESULTS.md]
"""
from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

MACHINE_GFLOPS = 180.0  # fp32 matmul limit of this machine (common brief)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--write", default=None)
    a = ap.parse_args()

    import jax
    import torch

    from spiritlm_jax import sharding as shd
    from spiritlm_jax.models.llama import Llama
    from spiritlm_jax.train.config import ModelConfig, OptimConfig
    from spiritlm_jax.train.trainer import (SyntheticIterator, flops_per_token, global_batch, init_state,
                                            jit_train_step, llama_config, make_optimizer, make_train_step,
                                            modality_table, state_layout)

    torch.set_num_threads(os.cpu_count() or 1)
    mc = ModelConfig(llama=ModelConfig().llama.replace(
        vocab_size=32768, hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=12,
        num_key_value_heads=12, dtype="float32", param_dtype="float32", remat="none"))
    oc = OptimConfig(lr=3e-4, warmup_steps=0, schedule="constant", weight_decay=0.1, clip_norm=1.0)
    cfg = llama_config(mc)
    it = SyntheticIterator(a.batch, a.seq, cfg.vocab_size, seed=0)
    batches = [next(it) for _ in range(a.steps)]
    fpt = flops_per_token(cfg, a.seq)
    tokens = a.batch * a.seq

    # ---------------------------------------------------------------- ours
    model = Llama(cfg)
    tx, sched = make_optimizer(oc, 1000)
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    layout = state_layout(model, tx, mesh)
    state = init_state(model, tx, layout, seed=0)
    step = make_train_step(model, tx, sched, modality_table(cfg.vocab_size, "auto"))
    t0 = time.perf_counter()
    with shd.mesh_context(mesh):
        from spiritlm_jax.train.trainer import abstract_batch

        fn = jit_train_step(step, layout).lower(layout.abstract, abstract_batch(layout, a.batch, a.seq)).compile()
    compile_s = time.perf_counter() - t0
    dev_batches = [global_batch(b, layout, a.batch) for b in batches]

    # ---------------------------------------------------------------- torch
    from transformers import LlamaConfig as HFConfig, LlamaForCausalLM

    hf = HFConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
                  num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                  num_key_value_heads=cfg.num_key_value_heads, max_position_embeddings=4096, rms_norm_eps=1e-5,
                  tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    tm = LlamaForCausalLM(hf).float().train()
    decay = [p for n, p in tm.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in tm.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=3e-4, betas=(0.9, 0.95), eps=1e-8)
    tb = [{k: torch.from_numpy(np.asarray(v)) for k, v in b.items()} for b in batches]

    def torch_step(b):
        # Same masking as ours: packed documents (block-diagonal causal mask) and loss_mask.
        seg = b["segment_ids"]
        T = seg.shape[1]
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        allow = causal[None] & (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0)
        mask = torch.zeros(allow.shape, dtype=torch.float32).masked_fill(~allow, torch.finfo(torch.float32).min)[:, None]
        logits = tm(input_ids=b["tokens"].long(), position_ids=b["positions"].long(), attention_mask=mask).logits
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                                b["targets"].long().reshape(-1), reduction="none")
        m = b["loss_mask"].reshape(-1)
        loss = (nll * m).sum() / m.sum().clamp(min=1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()
        return loss

    torch_step(tb[0])  # warm-up (allocations)

    ours_t, torch_t = [], []
    for _ in range(a.rounds):
        t = time.perf_counter()
        for b in dev_batches:
            state, m = fn(state, b)
        jax.block_until_ready(m)
        ours_t.append((time.perf_counter() - t) / len(dev_batches))
        t = time.perf_counter()
        for b in tb:
            loss = torch_step(b)
        float(loss)
        torch_t.append((time.perf_counter() - t) / len(tb))
    ours, ref = min(ours_t), min(torch_t)
    n_params = cfg.num_params()
    res = {
        "params_M": n_params / 1e6, "tokens_per_step": tokens,
        "ours_step_s": ours, "torch_step_s": ref, "ours_tok_s": tokens / ours, "torch_tok_s": tokens / ref,
        "speedup": ref / ours, "ours_gflops": tokens * fpt / ours / 1e9, "torch_gflops": tokens * fpt / ref / 1e9,
        "compile_s": compile_s, "ours_all": ours_t, "torch_all": torch_t,
    }
    for k, v in res.items():
        print(f"{k}: {v}")
    if a.write:
        load = os.getloadavg()
        text = (
            f"\n## Training\n\n"
            f"`python bench/train_bench.py` — {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"jax {jax.__version__}, torch {torch.__version__}; load average during the run {load[0]:.1f} "
            f"(machine shared with other engineers' jobs: absolute numbers are pessimistic, the ratio is the result).\n\n"
            f"Config: Llama {n_params / 1e6:.0f} M params (hidden 768, 8 layers, 12 heads, MLP 2048, vocab 32768), "
            f"batch {a.batch} × {a.seq} packed tokens, fp32, AdamW + clip 1.0, no remat; best of {a.rounds} rounds of "
            f"{a.steps} steps each, alternating.\n\n"
            f"| | step (s) | tokens/s | model GFLOP/s | of ~{MACHINE_GFLOPS:.0f} GFLOP/s fp32 |\n|---|---|---|---|---|\n"
            f"| ours (JAX, jit) | {ours:.3f} | {tokens / ours:.0f} | {res['ours_gflops']:.1f} | "
            f"{res['ours_gflops'] / MACHINE_GFLOPS:.0%} |\n"
            f"| transformers LlamaForCausalLM + torch.optim.AdamW | {ref:.3f} | {tokens / ref:.0f} | "
            f"{res['torch_gflops']:.1f} | {res['torch_gflops'] / MACHINE_GFLOPS:.0%} |\n\n"
            f"Ratio ours/torch throughput: **{ref / ours:.2f}×**. Compile time of our step (once): {compile_s:.1f} s. "
            f"Model FLOPs = 6·N(matmul params) + 12·L·H·D·T per token.\n")
        with open(a.write, "a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
