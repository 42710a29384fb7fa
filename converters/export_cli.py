"""Export a model out of spiritlm-jax: a trained run to a model folder, or a model to Hugging Face / the original.

  spiritlm-jax export RUN_DIR[/STEP] DST              a training run (checkpoint.dir, newest step or STEP) →
                                                      an LM model folder (params only, --dtype, default
                                                      bfloat16; the run's tokenizer, extended vocabulary
                                                      included). Every command takes it: generate --model DST,
                                                      eval --model DST, SpiritLM.from_pretrained(DST), train
                                                      model.init=DST, serve.
  spiritlm-jax export LM_DIR DST --to hf              an LM folder (converted, exported, or a run) → a
                                                      transformers LlamaForCausalLM folder: sharded
                                                      safetensors + index, config.json, generation_config.json,
                                                      tokenizer.model, tokenizer_config.json,
                                                      special_tokens_map.json
  spiritlm-jax export TREE DST --to original          a tree written by `convert all` → the original
                                                      checkpoints/ layout and file formats (readable by the
                                                      original Spirit LM code)

Exports stream tensor by tensor (peak memory: a few tensors on top of the reader's), write into a
temporary folder and rename it to DST at the end; --overwrite replaces DST only then.

Examples:
  spiritlm-jax export runs/tiny runs/tiny-model
  spiritlm-jax export runs/sft/1000 out/sft-hf --to hf --dtype float32
  spiritlm-jax export converted/ original-copy/ --to original
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path


def add_arguments(p):
    p.add_argument("src", help="a training run (or one of its step folders), an LM folder, or a converted tree")
    p.add_argument("dst", help="output folder (written at the end; see --overwrite)")
    p.add_argument("--to", choices=("jax", "hf", "original"), default="jax",
                   help="jax: our model folder (from a run; default); hf: transformers; original: the original tree")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="parameter dtype (default: bfloat16 from a run, the stored dtype otherwise)")
    p.add_argument("--tokenizer", default=None, metavar="LM_DIR",
                   help="a run's tokenizer folder when neither model.init nor data.tokenizer names one")
    p.add_argument("--overwrite", action="store_true", help="replace DST once the export is complete")


def _is_run(p: Path) -> bool:
    return (p / "state").is_dir() or any(c.is_dir() and c.name.isdigit() and (c / "state").is_dir()
                                         for c in p.iterdir()) if p.is_dir() else False


def run(args) -> int:
    from spiritlm_jax.config import ConfigError
    from spiritlm_jax.model_dir import ModelDirError

    from .export import export_hf, export_original, export_run
    from .torch_io import CheckpointError

    src, dst = Path(args.src), Path(args.dst)
    if not src.exists():
        print(f"error: {src}: no such file or folder", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    log = lambda m: print(m, flush=True)  # noqa: E731
    try:
        if args.to == "original":
            out = export_original(src, dst, overwrite=args.overwrite, log=log)
        elif _is_run(src):
            if args.to == "jax":
                out = export_run(src, dst, dtype=args.dtype or "bfloat16", tokenizer=args.tokenizer,
                                 overwrite=args.overwrite, log=log)
            else:  # run → our folder (temporary) → HF
                with tempfile.TemporaryDirectory(dir=dst.absolute().parent) as tmp:
                    mid = export_run(src, Path(tmp) / "model", dtype=args.dtype or "bfloat16",
                                     tokenizer=args.tokenizer, log=log)
                    out = export_hf(mid, dst, overwrite=args.overwrite, log=log)
        elif args.to == "hf":
            out = export_hf(src, dst, dtype=args.dtype, overwrite=args.overwrite, log=log)
        else:
            print(f"error: {src} is not a training run (no <step>/state folders); to export a model folder use "
                  f"--to hf or --to original", file=sys.stderr)
            return 2
    except (CheckpointError, ConfigError, ModelDirError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"exported {src} -> {out} in {time.perf_counter() - t0:.1f} s")
    return 0
