"""Benchmark tasks while training (``eval.tasks``): any ``spiritlm-jax eval`` task run on the run's
CURRENT parameters at every ``eval.every``, logged beside the held-out loss (``eval/<task>/<metric>``
in TensorBoard, W&B and ``metrics.jsonl``).

Each entry of ``eval.tasks`` is an ``spiritlm-jax eval`` command line without the program and without
the model, e.g. ``"pairs --data blimp.jsonl --limit 200"`` or ``"asr --data LibriSpeech/dev-clean
--shots LibriSpeech/train-clean-100 --n-shot 3 --limit 20"``; it is parsed by the eval CLI's own parser
(one definition of the tasks and their options) and run by its ``run_task``, so a task scores exactly
as ``spiritlm-jax eval`` scores the exported model. The model is the trainer's: the trainable and
frozen parameters combined into a plain Llama tree in the compute dtype (LoRA adapters merged,
a QLoRA base dequantized), sharded on the training mesh; the tokenizer is ``model.init``'s (or
``data.tokenizer``'s); speech tasks load the speech tokenizer once, from ``eval.speech_tokenizer``.
"""
from __future__ import annotations

import argparse
import shlex
from pathlib import Path

import jax
import numpy as np

from spiritlm_jax.config import dtype_of

from .trainer import TrainingError

# Options that choose or place the model: here the model is the run's current parameters.
MODEL_OPTIONS = ("--model", "--checkpoints", "--dtype", "--mesh", "--output")


def parse_tasks(lines) -> list[argparse.Namespace]:
    """``eval.tasks`` entries → the eval CLI's parsed arguments; a bad entry is a TrainingError that
    quotes it and the parser's complaint."""
    from spiritlm_jax.evaluation.cli import TASKS, add_arguments

    parser = _Parser(prog="eval.tasks entry", add_help=False)
    add_arguments(parser)
    out = []
    for line in lines:
        argv = shlex.split(line)
        chosen = [a.split("=", 1)[0] for a in argv if a.split("=", 1)[0] in MODEL_OPTIONS]
        if chosen:
            raise TrainingError(f"eval.tasks entry {line!r}: {', '.join(chosen)} cannot be used here — the task runs "
                                f"on the run's current parameters, placed on the training mesh")
        try:
            args = parser.parse_args(argv)
        except _ParseError as e:
            raise TrainingError(f"eval.tasks entry {line!r}: {e} (an entry is a `spiritlm-jax eval` command line "
                                f"without the model, e.g. 'pairs --data blimp.jsonl --limit 100'; tasks: "
                                f"{', '.join(t for t in TASKS if t != 'stsp-score')})") from None
        if args.task == "stsp-score":
            raise TrainingError(f"eval.tasks entry {line!r}: stsp-score scores prediction files, not a model")
        if args.data is None:
            raise TrainingError(f"eval.tasks entry {line!r}: needs --data (the benchmark data; see docs/eval.md)")
        out.append(args)
    return out


class _ParseError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # raise instead of exiting the training process
        raise _ParseError(message)


def task_labels(tasks) -> list[str]:
    """``pairs``, or ``pairs_1``, ``pairs_2`` when a task appears more than once."""
    names = [t.task for t in tasks]
    return [n if names.count(n) == 1 else f"{n}_{names[:i].count(n) + 1}" for i, n in enumerate(names)]


class CurrentModel:
    """What ``evaluation.tasks.Runner`` needs from a model (cfg, params, tokenizer, speech_tokenizer,
    variant, mesh), for parameters given by the trainer."""

    def __init__(self, cfg, params, tokenizer, variant: str, mesh, speech_tokenizer):
        self.cfg, self.params, self.tokenizer, self.variant, self.mesh = cfg, params, tokenizer, variant, mesh
        self.speech_tokenizer = speech_tokenizer

    @property
    def expressive(self) -> bool:
        return self.variant == "expressive"


class LazySpeechTokenizer:
    """The speech tokenizer, loaded on first use (a text task never loads it) and then kept."""

    def __init__(self, root: str | None, variant: str):
        self.root, self.variant, self._loaded = root, variant, None

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        if self._loaded is None:
            from spiritlm_jax.speech import SpeechTokenizer

            try:
                self._loaded = SpeechTokenizer.from_checkpoints(self.root, self.variant, with_vocoder=False)
            except (FileNotFoundError, ValueError) as e:
                raise TrainingError(f"an eval.tasks entry needs speech, but the speech tokenizer did not load ({e}); "
                                    f"set eval.speech_tokenizer to the speech_tokenizer folder") from None
        return getattr(self._loaded, name)


class TaskRunner:
    """Runs ``eval.tasks`` for one trainer (the tokenizer is read once, the merge function compiled once)."""

    def __init__(self, trainer):
        cfg = trainer.cfg
        self.trainer = trainer
        self.tasks = parse_tasks(cfg.eval.tasks)
        self.labels = task_labels(self.tasks)
        if jax.process_count() > 1:
            raise TrainingError("eval.tasks runs on one host; with several processes use eval.path (held-out loss) "
                                "and evaluate the exported model with `spiritlm-jax eval`")
        tok_dir = cfg.data.tokenizer or (cfg.model.init if cfg.model.init != "random" else "")
        if not tok_dir or not (Path(tok_dir) / "tokenizer.model").is_file():
            raise TrainingError("eval.tasks needs the text tokenizer: start from a model folder (model.init) or set "
                                "data.tokenizer to a folder holding tokenizer.model")
        from spiritlm_jax.text import TextTokenizer

        self.tokenizer = TextTokenizer.from_dir(tok_dir, n_embed=trainer.llama_cfg.vocab_size)
        self.variant = "expressive" if len(self.tokenizer.vocab.pitch) else "base"
        init = Path(cfg.model.init)
        beside = init.parent.parent if (init.parent.parent / "speech_tokenizer").is_dir() else None
        self.speech = LazySpeechTokenizer(cfg.eval.speech_tokenizer or (str(beside) if beside else None), self.variant)
        dt = trainer.llama_cfg.dtype
        # Inference config: parameters stored in the compute dtype, layout as trained.
        self.cfg = trainer.llama_cfg.replace(param_dtype=dt)
        self._merge = None

    def current_params(self):
        """The plain Llama parameter tree of the trainer's current state, sharded on its mesh."""
        from spiritlm_jax.models.llama import param_shardings

        from .peft import dequantize_tree, merge_lora, merge_trees

        trainer, plan = self.trainer, self.trainer.plan
        if self._merge is None:
            dt = dtype_of(self.cfg.dtype)

            def merge(trainable, frozen):
                full = merge_trees(dequantize_tree(frozen["params"], dt), trainable)
                if plan.is_lora:
                    return merge_lora(full, plan.lora_rank, plan.lora_alpha, dt)
                return jax.tree.map(lambda x: x.astype(dt), full)

            self._merge = jax.jit(merge, out_shardings=param_shardings(self.cfg, trainer.mesh))
        return self._merge(trainer.state["params"], trainer.frozen)

    def run(self) -> dict:
        """``{"<label>/<metric>": value}`` for every numeric metric of every task."""
        from spiritlm_jax.evaluation.cli import run_task

        lm = CurrentModel(self.cfg, self.current_params(), self.tokenizer, self.variant, self.trainer.mesh,
                          self.speech)
        out = {}
        for label, args in zip(self.labels, self.tasks):
            try:
                res = run_task(args, lm)
            except (FileNotFoundError, ValueError) as e:  # the eval CLI's data / task errors
                raise TrainingError(f"eval.tasks {label}: {e}") from None
            for k, v in res.metrics.items():
                if isinstance(v, (int, float, np.number)) and not isinstance(v, bool):
                    out[f"{label}/{k}"] = float(v)
        return out
