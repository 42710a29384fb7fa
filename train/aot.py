"""Ahead-of-time compile of the 7B train step for hardware we do not have: memory per device and the
step time implied at a stated MFU, without running anything.

    python -m spiritlm_jax.train.aot --target v5e-256 --batch 256 --seq 4096
    python -m spiritlm_jax.train.aot --target 8xh100 --batch 16 --seq 4096 --simulate-cpu

Two ways, tried in this order:

1. **Real topology** (as MaxText's ``train_compile.py`` does): ``jax.experimental.topologies
   .get_topology_desc`` builds the TPU devices of a slice from libtpu's compiler, the train step is
   lowered with abstract ``ShapeDtypeStruct`` inputs sharded on a mesh of those devices and compiled by
   the TPU compiler; ``compiled.memory_analysis()`` is then the real per-chip HBM plan. Needs ``libtpu``
   importable (it works on a CPU-only host); GPU topologies are not implemented by jaxlib
   (``NotImplementedError: topology not implemented for cuda``).
2. **Simulated CPU mesh** (``--simulate-cpu``, or the fallback): the same abstract lowering on N
   simulated CPU devices (``--xla_force_host_platform_device_count``), compiled by XLA:CPU. The
   sharding, the collectives and the argument/output sizes per device are the real ones; the temp
   (activation) size is XLA:CPU's buffer plan, which fuses differently from TPU/GPU: an estimate only.

Nothing is allocated: parameters, optimizer state and batch exist only as shapes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

TARGETS = {
    # name: (topology name for get_topology_desc, device count, mesh (data, fsdp, tensor), peak bf16 TFLOP/s, HBM GiB)
    "v5e-256": ("v5e:16x16", 256, (1, 256, 1), 197.0, 16.0),
    "v5p-128": ("v5p:4x4x4", 64, (1, 64, 1), 459.0, 95.0),  # v5p-128 = 64 chips (128 TensorCores)
    "8xh100": (None, 8, (1, 8, 1), 989.0, 80.0),
    "v5e-8": ("v5e:2x4", 8, (1, 8, 1), 197.0, 16.0),  # one v5e-8 host
    "v5e-16": ("v5e:4x4", 16, (1, 16, 1), 197.0, 16.0),
}


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", choices=sorted(TARGETS), required=True)
    p.add_argument("--batch", type=int, default=None, help="global batch (sequences); default 1 per device")
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32768, help="32768 Expressive, 32512 Base")
    p.add_argument("--remat", default="full", choices=("none", "full", "dots"))
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU for the implied step time")
    p.add_argument("--mesh", default=None, help="override the mesh as data,fsdp,tensor")
    p.add_argument("--simulate-cpu", action="store_true", help="skip the real topology; use N simulated CPU devices")
    p.add_argument("--layers", type=int, default=32, help="(testing) fewer layers")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--inter", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--attention", default="auto", choices=("auto", "xla", "chunked", "cudnn", "splash"),
                   help="LlamaConfig.attention (auto: splash on TPU, cudnn on GPU, xla on the simulated CPU mesh)")
    p.add_argument("--lora-rank", type=int, default=0, help="LoRA adapters of this rank on attention + MLP (0: full)")
    p.add_argument("--quantize", default="none", choices=("none", "int8", "int4", "nf4"),
                   help="QLoRA: the frozen base of the adapted modules in this format (needs --lora-rank)")
    p.add_argument("--json", default=None, help="append the result as one JSON line to this file")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = _args(argv)
    topo_name, n_dev, mesh_shape, peak, hbm = TARGETS[a.target]
    if a.mesh:
        mesh_shape = tuple(int(x) for x in a.mesh.split(","))
    simulate = a.simulate_cpu or topo_name is None
    if simulate:
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_force_host_platform_device_count" not in flags:
            os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={n_dev}").strip()
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    mode, why = "simulated-cpu", ""
    devices = None
    if not simulate:
        try:
            from jax.experimental import topologies

            devices = topologies.get_topology_desc(topo_name, "tpu").devices
            mode = f"tpu-topology:{topo_name}"
        except Exception as e:  # noqa: BLE001 — report exactly what failed, then fall back
            why = f"{type(e).__name__}: {e}"
            print(f"real topology {topo_name} unavailable ({why}); re-run with --simulate-cpu", file=sys.stderr)
            return 4
    if devices is None:
        devices = jax.devices()[:n_dev]
        if len(devices) < n_dev:
            print(f"need {n_dev} simulated devices, have {len(devices)}: set XLA_FLAGS before jax loads", file=sys.stderr)
            return 4
    result = compile_train_step(devices, mesh_shape, batch=a.batch or n_dev, seq=a.seq, vocab=a.vocab, remat=a.remat,
                                grad_accum=a.grad_accum, layers=a.layers, hidden=a.hidden, inter=a.inter, heads=a.heads,
                                attention=a.attention, lora_rank=a.lora_rank, quantize=a.quantize)
    result.update(target=a.target, mode=mode, fallback_reason=why, peak_tflops=peak, hbm_gib=hbm, mfu_assumed=a.mfu)
    tokens = result["batch"] * a.seq
    step_s = tokens * result["flops_per_token"] / (a.mfu * peak * 1e12 * n_dev)
    result.update(step_time_s_at_mfu=step_s, tokens_per_s_at_mfu=tokens / step_s)
    print(json.dumps(result, indent=1))
    if a.json:
        with open(a.json, "a") as f:
            f.write(json.dumps(result) + "\n")
    return 0


def compile_train_step(devices, mesh_shape, *, batch: int, seq: int, vocab: int = 32768, remat: str = "full",
                       grad_accum: int = 1, layers: int = 32, hidden: int = 4096, inter: int = 11008,
                       heads: int = 32, attention: str = "auto", lora_rank: int = 0, quantize: str = "none") -> dict:
    """Lower and compile the real train step on ``devices`` with abstract inputs; memory per device.
    ``lora_rank``: the LoRA step instead (qwix adapters on attention + MLP, frozen bf16 base as a step
    argument; ``quantize``: that base stored int8/int4/nf4, QLoRA)."""
    import jax
    import numpy as np

    from spiritlm_jax import sharding as shd
    from spiritlm_jax.models.llama import Llama
    from .config import ModelConfig, OptimConfig
    from .trainer import (abstract_batch, flops_per_token, jit_train_step, make_optimizer,
                          make_train_step, modality_table, state_layout)

    cfg = ModelConfig().llama.replace(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                      remat=remat, attention=attention)
    model = Llama(cfg)
    tx, sched = make_optimizer(OptimConfig(grad_accum=grad_accum), 1000)
    mesh = shd.make_mesh(mesh_shape, devices=devices)
    plan = None
    if lora_rank:
        from .peft import ParamPlan
        from .trainer import plan_layout

        plan = ParamPlan(cfg, lora_rank=lora_rank, lora_alpha=2.0 * lora_rank, quantize=quantize)
        layout = plan_layout(plan, tx, mesh)
    else:
        layout = state_layout(model, tx, mesh)
    step = make_train_step(model, tx, sched, modality_table(vocab, "auto"), grad_accum=grad_accum, plan=plan)
    t0 = time.perf_counter()
    with shd.mesh_context(mesh):
        args = (layout.abstract, abstract_batch(layout, batch, seq))
        if plan is not None:
            args += (layout.frozen_abstract,)
        lowered = jit_train_step(step, layout).lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    mosaic = mosaic_calls(compiled.as_text())
    gib = 1024 ** 3
    state_bytes = sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(layout.abstract))
    frozen_bytes = sum(np.prod(x.shape) * (0.5 if "int4" in str(x.dtype) else np.dtype(x.dtype).itemsize)
                       for x in jax.tree.leaves(layout.frozen_abstract)) if plan is not None else 0
    out = {
        "devices": len(devices), "mesh": list(mesh_shape), "batch": batch, "seq": seq, "vocab": vocab,
        "layers": layers, "remat": remat, "attention": attention, "grad_accum": grad_accum, "params": cfg.num_params(),
        "lora_rank": lora_rank, "quantize": quantize, "frozen_gib_total": float(frozen_bytes) / gib,
        "trainable_params": int(sum(np.prod(x.shape) for x in jax.tree.leaves(layout.abstract["params"]))),
        # LoRA: no weight gradients for the frozen matmuls (2 of the 6 FLOPs per parameter and token)
        "train_state_gib_total": state_bytes / gib, "flops_per_token": flops_per_token(cfg, seq) - (
            2.0 * (cfg.num_params() - cfg.vocab_size * cfg.hidden_size) if lora_rank else 0.0),
        "lower_s": t1 - t0, "compile_s": t2 - t1,
        # Pallas TPU kernels (Mosaic) in the compiled program: > 0 iff the splash kernel really runs (an
        # XLA:CPU compile or any other backend: 0, the kernel is interpreted or absent)
        "mosaic_calls": mosaic,
    }
    if mem is not None:
        out.update(argument_gib=mem.argument_size_in_bytes / gib, output_gib=mem.output_size_in_bytes / gib,
                   temp_gib=mem.temp_size_in_bytes / gib, alias_gib=mem.alias_size_in_bytes / gib,
                   peak_gib_per_device=(mem.argument_size_in_bytes + mem.output_size_in_bytes
                                        - mem.alias_size_in_bytes + mem.temp_size_in_bytes) / gib)
    return out


def mosaic_calls(hlo_text: str) -> int:
    """How many Mosaic (Pallas TPU) custom calls an HLO/StableHLO text holds: each is a
    ``custom_call_target="tpu_custom_call"`` (compiled HLO) or ``@tpu_custom_call`` (StableHLO)."""
    import re

    return len(re.findall(r'custom_call_target="tpu_custom_call"|@tpu_custom_call\b', hlo_text))


if __name__ == "__main__":
    sys.exit(main())
