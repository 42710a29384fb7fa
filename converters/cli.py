"""Convert original PyTorch checkpoints to spiritlm-jax's format (orbax params + config).

Kinds:
  all ROOT DST    a whole original checkpoints/ tree: each LM variant present is converted to our orbax
                  format, every speech component is loaded through our converters (proving it converts)
                  and copied beside it, and with torch + transformers installed the converted LM is
                  checked against transformers' LlamaForCausalLM on a short prompt (--no-self-check to
                  skip; skipped automatically above --self-check-max-gb). DST then works as
                  --checkpoints for every other command.
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
    ap.add_argument("--variant", choices=("base", "expressive", "both"), default="both")
    ap.add_argument("--layout", choices=("scan", "unrolled"), default="scan")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None)
    ap.add_argument("--allow-pickle-class", action="append", default=[], metavar="MODULE.CLASS")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--no-self-check", action="store_true", help="skip the transformers comparison of the LM")
    ap.add_argument("--self-check-max-gb", type=float, default=4.0,
                    help="skip the LM self-check when its weights exceed this size (it loads transformers' model)")


def run(args) -> int:
    from .torch_io import CheckpointError
    from spiritlm_jax.config import ConfigError

    t0 = time.perf_counter()
    try:
        if args.kind == "all":
            return convert_tree(args)
        if args.kind == "llama":
            from .llama import convert_llama

            out = convert_llama(args.src, args.dst, scan_layers=args.layout == "scan", dtype=args.dtype,
                                allow_classes=args.allow_pickle_class, overwrite=args.overwrite, progress=True)
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {out} in {time.perf_counter() - t0:.1f} s")
    return 0


SPEECH_COMPONENTS = {
    "base": ("hubert_25hz", "hifigan_spiritlm_base"),
    "expressive": ("hubert_25hz", "vqvae_f0_quantizer", "style_encoder_w2v2", "hifigan_spiritlm_expressive_w2v2"),
}


def _check_speech(folder, name: str) -> None:
    """Load one original speech component through our converter (raises with a clear error if it cannot)."""
    if name == "hubert_25hz":
        from spiritlm_jax.hubert_tokenizer import HubertTokenizer

        HubertTokenizer.from_checkpoint_dir(folder)
    elif name == "vqvae_f0_quantizer":
        from .f0_vqvae import load_f0_vqvae

        load_f0_vqvae(folder)
    elif name == "style_encoder_w2v2":
        from .style import convert_style

        convert_style(folder)
    else:
        from .hifigan import load_hifigan

        load_hifigan(folder)


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
    import shutil
    from pathlib import Path

    from .llama import convert_llama

    src, dst = Path(args.src), Path(args.dst)
    if not (src / "spiritlm_model").is_dir() and not (src / "speech_tokenizer").is_dir():
        print(f"error: {src} is not an original checkpoints/ folder (no spiritlm_model/ or speech_tokenizer/)",
              file=sys.stderr)
        return 2
    variants = ("base", "expressive") if args.variant == "both" else (args.variant,)
    done_speech = set()
    for v in variants:
        lm_src = src / "spiritlm_model" / f"spirit-lm-{v}-7b"
        if not lm_src.is_dir():
            if args.variant != "both":
                print(f"error: {lm_src} not found", file=sys.stderr)
                return 2
            print(f"- {v}: no LM in {lm_src.parent}, skipped")
            continue
        lm_dst = dst / "spiritlm_model" / lm_src.name
        print(f"- {v}: converting the LM {lm_src} -> {lm_dst}")
        convert_llama(lm_src, lm_dst, scan_layers=args.layout == "scan", dtype=args.dtype,
                      allow_classes=args.allow_pickle_class, overwrite=args.overwrite, progress=True)
        if args.no_self_check:
            print("  self-check: skipped (--no-self-check)")
        else:
            size = sum(f.stat().st_size for f in lm_src.iterdir() if f.suffix in (".bin", ".safetensors"))
            if size > args.self_check_max_gb * 1e9:
                print(f"  self-check: skipped ({size / 1e9:.1f} GB > --self-check-max-gb {args.self_check_max_gb})")
            else:
                print(f"  self-check: {_self_check(lm_src, lm_dst)}")
        for name in SPEECH_COMPONENTS[v]:
            if name in done_speech:
                continue
            folder = src / "speech_tokenizer" / name
            if not folder.is_dir():
                print(f"error: {folder} not found: the {v} variant needs it", file=sys.stderr)
                return 2
            _check_speech(folder, name)
            out = dst / "speech_tokenizer" / name
            if out.exists() and args.overwrite:
                shutil.rmtree(out)
            shutil.copytree(folder, out, dirs_exist_ok=False)
            done_speech.add(name)
            print(f"  {name}: loads through our converter; copied")
    print(f"done: use --checkpoints {dst}")
    return 0
