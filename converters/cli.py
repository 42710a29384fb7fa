"""Convert original PyTorch checkpoints to spiritlm-jax's format (orbax params + config).

Kinds:
  all ROOT DST    a whole original checkpoints/ tree → the JAX-native model tree (docs/model-format.md):
                  every speech component as config.json + model.safetensors, the FCPE weights from the
                  installed torchfcpe wheel, each LM as an orbax checkpoint. The whole source is
                  validated first (components present, each vocoder in its own slot, tokenizer files,
                  every key/shape/finite tensor), then written into a temporary folder renamed to DST
                  at the end. The converted LM is checked against transformers' LlamaForCausalLM on a
                  short prompt (--no-self-check to skip; skipped above --self-check-max-gb). DST then
                  works as --checkpoints for every command, with torch absent.
  llama SRC DST   an HF Llama directory (config.json + pytorch_model.bin | sharded .bin + index |
                  model.safetensors | sharded safetensors + index), e.g.
                  checkpoints/spiritlm_model/spirit-lm-base-7b

Loading never executes arbitrary pickle code: torch.load runs with weights_only=True; a file that
needs another class is refused with its name, and --allow-pickle-class MODULE.CLASS opts in.

Examples:
  spiritlm-jax convert llama checkpoints/spiritlm_model/spirit-lm-base-7b out/base-7b
  spiritlm-jax convert llama SRC DST --layout unrolled --dtype bfloat16
"""
from __future__ import annotations

import sys
import time


def add_arguments(p):
    sub = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    lp = sub.add_parser("llama", help="an HF Llama / Spirit LM language-model directory")
    lp.add_argument("src", help="HF model directory")
    lp.add_argument("dst", help="output directory (created)")
    lp.add_argument("--layout", choices=("scan", "unrolled"), default="scan",
                    help="scan: layers stacked on a leading axis (fast compile, default); unrolled: layers_0..N")
    lp.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="store parameters in this dtype (default: as in the source file)")
    lp.add_argument("--allow-pickle-class", action="append", default=[], metavar="MODULE.CLASS",
                    help="let torch.load construct this class (only for files you trust); repeatable")
    lp.add_argument("--overwrite", action="store_true", help="replace DST if it exists")

    ap = sub.add_parser("all", help="a whole original checkpoints/ tree (every component of each variant)")
    ap.add_argument("src", help="the original checkpoints/ folder (speech_tokenizer/, spiritlm_model/)")
    ap.add_argument("dst", help="output folder, same layout")
    ap.add_argument("--variant", choices=("base", "expressive", "both"), default="both",
                    help="which model(s) to convert; every component they need must be present")
    ap.add_argument("--layout", choices=("scan", "unrolled"), default="scan")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--allow-pickle-class", action="append", default=[], metavar="MODULE.CLASS")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace DST (only after the new tree is complete)")
    ap.add_argument("--no-self-check", action="store_true", help="skip the transformers comparison of the LM")
    ap.add_argument("--self-check-max-gb", type=float, default=4.0,
                    help="skip the LM self-check when its weights exceed this size (it loads transformers' model)")


def run(args) -> int:
    from .torch_io import CheckpointError
    from spiritlm_jax.config import ConfigError
    from spiritlm_jax.model_dir import ModelDirError

    t0 = time.perf_counter()
    try:
        if args.kind == "all":
            return convert_tree(args)
        if args.kind == "llama":
            from .llama import convert_llama

            out = convert_llama(args.src, args.dst, scan_layers=args.layout == "scan", dtype=args.dtype,
                                allow_classes=args.allow_pickle_class, overwrite=args.overwrite, progress=True)
    except (CheckpointError, ConfigError, FileExistsError, ModelDirError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {out} in {time.perf_counter() - t0:.1f} s")
    return 0


def _self_check(src_dir, conv_dir) -> str:
    import numpy as np

    try:
        import torch
        from transformers import LlamaForCausalLM
    except ImportError:
        return "skipped (torch/transformers not installed)"
    import jax.numpy as jnp

    from .llama import load_converted
    from spiritlm_jax.models.llama import Llama

    ids = np.array([[1, 450, 4477, 13, 32000, 32001, 32002]], np.int64)
    cfg, params = load_converted(conv_dir, dtype="float32", param_dtype="float32")
    ids = np.minimum(ids, cfg.vocab_size - 1)
    ours = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(ids))[0])
    hf = LlamaForCausalLM.from_pretrained(src_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    err = float(np.abs(ours - ref).max())
    # fp32 summation-order bound, scaled to the logits' size (the tests measure ~1e-6 relative)
    tol = 1e-4 * max(1.0, float(np.abs(ref).max()))
    if not err <= tol:
        raise RuntimeError(f"self-check FAILED: converted logits differ from transformers by {err:.3g} (> {tol:.3g})")
    return f"ok (max |Δlogits| {err:.2g} vs transformers, tolerance {tol:.2g})"


def convert_tree(args) -> int:
    from pathlib import Path

    from .tree import LM_FOLDER, SPEECH_FOLDER, convert_all

    src = Path(args.src)
    if not (src / LM_FOLDER).is_dir() and not (src / SPEECH_FOLDER).is_dir():
        print(f"error: {src} is not an original checkpoints/ folder (no {LM_FOLDER}/ or {SPEECH_FOLDER}/)", file=sys.stderr)
        return 2
    variants = ("base", "expressive") if args.variant == "both" else (args.variant,)
    max_bytes = args.self_check_max_gb * 1e9

    def self_check(lm_src, lm_dst) -> str:
        if args.no_self_check:
            return "skipped (--no-self-check)"
        size = sum(f.stat().st_size for f in lm_src.iterdir() if f.suffix in (".bin", ".safetensors"))
        if size > max_bytes:
            return f"skipped ({size / 1e9:.1f} GB > --self-check-max-gb {args.self_check_max_gb})"
        return _self_check(lm_src, lm_dst)

    out = convert_all(args.src, args.dst, variants=variants, scan_layers=args.layout == "scan", dtype=args.dtype,
                      allow_classes=args.allow_pickle_class, overwrite=args.overwrite, self_check=self_check,
                      log=lambda m: print(m, flush=True))
    print(f"done: use --checkpoints {out} (every command reads it without torch)")
    return 0
