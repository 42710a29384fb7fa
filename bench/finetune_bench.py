"""Step time of full fine-tuning vs LoRA vs QLoRA at the same model size, on this machine.

    python bench/finetune_bench.py [--steps 10] [--batch 8] [--seq 512]

Same model (hidden 768, 8 layers, 12 heads, Spirit LM's 32768-row vocabulary; fp32 compute for a CPU),
same synthetic SFT-shaped batches, one process; the median step time after one warm-up step, and the
train-state size (what the optimizer owns). Prints one JSON line per variant with the load average
beside it (a loaded machine inflates every number; rerun on a quiet one).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--variants", default="full,lora,qlora-nf4")
    a = p.parse_args(argv)

    import jax
    import numpy as np

    from spiritlm_jax import sharding as shd
    from spiritlm_jax.train.config import TrainConfig
    from spiritlm_jax.train.trainer import SyntheticIterator, Trainer

    size = ["model.vocab_size=32768", "model.hidden_size=768", "model.intermediate_size=2048",
            "model.num_hidden_layers=8", "model.num_attention_heads=12", "model.num_key_value_heads=12",
            "model.dtype=float32", "model.remat=none", "model.vocab_layout=none", f"data.batch_size={a.batch}",
            f"data.seq_len={a.seq}", f"steps={a.steps + 1}", "log_every=1", "progress=false", "tensorboard=false",
            "checkpoint.every=100000", "checkpoint.resume=false", "optim.warmup_steps=0"]
    extra = {"full": [], "lora": ["lora.rank=16"], "qlora-nf4": ["lora.rank=16", "lora.quantize=nf4"]}
    mesh = shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])
    run_dir = tempfile.mkdtemp(prefix="finetune_bench-")  # fresh each run: an old step would clash
    for name in a.variants.split(","):
        cfg = TrainConfig.load(None, size + extra[name] + [f"checkpoint.dir={run_dir}/{name}"])
        trainer = Trainer(cfg, SyntheticIterator(a.batch, a.seq, 32768), mesh=mesh)
        hist = trainer.train()
        trainer.close()
        times = [r.metrics["step_time_s"] for r in hist[1:]]
        state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(trainer.state))
        print(json.dumps({"variant": name, "median_step_s": statistics.median(times),
                          "tokens_per_s": a.batch * a.seq / statistics.median(times),
                          "trainable_params": int(sum(x.size for x in jax.tree.leaves(trainer.state["params"]))),
                          "train_state_mib": state / 2**20, "compile_s": trainer.compile_seconds,
                          "loadavg_1m": os.getloadavg()[0], "batch": a.batch, "seq": a.seq}), flush=True)
        del trainer
        time.sleep(0.1)
    shutil.rmtree(run_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
