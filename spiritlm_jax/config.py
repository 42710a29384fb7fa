"""Frozen dataclass configs. Each knows how to read the original's config file, so a checkpoint
directory alone is enough to build and load a model.

Speech-model configs live next to their converters (they are read from fairseq / HF / yaml configs);
this module holds the language-model config, which everything else builds on.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp

from spiritlm_jax.models.attention import BACKENDS as ATTENTION_BACKENDS
from spiritlm_jax.models.layers import DEFAULT_PRECISION, PRECISIONS
from spiritlm_jax.models.quantization import QUANTIZE_MODES


class ConfigError(ValueError):
    """A config file holds a value we do not support (or a wrong one)."""


_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def dtype_of(name: str):
    try:
        return _DTYPES[name]
    except KeyError:
        raise ConfigError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}") from None


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Everything that changes the Llama math, plus how we run it.

    Architecture fields mirror HF ``LlamaConfig``. Run-time fields (not from the checkpoint):
      dtype        compute dtype of activations ("float32" for parity, "bfloat16" for serving/training)
      param_dtype  dtype parameters are kept in (fp32 master weights for training)
      scan_layers  stack the layers under ``nn.scan`` (params get a leading ``layers`` axis; compile
                   time independent of depth) or unroll them (``layers_0`` … ``layers_{L-1}``)
      remat        activation-checkpointing policy for training: "none", "full", "dots" (save matmuls)
      precision    matmul precision of every contraction, applied inside the model whatever the
                   process's jax_default_matmul_precision: "float32" (default: true fp32, what gives
                   the original's greedy ids), "tensorfloat32" or "bfloat16" (faster passes on GPU/TPU)
      attention    attention backend (models/attention.py): "auto" (splash on TPU, cudnn on GPU, xla
                   elsewhere), "xla" (einsum, materialised scores), "chunked" (blockwise online
                   softmax, any backend), "cudnn" (jax.nn.dot_product_attention), "splash" (TPU kernel)
      attention_block  query/key block of "chunked" and "splash" (splash: a multiple of 128)
      quantize     None, or "int8" / "int4": qwix weight-only post-training quantization
                   (models/quantization.py; params must come from quantize_params)
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # run-time
    dtype: str = "float32"
    param_dtype: str = "float32"
    scan_layers: bool = True
    remat: str = "none"
    precision: str = DEFAULT_PRECISION
    attention: str = "auto"
    attention_block: int = 512
    quantize: str | None = None

    def __post_init__(self):
        if self.hidden_size <= 0 or self.num_hidden_layers <= 0 or self.vocab_size <= 0:
            raise ConfigError("hidden_size, num_hidden_layers and vocab_size must be positive")
        if self.num_attention_heads <= 0 or self.num_key_value_heads <= 0:
            raise ConfigError("num_attention_heads and num_key_value_heads must be positive")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size ({self.hidden_size}) is not divisible by num_attention_heads "
                f"({self.num_attention_heads}) and no head_dim is given"
            )
        if self.head_dim_ % 2:
            raise ConfigError(f"head_dim ({self.head_dim_}) must be even for rotary embeddings")
        dtype_of(self.dtype)
        dtype_of(self.param_dtype)
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {list(PRECISIONS)}, got {self.precision!r}")
        if self.attention not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention must be one of {list(ATTENTION_BACKENDS)}, got {self.attention!r}")
        if self.attention_block < 1:
            raise ConfigError(f"attention_block must be a positive number of tokens, got {self.attention_block}")
        if self.quantize is not None and self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"quantize must be None or one of {list(QUANTIZE_MODES)}, got {self.quantize!r}")
        if self.remat not in ("none", "full", "dots"):
            raise ConfigError(f"remat must be 'none', 'full' or 'dots', got {self.remat!r}")

    @property
    def head_dim_(self) -> int:
        """The per-head width actually used (``head_dim`` if given, else hidden / heads)."""
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def replace(self, **kw) -> "LlamaConfig":
        return dataclasses.replace(self, **kw)

    def num_params(self) -> int:
        e, i, v, L = self.hidden_size, self.intermediate_size, self.vocab_size, self.num_hidden_layers
        d, h, k = self.head_dim_, self.num_attention_heads, self.num_key_value_heads
        per_layer = e * h * d * 2 + e * k * d * 2 + 3 * e * i + 2 * e
        return v * e * (1 if self.tie_word_embeddings else 2) + L * per_layer + e

    # ---------------------------------------------------------------- HF config.json
    # Fields of HF LlamaConfig that do not change the forward math (or only training-time dropout).
    _IGNORED_HF = {
        "architectures", "model_type", "initializer_range", "use_cache", "torch_dtype", "dtype",
        "transformers_version", "pad_token_id", "pretraining_tp", "_name_or_path", "attention_dropout",
        "output_attentions", "output_hidden_states", "return_dict", "_from_model_config",
        "decoder_start_token_id", "id2label", "label2id",
    }

    @classmethod
    def from_hf(cls, config: str | os.PathLike | dict[str, Any], **runtime) -> "LlamaConfig":
        """Read an HF Llama ``config.json`` (a path, a directory holding it, or the parsed dict).

        Every field that changes the math is read; an unsupported value is an error naming the field.
        ``runtime`` sets our run-time fields (dtype, param_dtype, scan_layers, remat).
        """
        if not isinstance(config, dict):
            p = Path(config)
            if p.is_dir():
                p = p / "config.json"
            if not p.exists():
                raise ConfigError(f"no config.json at {p}")
            try:
                config = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p}: not valid JSON ({e})") from e
        c = dict(config)
        mt = c.get("model_type", "llama")
        if mt != "llama":
            raise ConfigError(f"model_type is {mt!r}; only 'llama' checkpoints are supported")
        act = c.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"hidden_act={act!r} is not supported (Llama uses 'silu')")
        for f in ("attention_bias", "mlp_bias"):
            if c.get(f):
                raise ConfigError(f"{f}=true is not supported: Spirit LM / Llama-2 have no biases")
        # RoPE: transformers 4.x writes rope_theta + rope_scaling, 5.x may write rope_parameters.
        theta = c.get("rope_theta")
        scaling = c.get("rope_scaling")
        params = c.get("rope_parameters")
        if isinstance(params, dict):
            theta = params.get("rope_theta", theta)
            rtype = params.get("rope_type", params.get("type", "default"))
            if rtype not in (None, "default"):
                raise ConfigError(f"rope_parameters.rope_type={rtype!r} is not supported (only default RoPE)")
        if scaling not in (None, {}):
            rtype = scaling.get("rope_type", scaling.get("type")) if isinstance(scaling, dict) else scaling
            if rtype not in (None, "default"):
                raise ConfigError(
                    f"rope_scaling={scaling!r} is not supported: only plain RoPE (rope_scaling null) is "
                    f"implemented, as in Llama-2 / Spirit LM"
                )
        heads = int(c.get("num_attention_heads", 32))
        eos = c.get("eos_token_id", 2)
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        return cls(
            vocab_size=int(c["vocab_size"]),
            hidden_size=int(c["hidden_size"]),
            intermediate_size=int(c["intermediate_size"]),
            num_hidden_layers=int(c["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(c.get("num_key_value_heads") or heads),
            head_dim=(int(c["head_dim"]) if c.get("head_dim") else None),
            rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
            rope_theta=float(theta if theta is not None else 10000.0),
            max_position_embeddings=int(c.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            bos_token_id=c.get("bos_token_id", 1),
            eos_token_id=eos,
            **runtime,
        )

    def to_hf(self, torch_dtype: str = "float32") -> dict[str, Any]:
        """The HF ``config.json`` of this model (the inverse of :meth:`from_hf`; run-time fields dropped)."""
        out = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta, "rope_scaling": None, "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id, "attention_bias": False, "mlp_bias": False,
            "initializer_range": 0.02, "pretraining_tp": 1, "use_cache": True, "torch_dtype": torch_dtype,
        }
        if self.head_dim is not None:
            out["head_dim"] = self.head_dim
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], **override) -> "LlamaConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ConfigError(f"unknown LlamaConfig fields {sorted(unknown)}")
        return cls(**{**d, **override})
