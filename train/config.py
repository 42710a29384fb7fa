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
import re
import types
import typing
from pathlib import Path
from typing import Any

from spiritlm_jax.config import ConfigError, LlamaConfig
from spiritlm_jax.distributed import TIMEOUT_RANGE_S


class TrainConfigError(ValueError):
    """A training config file or override is wrong (unknown key, bad value)."""


def _training_llama() -> LlamaConfig:
    """Spirit LM 7B's shape (Expressive vocabulary) with the training run-time defaults."""
    return LlamaConfig(vocab_size=32768, dtype="bfloat16", param_dtype="float32", remat="full", scan_layers=True)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Which model, how it is run. ``init`` picks the starting weights:

    * ``"random"``: a fresh model of the shape given by ``llama``;
    * a converted spiritlm-jax Llama directory (``spiritlm-jax convert llama``) — e.g. a Spirit LM
      checkpoint to fine-tune (its shape replaces ``llama``'s; ``llama``'s run-time fields stay);
    * an HF Llama directory (``config.json`` + weights), read directly.
    A Llama-2 checkpoint is first extended to Spirit LM's vocabulary with ``spiritlm-jax train
    --extend-vocab`` (train/vocab.py) and then used as ``init``.

    ``llama`` is the model's own :class:`~spiritlm_jax.config.LlamaConfig` (one owner of every shape and
    run-time field). Its fields are written FLAT in the ``model`` section of a file or an override
    (``model.hidden_size=64``, ``model.remat=dots``), next to ``init`` and ``vocab_layout``.
    """

    init: str = "random"
    # Vocabulary layout for per-modality metrics: "auto" (from the init dir's tokenizer, else from
    # vocab_size 32512 → base, 32768 → expressive), "base", "expressive", "none" (all tokens text),
    # or "speech=A:B" (ids A..B-1 are speech tokens; used by tiny test models).
    vocab_layout: str = "auto"
    llama: LlamaConfig = dataclasses.field(default_factory=_training_llama, metadata={"flatten": True})


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
    # Regex on parameter paths ("embed/embedding", "layers_31/mlp/up", "lm_head"): only matching
    # parameters are trained (the rest stay frozen, get no optimizer state and are not checkpointed).
    # "" trains everything. With LoRA the adapters are the trainable parameters instead.
    trainable: str = ""
    # Rows of the vocabulary-axis parameters (embed/embedding, lm_head) that train, when they train:
    # "" all, "speech" the speech-unit rows ([Hu]/[Pi]/[St] ids of model.vocab_layout: the rows a vocabulary
    # extension added), or id ranges "A:B,C:D". The other rows stay bit-identical (no update, no decay).
    trainable_rows: str = ""


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


RECIPES = ("pretrain", "sft", "dpo")
LORA_QUANTIZE = ("none", "int8", "int4", "nf4")


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """LoRA / QLoRA through qwix (train/lora.py). ``rank`` 0 = off (every trainable weight is tuned).

    ``modules``: a regex on module paths (``layers/attn``, ``layers_3/mlp``, …) whose weight matmuls get
    adapters; ``quantize``: the frozen base weights of those modules in ``int8``/``int4``/``nf4``
    (QLoRA) or ``none``; ``tile_size``: sub-channel quantization tile (0 = per-channel)."""

    rank: int = 0
    alpha: float = 16.0
    modules: str = ".*/(attn|mlp)"
    quantize: str = "none"
    tile_size: int = 0


@dataclasses.dataclass(frozen=True)
class DpoConfig:
    """Direct preference optimisation (recipe=dpo). ``loss``: ``sigmoid`` (Rafailov et al. 2023) or
    ``ipo`` (Azar et al. 2023); ``beta``: the KL-penalty strength (IPO: 1/(2·tau))."""

    beta: float = 0.1
    loss: str = "sigmoid"
    label_smoothing: float = 0.0


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Validation while training: every ``every`` steps (0 = never), the first ``batches`` batches of a
    held-out prepared dataset ``path`` (e.g. ``prepare --sft heldout.jsonl``; default ``data.path``,
    one pass) — loss and accuracy per modality (pretrain/SFT) or preference accuracy, reward margin and
    KL (DPO), logged as ``eval/*``. ``split``: which split of it ("" = the recipe's: sft / dpo)."""

    every: int = 0
    path: str = ""
    split: str = ""
    batches: int = 4
    # `spiritlm-jax eval` command lines without the model (train/validation.py), run on the current
    # parameters at every eval.every: eval.tasks='["pairs --data blimp.jsonl --limit 200"]'
    tasks: tuple[str, ...] = ()
    speech_tokenizer: str = ""  # the speech_tokenizer folder for speech tasks ("" = beside model.init)


@dataclasses.dataclass(frozen=True)
class LoggingConfig:
    """``wandb``: also log to Weights & Biases (``wandb_mode=offline`` needs no network; sync later with
    ``wandb sync``)."""

    wandb: bool = False
    wandb_project: str = "spiritlm-jax"
    wandb_mode: str = "offline"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)
    dpo: DpoConfig = dataclasses.field(default_factory=DpoConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)
    recipe: str = "pretrain"  # "pretrain" | "sft" (loss on responses) | "dpo" (preference pairs)
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
        return _to_dict(self)

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


def parse_row_ranges(spec: str) -> list[tuple[int, int]] | None:
    """``optim.trainable_rows``: None for "speech", else the ``A:B`` id ranges (half-open)."""
    if spec == "speech":
        return None
    ranges = []
    for part in spec.split(","):
        try:
            a, b = (int(x) for x in part.split(":"))
        except ValueError:
            raise TrainConfigError(f"optim.trainable_rows={spec!r}: expected 'speech' or id ranges 'A:B[,C:D]' "
                                   f"(e.g. 32000:32512)") from None
        if not 0 <= a < b:
            raise TrainConfigError(f"optim.trainable_rows={spec!r}: range {part!r} needs 0 <= A < B")
        ranges.append((a, b))
    return ranges


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
    if m.init == "random" and d.seq_len > m.llama.max_position_embeddings:
        raise TrainConfigError(f"data.seq_len={d.seq_len} is longer than the model's context "
                               f"(model.max_position_embeddings={m.llama.max_position_embeddings}); lower data.seq_len or "
                               f"raise model.max_position_embeddings")
    if c.steps < 1:
        raise TrainConfigError(f"steps must be >= 1, got {c.steps}")
    if o.warmup_steps < 0 or o.lr < 0 or o.clip_norm < 0 or o.z_loss < 0:
        raise TrainConfigError("optim.warmup_steps, lr, clip_norm and z_loss must be >= 0")
    if c.checkpoint.every < 1 or c.checkpoint.keep < 1:
        raise TrainConfigError("checkpoint.every and checkpoint.keep must be >= 1")
    low, high = TIMEOUT_RANGE_S
    if not low <= c.distributed_timeout_s <= high:
        raise TrainConfigError(f"distributed_timeout_s must be in [{low}, {high}] seconds, got {c.distributed_timeout_s}")
    if c.log_every < 1:
        raise TrainConfigError("log_every must be >= 1")
    if c.recipe not in RECIPES:
        raise TrainConfigError(f"recipe must be one of {', '.join(RECIPES)}, got {c.recipe!r}")
    lo = c.lora
    if lo.rank < 0 or lo.tile_size < 0:
        raise TrainConfigError(f"lora.rank and lora.tile_size must be >= 0, got {lo.rank}, {lo.tile_size}")
    if lo.quantize not in LORA_QUANTIZE:
        raise TrainConfigError(f"lora.quantize must be one of {', '.join(LORA_QUANTIZE)}, got {lo.quantize!r}")
    if lo.quantize != "none" and lo.rank == 0:
        raise TrainConfigError("lora.quantize (QLoRA) needs adapters: set lora.rank > 0")
    if lo.rank and o.trainable:
        raise TrainConfigError("optim.trainable (freezing by path) and lora.rank > 0 exclude each other: with LoRA "
                               "only the adapters are trained")
    if o.trainable_rows:
        if lo.rank:
            raise TrainConfigError("optim.trainable_rows freezes rows of a fully tuned embedding / LM head; with LoRA "
                                   "(lora.rank > 0) neither trains: drop one of the two")
        parse_row_ranges(o.trainable_rows)
    for name, pattern in (("lora.modules", lo.modules), ("optim.trainable", o.trainable)):
        try:
            re.compile(pattern)
        except re.error as e:
            raise TrainConfigError(f"{name}={pattern!r} is not a valid regular expression ({e})") from None
    if c.dpo.loss not in ("sigmoid", "ipo"):
        raise TrainConfigError(f"dpo.loss must be 'sigmoid' or 'ipo', got {c.dpo.loss!r}")
    if not c.dpo.beta > 0 or not 0 <= c.dpo.label_smoothing < 0.5:
        raise TrainConfigError(f"dpo.beta must be > 0 and dpo.label_smoothing in [0, 0.5), got {c.dpo.beta}, "
                               f"{c.dpo.label_smoothing}")
    if c.eval.every < 0 or c.eval.batches < 1:
        raise TrainConfigError(f"eval.every must be >= 0 and eval.batches >= 1, got {c.eval.every}, {c.eval.batches}")


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
    d = _nest_flattened(cls, d, fields, where)
    unknown = set(d) - set(fields)
    if unknown:
        valid = set(fields)
        for name in _flattened_fields(cls):
            valid = (valid - {name}) | {g.name for g in dataclasses.fields(hints[name])}
        raise TrainConfigError(f"unknown key(s) {sorted(where + k for k in unknown)}; "
                               f"valid keys{' of ' + where[:-1] if where else ''}: {sorted(valid)}")
    kw = {}
    for name, value in d.items():
        t = hints[name]
        if dataclasses.is_dataclass(value):  # a flattened sub-config, already built
            kw[name] = value
        elif dataclasses.is_dataclass(t):
            kw[name] = _build(t, value, f"{where}{name}.")
        else:
            kw[name] = _coerce(value, t, where + name)
    try:
        return cls(**kw)
    except TrainConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise TrainConfigError(f"{where or 'config'}: {e}") from e


def _flattened_fields(cls) -> dict[str, dataclasses.Field]:
    """The dataclass fields of ``cls`` whose own fields are written flat in ``cls``'s section."""
    return {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("flatten")}


def _nest_flattened(cls, d: dict, fields: dict, where: str) -> dict:
    """Move the keys that belong to a flattened sub-config (``model.hidden_size`` → ``model.llama``)."""
    flat = _flattened_fields(cls)
    if not flat:
        return d
    d = dict(d)
    for name, f in flat.items():
        sub_type = typing.get_type_hints(cls)[name]
        sub_fields = {g.name for g in dataclasses.fields(sub_type)}
        if isinstance(d.get(name), dict):
            raise TrainConfigError(f"write the {name} fields flat in this section (e.g. {sorted(sub_fields)[0]}=...), "
                                   f"not as a nested {name!r} section")
        picked = {k: d.pop(k) for k in list(d) if k in sub_fields and k not in fields}
        base = dataclasses.asdict(f.default_factory()) if f.default_factory is not dataclasses.MISSING else {}
        kw = {}
        hints = typing.get_type_hints(sub_type)
        for k, v in picked.items():
            kw[k] = _coerce(v, hints[k], where + k)
        try:
            d[name] = sub_type(**{**base, **kw})
        except (TypeError, ValueError) as e:
            raise TrainConfigError(f"{where[:-1] or 'config'}: {e}") from e
    return d


def _to_dict(obj) -> dict:
    """Like ``dataclasses.asdict`` but writes flattened sub-configs flat (the file form)."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if f.metadata.get("flatten"):
            out.update(dataclasses.asdict(v))
        elif dataclasses.is_dataclass(v):
            out[f.name] = _to_dict(v)
        else:
            out[f.name] = v
    return out


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
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:  # tuple[X, ...]: a JSON list
            items = json.loads(value) if isinstance(value, str) else value
            if not isinstance(items, (list, tuple)):
                raise ValueError(value)
            return tuple(_coerce(x, args[0], f"{key}[{i}]") for i, x in enumerate(items))
    except ValueError:
        raise TrainConfigError(f"{key}: cannot read {value!r} as {getattr(t, '__name__', t)}"
                               + (" (a JSON list, e.g. '[\"a\", \"b\"]')" if origin is tuple else "")) from None
    raise TrainConfigError(f"{key}: unsupported field type {t}")
