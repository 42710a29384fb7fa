"""Run a golden set made by the ORIGINAL PyTorch Spirit LM against our converted JAX models.

GOLDEN_DIR holds checkpoints/ (the original's checkpoint tree), cases/*.npz|json and MANIFEST.md.
Every checkpoint is converted with our converters and every shape is read from the files, so any
golden set of that layout works (other architectures, other seeds).

Prints one table (case | quantity | max abs error | tolerance | status) and exits non-zero if any
quantity fails OR any case file has no runner yet (status not-implemented).

Examples:
  spiritlm-jax parity ../shared/golden
  spiritlm-jax parity ../shared/golden --only lm_,hubert_ --json parity.json
"""
from __future__ import annotations

import os


def add_arguments(p):
    p.add_argument("golden", nargs="?", default=os.environ.get("SPIRITLM_GOLDEN", "../shared/golden"),
                   help="golden set directory (default: $SPIRITLM_GOLDEN or ../shared/golden)")
    p.add_argument("--only", default=None, metavar="PREFIX[,PREFIX]",
                   help="run only case files whose name starts with one of these prefixes")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write one JSON record per case file and quantity")


def run(args) -> int:
    import jax

    jax.config.update("jax_default_matmul_precision", "float32")  # parity runs in true fp32
    from .parity import main

    return main(args)
