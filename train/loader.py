"""Training batches from a prepared corpus, with grain: deterministic, host-sharded, checkpointable.

BATCH CONTRACT (what the trainer consumes). The iterator yields dicts of numpy arrays, B = batch size
per host, T = sequence length:

* ``tokens``      int32   (B, T)  token ids; 0 on padding
* ``positions``   int32   (B, T)  position inside its document piece, restarting at 0 for every
                                  packed document (use for RoPE); 0 on padding
* ``segment_ids`` int32   (B, T)  1, 2, 3, … per packed document within a row, 0 = padding; attend
                                  only where query and key segment ids are equal (and non-zero)
* ``targets``     int32   (B, T)  the next token WITHIN the same document; 0 where there is none
* ``loss_mask``   float32 (B, T)  1 where ``targets`` is a real next token; 0 on padding and on the
                                  last token of every document (its next token belongs to another one)

The iterator has ``get_state()`` / ``set_state(state)`` (grain ``DatasetIterator``): the state is a
small JSON-able dict; restoring it reproduces exactly the batches an uninterrupted run would see.

Pipeline, per host: for each split of the prepared dataset (``text``, ``speech``, ``aligned``) a
random-access ArrayRecord source (``tfds.data_source``) → this host's shard of record indices
(``source[shard_index::shard_count]``: each host reads only its own records; the shards are disjoint
and together cover the data) → shuffle (per-epoch reseeded) → repeat → mix the splits with
``weights`` → build one sequence per document with a per-element rng (``random_map``: text-only,
speech-only or word-interleaved, :mod:`spiritlm_jax.train.sequences`) → cut documents longer than T →
first-fit packing into rows of T → batches of B. Every random choice is a pure function of
``(seed, shard, element index)``, so the order does not depend on timing, threads or workers.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from spiritlm_jax.train.sequences import SequenceBuilder, SequenceConfig, SequenceError, pack_and_batch

__all__ = ["LoaderError", "LoaderConfig", "open_sources", "make_dataset", "make_iterator", "BATCH_KEYS"]

BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")
CORPUS_SPLITS = ("text", "speech", "aligned")  # the sft / dpo splits are read by train/sft.py


class LoaderError(ValueError):
    """A loader configuration that cannot work (missing dataset, empty shard, bad weights, ...)."""


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """``data_dir``: the prepared dataset's version folder (``.../spiritlm_corpus/<name>/1.0.0``);
    ``tokenizer``: the LM folder holding ``tokenizer.model`` (or the file itself).

    ``weights``: sampling weight of each split (default: every present split, weight 1);
    ``num_epochs``: None repeats forever; ``shard_index``/``shard_count`` default to
    ``jax.process_index()``/``jax.process_count()``.
    """

    data_dir: str
    tokenizer: str
    seq_len: int = 4096
    batch_size: int = 8
    seed: int = 0
    num_epochs: int | None = None
    weights: Mapping[str, float] | None = None
    sequence: SequenceConfig = SequenceConfig()
    shard_index: int | None = None
    shard_count: int | None = None
    num_packing_bins: int | None = None
    max_fan_out: int = 64
    worker_count: int = 0  # >0: grain worker processes (mp_prefetch); the order stays the same


def _shard(cfg: LoaderConfig) -> tuple[int, int]:
    if cfg.shard_index is None or cfg.shard_count is None:
        import jax

        idx = jax.process_index() if cfg.shard_index is None else cfg.shard_index
        cnt = jax.process_count() if cfg.shard_count is None else cfg.shard_count
    else:
        idx, cnt = cfg.shard_index, cfg.shard_count
    if not (cnt >= 1 and 0 <= idx < cnt):
        raise LoaderError(f"shard_index must be in [0, shard_count), got {idx} of {cnt}")
    return int(idx), int(cnt)


def open_sources(data_dir: str | os.PathLike) -> tuple[dict[str, Any], dict]:
    """The prepared dataset's splits as random-access sources, and its metadata."""
    import tensorflow_datasets as tfds

    d = Path(data_dir)
    if not (d / "dataset_info.json").is_file():
        hint = ""
        cands = sorted(d.glob("*/*/dataset_info.json")) + sorted(d.glob("*/*/*/dataset_info.json"))
        if cands:
            hint = f"; did you mean {cands[0].parent}?"
        raise LoaderError(f"{d} is not a prepared dataset version folder (no dataset_info.json){hint} — "
                          f"run `spiritlm-jax prepare` first")
    builder = tfds.builder_from_directory(str(d))
    meta = {}
    if (d / "metadata.json").is_file():
        meta = json.loads((d / "metadata.json").read_text())
    return dict(builder.as_data_source()), meta


def _tokenizer(path: str):
    from spiritlm_jax.text import TextTokenizer

    p = Path(path)
    return TextTokenizer(p) if p.is_file() else TextTokenizer.from_dir(p)


class _LazyBuilder(grain.transforms.RandomMap):
    """A picklable random-map transform (grain workers get the tokenizer path, not the object)."""

    def __init__(self, tokenizer_path: str, config: SequenceConfig, tokenizer=None):
        self.path, self.config = tokenizer_path, config
        self._b = SequenceBuilder(tokenizer, config) if tokenizer is not None else None

    def __getstate__(self):
        return {"path": self.path, "config": self.config, "_b": None}

    def random_map(self, element, rng):
        if self._b is None:
            self._b = SequenceBuilder(_tokenizer(self.path), self.config)
        return self._b.random_map(element, rng)


def make_dataset(cfg: LoaderConfig, *, tokenizer=None, sources: Mapping[str, Any] | None = None):
    """The grain ``IterDataset`` of batches for this host (see the module docstring)."""
    import grain

    idx, cnt = _shard(cfg)
    meta = {}
    if sources is None:
        sources, meta = open_sources(cfg.data_dir)
    if cfg.sequence.expressive and meta and not meta.get("expressive", False):
        raise LoaderError(f"{cfg.data_dir} was prepared without pitch/style units; expressive sequences need "
                          f"`spiritlm-jax prepare --expressive`")
    weights = dict(cfg.weights) if cfg.weights is not None else {
        s: 1.0 for s in sources if len(sources[s]) and s in CORPUS_SPLITS}
    unknown = set(weights) - set(sources)
    if unknown:
        raise LoaderError(f"weights name splits {sorted(unknown)} that {cfg.data_dir} does not have "
                          f"(it has {sorted(sources)})")
    weights = {k: float(v) for k, v in weights.items() if float(v) > 0}
    if not weights:
        raise LoaderError("no split has a positive weight")
    names = sorted(weights)
    parts = []
    for i, name in enumerate(names):
        ds = grain.MapDataset.source(sources[name])[idx::cnt]
        if len(ds) == 0:
            raise LoaderError(f"split {name!r} has {len(sources[name])} records: too few for {cnt} hosts "
                              f"(host {idx} would get none)")
        ds = ds.shuffle(seed=(cfg.seed * 7919 + i) % 2**32).repeat(cfg.num_epochs)
        parts.append(ds)
    ds = parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, [weights[n] for n in names])
    tok = tokenizer if tokenizer is not None else _tokenizer(cfg.tokenizer)
    ds = ds.random_map(_LazyBuilder(str(cfg.tokenizer), cfg.sequence, tok),
                       seed=(cfg.seed * 1_000_003 + idx) % 2**32)
    it = ds.to_iter_dataset()
    if cfg.worker_count > 0:
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return pack_and_batch(it, cfg.seq_len, cfg.batch_size, num_packing_bins=cfg.num_packing_bins,
                          seed=cfg.seed, max_fan_out=cfg.max_fan_out)


def make_iterator(cfg: LoaderConfig, **kw):
    """``iter(make_dataset(cfg))``: a grain ``DatasetIterator`` with ``get_state``/``set_state``."""
    return iter(make_dataset(cfg, **kw))
