"""Train or fine-tune Spirit LM (or extend a Llama checkpoint's vocabulary to Spirit LM's first).

  spiritlm-jax train --config run.json optim.lr=1e-4 steps=2000 mesh.fsdp=-1
  spiritlm-jax train model.init=/ckpt/spirit-lm-base-7b-jax data.path=/data/spiritlm_corpus/asr/1.0.0 ...
  spiritlm-jax train --extend-vocab /hf/Llama-2-7b /ckpt/llama2-spiritlm-expressive --layout expressive
  spiritlm-jax train --print-config [--config FILE key=value ...]
  spiritlm-jax train --config configs/sft_lora.json model.init=/ckpt/spirit-lm-base-7b-jax data.path=DS
  spiritlm-jax train recipe=dpo lora.rank=16 model.init=... data.path=DS   # recipe=pretrain|sft|dpo

Recipes: pretrain (next token on every token), sft (loss on the response tokens of `prepare --sft`
records), dpo (preference pairs). lora.rank>0 trains LoRA adapters (qwix) on a frozen base,
lora.quantize=int8|int4|nf4 stores that base quantized (QLoRA), optim.trainable=REGEX trains only the
matching parameter paths (optim.trainable_rows=speech: only the speech rows of embed/lm_head);
eval.every=N runs held-out validation, plus `spiritlm-jax eval` tasks on the current parameters with
eval.tasks='["pairs --data blimp.jsonl"]'; logging.wandb=true logs to W&B (offline by default)
(docs/finetune.md). Presets: configs/.

The config is the dataclass tree in spiritlm_jax/train/config.py (sections model, optim, data, mesh,
checkpoint, and top-level steps, seed, log_every, ...); a FILE (.json/.toml/.yaml) gives values and each
key=value overrides one (dotted keys). data.path=synthetic trains on a deterministic synthetic stream;
otherwise it is a dataset prepared by `spiritlm-jax prepare` (its version folder), read with grain.

Outputs in checkpoint.dir: orbax checkpoints (the newest complete one is resumed automatically),
metrics.jsonl, tensorboard/ event files, train_config.json and loss_curve.png at the end.
Exit codes: 0 done, 2 bad config/input (also: resuming a checkpoint.dir whose checkpoints belong to another
model config; nothing is moved), 3 training diverged (NaN/inf; the last good checkpoint is kept), 4 a
checkpoint could not be saved (disk full: the run stops at that save, the last complete checkpoint is intact),
5 (multi-host) a peer process was lost: every process stops within distributed_timeout_s.
Multi-host: set distributed=true (jax.distributed.initialize) and launch one process per host; see
docs/training.md.
"""
from __future__ import annotations

import errno
import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("--config", help="config file (.json, .toml, .yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=1e-4")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("--extend-vocab", nargs=2, metavar=("SRC", "OUT"),
                        help="extend an HF or converted Llama checkpoint (with tokenizer.model) to Spirit LM's "
                             "vocabulary and write a converted checkpoint to OUT (usable as model.init)")
    parser.add_argument("--layout", choices=("base", "expressive"), default="expressive",
                        help="target layout for --extend-vocab (default: expressive)")
    parser.add_argument("--vocab-seed", type=int, default=0, help="seed of the new rows for --extend-vocab")
    parser.add_argument("--overwrite", action="store_true", help="--extend-vocab / --export: replace a non-empty OUT")
    parser.add_argument("--export", metavar="OUT",
                        help="do not train: restore the newest checkpoint of this config's checkpoint.dir and write "
                             "the model to OUT as a converted spiritlm-jax Llama directory (LoRA adapters merged "
                             "into the base; QLoRA dequantized), usable as model.init or by SpiritLM")
    parser.add_argument("--adapters-only", action="store_true",
                        help="--export: write only the LoRA adapters (small) and an adapter_config.json")


def make_data_iterator(cfg, vocab_size: int, *, path: str | None = None, split: str | None = None,
                       held_out: bool = False):
    """The host-local batch iterator named by ``cfg.data``; ``path``/``split``/``held_out`` (one pass, no
    repeat) give the validation data of ``eval``."""
    import jax

    from .trainer import SyntheticIterator, TrainingError

    d = cfg.data
    path = path or d.path
    if path == "synthetic":
        if cfg.recipe != "pretrain":
            raise TrainingError(f"recipe={cfg.recipe} needs a prepared dataset with an {cfg.recipe!r} split "
                                f"(`spiritlm-jax prepare --sft MANIFEST.jsonl`): set data.path")
        return SyntheticIterator(d.batch_size, d.seq_len, vocab_size, d.seed + (1 if held_out else 0),
                                 process_index=jax.process_index(), process_count=jax.process_count())
    tok = d.tokenizer or (cfg.model.init if cfg.model.init != "random" else "")
    if not tok:
        raise TrainingError("a prepared dataset needs a tokenizer: set data.tokenizer=LM_DIR (or model.init)")
    rows = d.batch_size // jax.process_count()
    if cfg.recipe in ("sft", "dpo"):
        from .sft import make_iterator as make_sft_iterator

        return make_sft_iterator(path, tok, kind=cfg.recipe, seq_len=d.seq_len, batch_size=rows, seed=d.seed,
                                 split=split or None, num_epochs=1 if held_out else None)
    from .loader import LoaderConfig, make_iterator
    from .sequences import SequenceConfig

    return make_iterator(LoaderConfig(path, tok, seq_len=d.seq_len, batch_size=rows, seed=d.seed,
                                      num_epochs=1 if held_out else None, sequence=SequenceConfig(expressive=d.expressive)))


def make_eval_data(cfg, vocab_size: int):
    """A factory of fresh held-out iterators (``eval.path`` or ``data.path``, split ``eval.split``), or None."""
    if not cfg.eval.every:
        return None
    path = cfg.eval.path or cfg.data.path
    return lambda: make_data_iterator(cfg, vocab_size, path=path, split=cfg.eval.split, held_out=True)


def run(args) -> int:
    from .config import TrainConfig, TrainConfigError

    if args.extend_vocab:
        from .vocab import VocabExtensionError, extend_checkpoint

        try:
            out = extend_checkpoint(args.extend_vocab[0], args.extend_vocab[1], args.layout, seed=args.vocab_seed,
                                    overwrite=args.overwrite)
        except (VocabExtensionError, FileExistsError, OSError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(f"wrote {out} ({args.layout} layout)")
        return 0
    try:
        cfg = TrainConfig.load(args.config, args.overrides)
    except TrainConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.print_config:
        print(json.dumps(cfg.to_dict(), indent=1))
        return 0
    if args.export:
        return export(cfg, args.export, adapters_only=args.adapters_only, overwrite=args.overwrite)
    return train(cfg)


def export(cfg, out: str, *, adapters_only: bool = False, overwrite: bool = False) -> int:
    """``--export OUT``: the trained model of ``cfg.checkpoint.dir`` (newest checkpoint) → OUT."""
    from spiritlm_jax.converters.torch_io import CheckpointError
    from .peft import export_merged
    from .trainer import Trainer, TrainingError

    trainer = None
    try:
        trainer = Trainer(cfg.override("checkpoint.resume=true"), _LazyData(cfg))
        if not trainer.ckpt.all_steps():
            raise TrainingError(f"{cfg.checkpoint.dir} holds no checkpoint to export; train first (same config)")
        trainer.initialize()
        path = export_merged(trainer, out, adapters_only=adapters_only, overwrite=overwrite)
    except (TrainingError, CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if trainer is not None:
            trainer.close()
    print(f"wrote {path}")
    return 0


def train(cfg) -> int:
    import logging

    from spiritlm_jax import distributed

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").addFilter(drop_logged_tracebacks)
    ckdir = Path(cfg.checkpoint.dir)
    if cfg.distributed:
        distributed.initialize(cfg.distributed_timeout_s,
                               hint=f"Training resumes from the last complete checkpoint in {ckdir}")
    try:
        rc = _train(cfg, ckdir)
    except Exception:
        distributed.exit_if_a_peer_was_lost()
        raise
    if rc != 0:
        distributed.exit_if_a_peer_was_lost()
    distributed.finish()
    return rc


def _train(cfg, ckdir: Path) -> int:
    import jax

    from spiritlm_jax.converters.torch_io import CheckpointError
    from .checkpointing import CheckpointSaveError
    from .trainer import Trainer, TrainingDivergedError, TrainingError, write_loss_curve

    trainer = None
    try:
        trainer = Trainer(cfg, _LazyData(cfg))
        trainer.data.open(trainer.llama_cfg.vocab_size)
        trainer.eval_data = make_eval_data(cfg, trainer.llama_cfg.vocab_size)
        trainer.initialize()  # resume (or refuse a checkpoint of another config) BEFORE anything is written
        if jax.process_index() == 0:
            ckdir.mkdir(parents=True, exist_ok=True)
            (ckdir / "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        trainer.train()
    except TrainingDivergedError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except CheckpointSaveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 4
    except (TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. metrics.jsonl or train_config.json on a full disk
        print(f"error: {e.strerror or e} writing {e.filename or ckdir}; free space or pick another "
              f"checkpoint.dir, then rerun to resume from the last complete checkpoint", file=sys.stderr)
        return 4 if e.errno == errno.ENOSPC else 2
    finally:
        if trainer is not None:
            try:
                trainer.close()
            except CheckpointError as e:  # a save that failed while the run was ending
                print(f"error: {e}", file=sys.stderr)
                return 4  # noqa: B012 - the failed save decides the exit code
        if jax.process_index() == 0:
            try:
                png = write_loss_curve(ckdir / "metrics.jsonl", ckdir / "loss_curve.png")
            except OSError as e:
                png = None
                print(f"warning: loss curve not written ({e.strerror or e})", file=sys.stderr)
            if png:
                print(f"loss curve: {png}", file=sys.stderr)
    return 0


def drop_logged_tracebacks(record) -> bool:
    """orbax logs a failed asynchronous save from its background threads with full tracebacks; the
    checkpointer turns that same failure into one clear error (CheckpointSaveError), so drop the noise."""
    return not (record.levelname == "ERROR" and record.exc_info)


class _LazyData:
    """Opens the data iterator once the model's vocabulary size is known (synthetic data needs it)."""

    def __init__(self, cfg):
        self.cfg, self.it = cfg, None

    def open(self, vocab_size: int):
        self.it = make_data_iterator(self.cfg, vocab_size)

    def __next__(self):
        return next(self.it)

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        if self.it is not None:  # --export restores a checkpoint without reading data
            self.it.set_state(state)
