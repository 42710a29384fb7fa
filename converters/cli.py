"""Convert original PyTorch checkpoints to spiritlm-jax's format (orbax params + config).

Kinds:
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


def run(args) -> int:
    from .torch_io import CheckpointError
    from spiritlm_jax.config import ConfigError

    t0 = time.perf_counter()
    try:
        if args.kind == "llama":
            from .llama import convert_llama

            out = convert_llama(args.src, args.dst, scan_layers=args.layout == "scan", dtype=args.dtype,
                                allow_classes=args.allow_pickle_class, overwrite=args.overwrite, progress=True)
    except (CheckpointError, ConfigError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"converted {args.src} -> {out} in {time.perf_counter() - t0:.1f} s")
    return 0
