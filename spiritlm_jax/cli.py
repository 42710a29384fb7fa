"""The ``spiritlm-jax`` console script: one entry point, one subcommand per job.

Subcommands register in ``SUBCOMMANDS`` as ``name -> "module:function"``; the module exposes
``add_arguments(parser)`` (optional, same module) and the function takes the parsed args and returns
an exit code. Modules import lazily so ``spiritlm-jax --help`` is instant and a subcommand's heavy
dependencies (torch, tensorflow-datasets) load only when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

# name: (module, help line)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "convert": ("spiritlm_jax.converters.cli", "convert original PyTorch checkpoints to our JAX-native model tree"),
    "export": ("spiritlm_jax.converters.export_cli", "trained run -> model folder; model -> Hugging Face or the original"),
    "parity": ("spiritlm_jax.converters.parity_cli", "run a golden set made by the original code against our models"),
    "tokenize": ("spiritlm_jax.infer.tokenize_cli", "speech files or folders -> unit strings (JSONL)"),
    "generate": ("spiritlm_jax.infer.generate_cli", "generate text/speech from interleaved inputs"),
    "demo": ("spiritlm_jax.infer.demo", "tiny random-weight end-to-end demo (no checkpoints needed)"),
    "prepare": ("spiritlm_jax.train.prepare_cli", "prepare a training corpus (Apache Beam / TFDS ArrayRecord)"),
    "train": ("spiritlm_jax.train.cli", "train or fine-tune Spirit LM"),
    "train-quantizer": ("spiritlm_jax.train.quantizer_cli", "train a k-means speech-unit quantizer on a corpus (JAX)"),
    "miniature": ("spiritlm_jax.train.miniature_cli",
                  "a miniature Spirit LM end to end: TTS corpus, unit training, 3 LMs, the interleaving ablation"),
    "eval": ("spiritlm_jax.evaluation.cli", "evaluation harness"),
    "serve": ("spiritlm_jax.serve.cli", "OpenAI-compatible speech+text HTTP server (continuous batching, streaming)"),
}


def positive_int(text: str) -> int:
    """argparse type for counts (batch sizes, files per call): an integer >= 1, else a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The top-level parser. Only ``command``'s module is imported (to add its arguments), so ``--help``
    is instant and one subcommand's missing optional dependency cannot break the others."""
    p = argparse.ArgumentParser(
        prog="spiritlm-jax",
        description="Spirit LM in JAX/Flax: convert the original checkpoints, prove parity, tokenize, "
        "generate, train, evaluate. Run 'spiritlm-jax COMMAND --help' for each command.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name, (mod, help_) in SUBCOMMANDS.items():
        if name != command:
            sub.add_parser(name, help=help_)
            continue
        m = importlib.import_module(mod)
        sp = sub.add_parser(name, help=help_, description=(m.__doc__ or help_).strip(),
                            formatter_class=argparse.RawDescriptionHelpFormatter)
        m.add_arguments(sp)
        sp.set_defaults(_run=m.run)
    return p


def subcommand(argv: list[str]) -> str | None:
    """The subcommand a command line names: its first word that is not an option."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    command = subcommand(argv)
    parser = build_parser(command if command in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    return int(args._run(args) or 0)


# inference commands: re-executed once with glibc's malloc huge pages (spiritlm_jax/runtime.py says why)
HUGEPAGE_COMMANDS = ("serve", "generate")


def entry() -> int:
    """The ``spiritlm-jax`` console script and ``python -m spiritlm_jax.cli``: ``main`` on the command line,
    after the inference commands re-executed themselves with malloc huge pages (``main(argv)``, as tests and
    scripts call it in process, never re-executes)."""
    if subcommand(sys.argv[1:]) in HUGEPAGE_COMMANDS:
        from spiritlm_jax import runtime

        runtime.reexec_with_malloc_hugepages()
    return main()


if __name__ == "__main__":
    sys.exit(entry())
