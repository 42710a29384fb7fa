"""Peak RSS of `spiritlm-jax convert llama` (import) and of `spiritlm-jax export --to hf` (export) on a
~1 GB random bf16 HF checkpoint.

Target (issues 2 and 12): peak RSS ≤ 1.3 × the checkpoint's size in both directions. Each direction
runs in a fresh subprocess (so the measured peak is its own: interpreter + jax + torch + the streamed
tensors), and the script prints the ratios. The export reads our converted folder one layer slice at a
time and writes safetensors tensor by tensor.
Run: python bench/convert_memory.py [--gb 1.0] [--layout scan|unrolled]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_checkpoint(d: Path, gb: float) -> int:
    import torch

    hidden, inter, vocab = 2048, 5504, 32000
    per_layer = 4 * hidden * hidden + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((gb * 1e9 / 2 - 2 * vocab * hidden) / per_layer))
    cfg = dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=vocab, hidden_size=hidden,
               intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16,
               rms_norm_eps=1e-5, rope_theta=1e5, max_position_embeddings=4096, tie_word_embeddings=False,
               torch_dtype="bfloat16", hidden_act="silu", bos_token_id=1, eos_token_id=2)
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": r(vocab, hidden), "model.norm.weight": r(hidden), "lm_head.weight": r(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            sd[p + f"self_attn.{n}_proj.weight"] = r(hidden, hidden)
        sd[p + "mlp.gate_proj.weight"] = r(inter, hidden)
        sd[p + "mlp.up_proj.weight"] = r(inter, hidden)
        sd[p + "mlp.down_proj.weight"] = r(hidden, inter)
        sd[p + "input_layernorm.weight"] = r(hidden)
        sd[p + "post_attention_layernorm.weight"] = r(hidden)
    torch.save(sd, d / "pytorch_model.bin")
    return (d / "pytorch_model.bin").stat().st_size


# VmHWM (the peak RSS of this process image) rather than ru_maxrss, which Linux carries over from the
# parent through fork+exec.
PEAK = "int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) * 1024"

CHILD = """
import sys, time
from spiritlm_jax.converters.llama import convert_llama
t = time.perf_counter()
convert_llama(sys.argv[1], sys.argv[2], scan_layers=sys.argv[3] == "scan", overwrite=True)
print(""" + PEAK + """, time.perf_counter() - t)
"""

EXPORT_CHILD = """
import sys, time
from spiritlm_jax.converters.export import export_hf
t = time.perf_counter()
export_hf(sys.argv[1], sys.argv[2], overwrite=True, with_tokenizer=False, log=lambda m: None)  # random weights: no tokenizer
print(""" + PEAK + """, time.perf_counter() - t)
"""

BASELINE = """
import jax, orbax.checkpoint, torch, numpy
from spiritlm_jax.converters import llama
print(""" + PEAK + """)
"""


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--layout", default="scan", choices=("scan", "unrolled"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        size = make_checkpoint(tmp / "hf", a.gb)
        base = int(subprocess.run([sys.executable, "-c", BASELINE], capture_output=True, text=True, check=True).stdout)
        out = subprocess.run([sys.executable, "-c", CHILD, str(tmp / "hf"), str(tmp / "conv"), a.layout],
                             capture_output=True, text=True, check=True).stdout.split()
        peak, secs = int(out[0]), float(out[1])
        out = subprocess.run([sys.executable, "-c", EXPORT_CHILD, str(tmp / "conv"), str(tmp / "hf_out")],
                             capture_output=True, text=True, check=True).stdout.split()
        epeak, esecs = int(out[0]), float(out[1])
    for name, p, t in (("import (convert llama)", peak, secs), ("export (--to hf)", epeak, esecs)):
        print(f"{name}: checkpoint {size / 1e9:.3f} GB ({a.layout} layout): peak RSS {p / 1e9:.3f} GB = "
              f"{p / size:.2f}x (imports alone: {base / 1e9:.3f} GB; peak minus imports = {(p - base) / size:.2f}x); "
              f"{t:.1f} s = {size / t / 1e9:.2f} GB/s ({size / t / 27e9:.1%} of ~27 GB/s read bandwidth)")


if __name__ == "__main__":
    main()
