"""The training configuration: one frozen dataclass tree, read from a JSON/TOML/YAML file and
overridden from the command line with dotted ``key=value`` pairs.

    spiritlm-jax train --config run.json optim.lr=3e-5 mesh.fsdp=8 steps=2000 model.remat=dots

Every field is typed; an override is parsed to the field's type (``true``/``false`` for bools,
``none``/``null`` for optional fields, JSON for lists) and an unknown key is an error that lists the
valid keys of that section.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from pathlib import Path
from typing import Any


class TrainConfigError(ValueError):
    """A training config file or override is wrong (unknown key, bad value)."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model, how it is run. ``init`` picks the starting weights:

    * ``"random"``: a fresh model of the shape given by the fields below (``vocab_size`` …);
    * a converted spiritlm-jax Llama directory (``spiritlm-jax convert llama``) — e.g. a Spirit LM
      checkpoint to fine-tune (its shape fields override the ones below);
    * an HF Llama directory (``config.json`` + weights), read directly.
    A Llama-2 checkpoint is first extended to Spirit LM's vocabulary with ``spiritlm-jax train
    --extend-vocab`` (train/vocab.py) and then used as ``init``.
    """

    init: str = "random"
    vocab_size: int = 32768
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    max_position_embeddings: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    dtype: str = "bfloat16"  # compute dtype
    param_dtype: str = "float32"  # master weights (and optimizer state) dtype
    remat: str = "full"  # "none" | "full" | "dots"
    scan_layers: bool = True
    # Vocabulary layout for per-modality metrics: "auto" (from the init dir's tokenizer, else from
    # vocab_size 32512 → base, 32768 → expressive), "base", "expressive", "none" (all tokens text),
    # or "speech=A:B" (ids A..B-1 are speech tokens; used by tiny test models).
    vocab_layout: str = "auto"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4
    schedule: str = "cosine"  # "cosine" | "constant" (both after a linear warmup)
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping; 0 disables
    grad_accum: int = 1  # micro-batches per step (the global batch is split, never enlarged)
    z_loss: float = 0.0  # coefficient of log(Z)^2 (PaLM uses 1e-4); 0 disables


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """``path``: a prepared dataset directory (``spiritlm-jax prepare``); ``"synthetic"`` gives a
    deterministic random-token stream (smoke tests, benchmarks)."""

    path: str = "synthetic"
    tokenizer: str = ""  # LM folder with tokenizer.model for a prepared dataset; "" = model.init
    expressive: bool = False  # build expressive sequences ([Pi]/[St] units) from the prepared corpus
    batch_size: int = 8  # GLOBAL batch (sequences per optimizer step, all hosts together)
    seq_len: int = 2048
    seed: int = 0
    split: str = "train"


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """(data, fsdp, tensor) sizes; one may be -1 (filled from the device count)."""

    data: int = 1
    fsdp: int = -1
    tensor: int = 1


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    dir: str = "checkpoints"
    every: int = 500  # steps between saves (the last step is always saved)
    keep: int = 3  # newest N kept
    async_save: bool = True
    resume: bool = True  # continue from the newest complete checkpoint in ``dir`` if there is one


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    steps: int = 1000
    seed: int = 0  # parameter init (model.init == "random")
    log_every: int = 10
    tensorboard: bool = True  # event files under <checkpoint.dir>/tensorboard
    progress: bool = True  # console progress bar
    peak_tflops_per_device: float = 0.0  # for MFU; 0 = guess from the device kind
    distributed: bool = False  # call jax.distributed.initialize() first (multi-host)
    # multi-host: a peer silent this long is lost and every other process stops (exit 5); see distributed.py
    distributed_timeout_s: float = 60.0

    def __post_init__(self):
        _validate(self)

    # ------------------------------------------------------------------ io
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _build(cls, d, "")

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        d = read_config_file(path) if path else {}
        for ov in overrides:
            apply_override(d, ov)
        return cls.from_dict(d)

    def replace(self, **kw) -> "TrainConfig":
        return dataclasses.replace(self, **kw)

    def override(self, *overrides: str) -> "TrainConfig":
        d = self.to_dict()
        for ov in overrides:
            apply_override(d, ov)
        return TrainConfig.from_dict(d)


def _validate(c: TrainConfig) -> None:
    m, o, d = c.model, c.optim, c.data
    if o.schedule not in ("cosine", "constant"):
        raise TrainConfigError(f"optim.schedule must be 'cosine' or 'constant', got {o.schedule!r}")
    if o.grad_accum < 1:
        raise TrainConfigError(f"optim.grad_accum must be >= 1, got {o.grad_accum}")
    if d.batch_size < 1:
        raise TrainConfigError(f"data.batch_size must be >= 1 (sequences per step, all hosts together), got {d.batch_size}")
    if d.batch_size % o.grad_accum:
        raise TrainConfigError(f"data.batch_size ({d.batch_size}) must be divisible by optim.grad_accum "
                               f"({o.grad_accum}): the global batch is split into equal micro-batches")
    if d.seq_len < 2:
        raise TrainConfigError(f"data.seq_len must be >= 2, got {d.seq_len}")
    if m.init == "random" and d.seq_len > m.max_position_embeddings:
        raise TrainConfigError(f"data.seq_len={d.seq_len} is longer than the model's context "
                               f"(model.max_position_embeddings={m.max_position_embeddings}); lower data.seq_len or "
                               f"raise model.max_position_embeddings")
    if c.steps < 1:
        raise TrainConfigError(f"steps must be >= 1, got {c.steps}")
    if m.remat not in ("none", "full", "dots"):
        raise TrainConfigError(f"model.remat must be 'none', 'full' or 'dots', got {m.remat!r}")
    if o.warmup_steps < 0 or o.lr < 0 or o.clip_norm < 0 or o.z_loss < 0:
        raise TrainConfigError("optim.warmup_steps, lr, clip_norm and z_loss must be >= 0")
    if c.checkpoint.every < 1 or c.checkpoint.keep < 1:
        raise TrainConfigError("checkpoint.every and checkpoint.keep must be >= 1")
    if not 1 <= c.distributed_timeout_s <= 3600:
        raise TrainConfigError(f"distributed_timeout_s must be in [1, 3600] seconds, got {c.distributed_timeout_s}")
    if c.log_every < 1:
        raise TrainConfigError("log_every must be >= 1")


# ---------------------------------------------------------------------- files and overrides

def read_config_file(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.is_file():
        raise TrainConfigError(f"config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix == ".json":
            return json.loads(text)
        if p.suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if p.suffix in (".yaml", ".yml"):
            import yaml

            return yaml.safe_load(text) or {}
    except Exception as e:
        raise TrainConfigError(f"{p}: cannot parse ({type(e).__name__}: {e})") from e
    raise TrainConfigError(f"{p}: unknown config format {p.suffix!r}; use .json, .toml or .yaml")


def apply_override(d: dict, override: str) -> None:
    """``"optim.lr=1e-4"`` → d["optim"]["lr"] = "1e-4" (typed later, when the dataclass is built)."""
    if "=" not in override:
        raise TrainConfigError(f"override {override!r} is not key=value (e.g. optim.lr=1e-4)")
    key, value = override.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise TrainConfigError(f"override {override!r}: empty key part")
    node = d
    for k in parts[:-1]:
        nxt = node.setdefault(k, {})
        if not isinstance(nxt, dict):
            raise TrainConfigError(f"override {override!r}: {k!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = _RawOverride(value.strip())


class _RawOverride(str):
    """A string from the command line, to be parsed to the field's type."""


def _build(cls, d: Any, where: str):
    if not isinstance(d, dict):
        raise TrainConfigError(f"{where or 'config'}: expected a section (mapping), got {d!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise TrainConfigError(f"unknown key(s) {sorted(where + k for k in unknown)}; "
                               f"valid keys{' of ' + where[:-1] if where else ''}: {sorted(fields)}")
    kw = {}
    for name, value in d.items():
        t = hints[name]
        if dataclasses.is_dataclass(t):
            kw[name] = _build(t, value, f"{where}{name}.")
        else:
            kw[name] = _coerce(value, t, where + name)
    try:
        return cls(**kw)
    except TrainConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise TrainConfigError(f"{where or 'config'}: {e}") from e


def _coerce(value, t, key: str):
    origin = typing.get_origin(t)
    args = typing.get_args(t)
    optional = (origin in (typing.Union, types.UnionType)) and type(None) in args
    if optional:
        if value is None or (isinstance(value, _RawOverride) and value.lower() in ("none", "null")):
            return None
        t = next(a for a in args if a is not type(None))
    raw = isinstance(value, _RawOverride)
    try:
        if t is bool:
            if raw:
                if value.lower() in ("true", "1", "yes", "on"):
                    return True
                if value.lower() in ("false", "0", "no", "off"):
                    return False
                raise ValueError(value)
            if not isinstance(value, bool):
                raise ValueError(value)
            return value
        if t is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if raw or isinstance(value, str):
                return int(value)
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if t is float:
            if isinstance(value, bool):
                raise ValueError(value)
            return float(value)
        if t is str:
            return str(value)
    except ValueError:
        raise TrainConfigError(f"{key}: cannot read {value!r} as {t.__name__}") from None
    raise TrainConfigError(f"{key}: unsupported field type {t}")
