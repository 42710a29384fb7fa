"""HuBERT / wav2vec2 speech encoder (one architecture, two checkpoint dialects).

The same network serves the HuBERT-25Hz phonetic tokenizer (fairseq checkpoint, output of transformer
layer 11, no final LayerNorm; REFERENCE.md §4) and the wav2vec2 style encoder (HF checkpoint, all
layers; §6.2):

  waveform (B, N) ─ [optional per-item waveform layer norm]
    → conv stack: for each (dim, k, s): Conv1d(no padding) → [GroupNorm(dim groups) on layer 0 in
      "default"/"group" mode | LayerNorm(channels) on every layer in "layer_norm" mode] → GELU
    → LayerNorm(C) → Linear C→D (when present)
    → + GELU(weight-normed grouped Conv1d(k=conv_pos, pad conv_pos//2, last frame dropped when even))
    → encoder LayerNorm ("before" the layers for post-norm models)
    → transformer layers (post-norm, or pre-norm when ``layer_norm_first``), the first
      ``output_layer`` of them
    → [encoder LayerNorm "after" for HF stable-layer-norm models]

Batching: rows of different lengths are right-padded and described by ``lengths`` (valid samples
per row). Every step that mixes time steps is masked so that each row's valid frames equal the
unbatched call's: GroupNorm statistics and the waveform norm use valid steps only, padded frames are
zeroed before the positional conv (whose zero padding the unbatched call sees) and are masked out as
attention keys. Conv layers need no masking: valid output frames only read valid input samples.

All shapes are read from :class:`SpeechEncoderConfig`, which the converters build from the
checkpoint's own config (``from_fairseq`` / ``from_hf_wav2vec2``): nothing is hard-coded.
"""
from __future__ import annotations

import ast
import dataclasses
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spiritlm_jax.models.layers import DEFAULT_PRECISION, check_precision, conv1d, with_precision

Array = jax.Array


class EncoderConfigError(ValueError):
    """The checkpoint's config asks for a variant this port does not implement, or is inconsistent."""


# ------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------

def parse_conv_layers(spec: str | Sequence) -> tuple[tuple[int, int, int], ...]:
    """fairseq's ``conv_feature_layers`` string (a Python list expression such as
    ``"[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 3"``) → tuple of (dim, kernel, stride).

    Evaluated with a tiny AST walker that only admits list/tuple literals of integers, ``+`` and
    ``*`` — never ``eval``.
    """
    if not isinstance(spec, str):
        layers = [tuple(int(v) for v in t) for t in spec]
    else:
        try:
            tree = ast.parse(spec, mode="eval")
        except SyntaxError as e:
            raise EncoderConfigError(f"conv_feature_layers {spec!r} is not a valid list expression ({e})") from e

        def ev(node):
            if isinstance(node, ast.Expression):
                return ev(node.body)
            if isinstance(node, (ast.List, ast.Tuple)):
                vals = [ev(e) for e in node.elts]
                return vals if isinstance(node, ast.List) else tuple(vals)
            if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
                return node.value
            if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
                a, b = ev(node.left), ev(node.right)
                return a + b if isinstance(node.op, ast.Add) else a * b
            raise EncoderConfigError(
                f"conv_feature_layers {spec!r}: only lists/tuples of integers with + and * are allowed"
            )

        layers = ev(tree)
        if not isinstance(layers, list):
            raise EncoderConfigError(f"conv_feature_layers {spec!r} does not evaluate to a list")
    out = []
    for t in layers:
        if not (isinstance(t, tuple) and len(t) == 3 and all(isinstance(v, int) and v > 0 for v in t)):
            raise EncoderConfigError(f"conv_feature_layers entry {t!r} is not a (dim, kernel, stride) of positive ints")
        out.append(t)
    if not out:
        raise EncoderConfigError("conv_feature_layers is empty")
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class SpeechEncoderConfig:
    conv_layers: tuple[tuple[int, int, int], ...]
    conv_bias: bool = False
    extractor_mode: str = "default"  # "default": GroupNorm on conv 0 only | "layer_norm": LN on every conv
    embed_dim: int = 768
    ffn_dim: int = 3072
    num_heads: int = 12
    num_layers: int = 12  # layers stored in the checkpoint
    output_layer: int | None = None  # 1-based: run this many layers (None: all)
    conv_pos: int = 128
    conv_pos_groups: int = 16
    layer_norm_first: bool = False  # pre-norm blocks
    encoder_ln: str = "before"  # "before" the layers | "after" the last run layer | "none"
    has_projection: bool = True  # Linear conv_dim → embed_dim (fairseq omits it when equal)
    normalize_waveform: bool = False  # per-item layer norm of the waveform (fairseq task normalize)
    activation: str = "gelu"
    layer_norm_eps: float = 1e-5  # transformer / encoder / feature-projection LayerNorms
    conv_norm_eps: float = 1e-5  # GroupNorm / conv LayerNorm
    waveform_norm_eps: float = 1e-5
    # run-time, not from the checkpoint: matmul/conv precision (models/layers.py); the default
    # reproduces the original's units (HuBERT) and style units (wav2vec2) on every backend
    precision: str = DEFAULT_PRECISION

    def __post_init__(self):
        check_precision(self.precision, "SpeechEncoderConfig")
        if self.extractor_mode not in ("default", "layer_norm"):
            raise EncoderConfigError(f"extractor_mode {self.extractor_mode!r} is not supported (default | layer_norm)")
        if self.encoder_ln not in ("before", "after", "none"):
            raise EncoderConfigError(f"encoder_ln {self.encoder_ln!r} must be before | after | none")
        if self.embed_dim % self.num_heads:
            raise EncoderConfigError(f"embed_dim {self.embed_dim} is not divisible by {self.num_heads} heads")
        if self.embed_dim % self.conv_pos_groups:
            raise EncoderConfigError(f"embed_dim {self.embed_dim} is not divisible by conv_pos_groups {self.conv_pos_groups}")
        if self.activation not in _ACTIVATIONS:
            raise EncoderConfigError(f"activation {self.activation!r} is not supported ({sorted(_ACTIVATIONS)})")
        if self.output_layer is not None and not (1 <= self.output_layer <= self.num_layers):
            raise EncoderConfigError(
                f"output layer {self.output_layer} is outside 1..{self.num_layers} (the checkpoint has {self.num_layers} layers)"
            )
        if not self.has_projection and self.conv_layers[-1][0] != self.embed_dim:
            raise EncoderConfigError("without a projection the conv width must equal embed_dim")

    @property
    def conv_dim(self) -> int:
        return self.conv_layers[-1][0]

    @property
    def layers_run(self) -> int:
        return self.num_layers if self.output_layer is None else self.output_layer

    @property
    def hop(self) -> int:
        h = 1
        for _, _, s in self.conv_layers:
            h *= s
        return h

    @property
    def receptive_field(self) -> int:
        """Fewest samples that give one frame."""
        r = 1
        for _, k, s in reversed(self.conv_layers):
            r = (r - 1) * s + k
        return r

    def num_frames(self, n_samples):
        """Frames for ``n_samples`` (int or integer array): floor((L − k)/s) + 1 per layer, ≥ 0."""
        if isinstance(n_samples, (int, np.integer)):
            L = int(n_samples)
            for _, k, s in self.conv_layers:
                L = (L - k) // s + 1 if L >= k else 0
            return L
        L = n_samples
        xp = jnp if isinstance(L, jax.Array) else np
        for _, k, s in self.conv_layers:
            L = xp.where(L >= k, (L - k) // s + 1, 0)
        return L

    def replace(self, **kw) -> "SpeechEncoderConfig":
        return dataclasses.replace(self, **kw)

    # -- the two checkpoint dialects ------------------------------------------------------------

    @classmethod
    def from_fairseq(cls, model_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any] | None = None,
                     output_layer: int | None = None, has_projection: bool | None = None) -> "SpeechEncoderConfig":
        """A fairseq ``HubertConfig`` dict (+ ``HubertPretrainingConfig``) → config. Missing fields take
        fairseq's defaults (as the original's dataclass merge does); variants the reference could run
        but this port does not implement are refused by name."""
        c = dict(model_cfg or {})
        t = dict(task_cfg or {})
        if not c:
            raise EncoderConfigError("model_cfg is empty (the original refuses an empty cfg too)")
        if "label_rate" not in c:
            raise EncoderConfigError("model_cfg has no 'label_rate' (required by the original HubertConfig)")
        lt = c.get("layer_type", "transformer")
        if lt != "transformer":
            raise EncoderConfigError(f"layer_type {lt!r} is not supported (only 'transformer')")
        if c.get("conv_pos_batch_norm", False):
            raise EncoderConfigError("conv_pos_batch_norm=True is not supported (weight-normed positional conv only)")
        if c.get("pos_enc_type", "abs") != "abs":
            raise EncoderConfigError(f"pos_enc_type {c.get('pos_enc_type')!r} is not supported (only 'abs')")
        if c.get("fp16", False):
            pass  # training flag; inference runs in float32 as the original's eval does
        conv_layers = parse_conv_layers(c.get("conv_feature_layers", "[(512,10,5)] + [(512,3,2)] * 4 + [(512,2,2)] * 2"))
        embed = int(c.get("encoder_embed_dim", 768))
        lnf = bool(c.get("layer_norm_first", False))
        n_layers = int(c.get("encoder_layers", 12))
        # fairseq: encoder.layer_norm before the layers when post-norm; when pre-norm it is applied at
        # the end only if no target layer is requested (never the case for the tokenizer).
        enc_ln = "before" if not lnf else ("none" if output_layer is not None else "after")
        if has_projection is None:
            has_projection = conv_layers[-1][0] != embed
        return cls(
            conv_layers=conv_layers,
            conv_bias=bool(c.get("conv_bias", False)),
            extractor_mode=str(c.get("extractor_mode", "default")),
            embed_dim=embed,
            ffn_dim=int(c.get("encoder_ffn_embed_dim", 3072)),
            num_heads=int(c.get("encoder_attention_heads", 12)),
            num_layers=n_layers,
            output_layer=output_layer,
            conv_pos=int(c.get("conv_pos", 128)),
            conv_pos_groups=int(c.get("conv_pos_groups", 16)),
            layer_norm_first=lnf,
            encoder_ln=enc_ln,
            has_projection=has_projection,
            normalize_waveform=bool(t.get("normalize", False)),
            activation=str(c.get("activation_fn", "gelu")),
        )

    @classmethod
    def from_hf_wav2vec2(cls, config: Mapping[str, Any]) -> "SpeechEncoderConfig":
        """An HF ``Wav2Vec2Config`` dict → config (last hidden state: all layers)."""
        c = dict(config)
        if c.get("add_adapter", False):
            raise EncoderConfigError("add_adapter=True is not supported (HF refuses adapters for this head too)")
        dims = c.get("conv_dim", [512] * 7)
        ks = c.get("conv_kernel", [10, 3, 3, 3, 3, 2, 2])
        ss = c.get("conv_stride", [5, 2, 2, 2, 2, 2, 2])
        if not (len(dims) == len(ks) == len(ss)):
            raise EncoderConfigError(f"conv_dim/conv_kernel/conv_stride lengths differ: {len(dims)}/{len(ks)}/{len(ss)}")
        norm = c.get("feat_extract_norm", "group")
        if norm not in ("group", "layer"):
            raise EncoderConfigError(f"feat_extract_norm {norm!r} is not supported (group | layer)")
        act = c.get("hidden_act", "gelu")
        if c.get("feat_extract_activation", "gelu") != act:
            raise EncoderConfigError("feat_extract_activation differs from hidden_act; not supported")
        stable = bool(c.get("do_stable_layer_norm", False))
        n_layers = int(c.get("num_hidden_layers", 12))
        if c.get("num_conv_pos_embedding_groups", 16) <= 0:
            raise EncoderConfigError("num_conv_pos_embedding_groups must be positive")
        return cls(
            conv_layers=tuple((int(d), int(k), int(s)) for d, k, s in zip(dims, ks, ss)),
            conv_bias=bool(c.get("conv_bias", False)),
            extractor_mode="default" if norm == "group" else "layer_norm",
            embed_dim=int(c.get("hidden_size", 768)),
            ffn_dim=int(c.get("intermediate_size", 3072)),
            num_heads=int(c.get("num_attention_heads", 12)),
            num_layers=n_layers,
            output_layer=None,
            conv_pos=int(c.get("num_conv_pos_embeddings", 128)),
            conv_pos_groups=int(c.get("num_conv_pos_embedding_groups", 16)),
            layer_norm_first=stable,
            encoder_ln="after" if stable else "before",
            has_projection=True,
            normalize_waveform=False,
            activation=str(act),
            layer_norm_eps=float(c.get("layer_norm_eps", 1e-5)),
        )


_ACTIVATIONS = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # exact erf GELU, as torch's default
    "relu": jax.nn.relu,
}


# ------------------------------------------------------------------------------------------------
# Building blocks
# ------------------------------------------------------------------------------------------------

def _layer_norm(x: Array, scale: Array | None, bias: Array | None, eps: float) -> Array:
    """LayerNorm over the last axis in float32 (two-pass variance, like torch)."""
    x32 = x.astype(jnp.float32)
    m = jnp.mean(x32, axis=-1, keepdims=True)
    d = x32 - m
    v = jnp.mean(d * d, axis=-1, keepdims=True)
    y = d * jax.lax.rsqrt(v + eps)
    if scale is not None:
        y = y * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype)


def _masked_time_norm(x: Array, mask: Array, eps: float) -> Array:
    """Normalise each channel over the valid time steps of its row: x (B, T, C), mask (B, T).
    Biased variance, float32 (fairseq Fp32GroupNorm / torch GroupNorm with one group per channel).

    The padding is excluded with ``where``, not by multiplying with a float mask: XLA:CPU reduces
    ``x * mask[..., None]`` over time ~9x slower (340 vs 36 ms on HuBERT's first (1, 31999, 512)
    activation, one third of the whole unbatched tokenizer), for the same sums."""
    x32 = x.astype(jnp.float32)
    m = mask[..., None]
    n = jnp.maximum(jnp.sum(mask, axis=1).astype(jnp.float32), 1.0)[:, None, None]
    mean = jnp.sum(jnp.where(m, x32, 0.0), axis=1, keepdims=True) / n
    d = jnp.where(m, x32 - mean, 0.0)
    var = jnp.sum(d * d, axis=1, keepdims=True) / n
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def _p(mod: nn.Module, name: str, shape: tuple[int, ...], names: tuple[str | None, ...], init=None):
    init = init or nn.initializers.normal(0.02)
    return mod.param(name, nn.with_logical_partitioning(init, names), shape)


class _Norm(nn.Module):
    dim: int

    @nn.compact
    def __call__(self):
        scale = _p(self, "scale", (self.dim,), ("norm",), nn.initializers.ones)
        bias = _p(self, "bias", (self.dim,), ("norm",), nn.initializers.zeros)
        return scale, bias


class _Dense(nn.Module):
    din: int
    dout: int
    names: tuple[str | None, str | None] = ("speech_embed", "speech_mlp")

    @nn.compact
    def __call__(self, x):
        k = _p(self, "kernel", (self.din, self.dout), self.names)
        b = _p(self, "bias", (self.dout,), (self.names[1],), nn.initializers.zeros)
        return jnp.einsum("...i,io->...o", x, k.astype(x.dtype)) + b.astype(x.dtype)


class FeatureExtractor(nn.Module):
    """The conv stack. Returns (features (B, T, C), frame lengths (B,), frame mask (B, T))."""

    cfg: SpeechEncoderConfig

    @nn.compact
    def __call__(self, wav: Array, lengths: Array) -> tuple[Array, Array, Array]:
        cfg = self.cfg
        act = _ACTIVATIONS[cfg.activation]
        x = wav[..., None]
        L = lengths
        cin = 1
        mask = None
        for i, (dim, k, s) in enumerate(cfg.conv_layers):
            w = _p(self, f"conv_{i}", (k, cin, dim), ("conv_kernel", "conv_in", "conv_out"))
            x = conv1d(x, w, stride=s)
            if cfg.conv_bias:
                x = x + _p(self, f"conv_{i}_bias", (dim,), ("conv_out",), nn.initializers.zeros).astype(x.dtype)
            L = jnp.where(L >= k, (L - k) // s + 1, 0)
            if cfg.extractor_mode == "default" and i == 0:
                mask = jnp.arange(x.shape[1])[None, :] < L[:, None]
                scale, bias = _Norm(dim, name=f"norm_{i}")()
                x = _masked_time_norm(x, mask, cfg.conv_norm_eps) * scale.astype(x.dtype) + bias.astype(x.dtype)
            elif cfg.extractor_mode == "layer_norm":
                scale, bias = _Norm(dim, name=f"norm_{i}")()
                x = _layer_norm(x, scale, bias, cfg.conv_norm_eps)
            x = act(x)
            cin = dim
        mask = jnp.arange(x.shape[1])[None, :] < L[:, None]
        return x, L, mask


class TransformerStack(nn.Module):
    """``num_layers`` identical layers with parameters stacked on a leading ``layers`` axis; runs the
    first ``layers_run`` of them with ``lax.scan``."""

    cfg: SpeechEncoderConfig

    @nn.compact
    def __call__(self, h: Array, mask: Array) -> Array:
        cfg = self.cfg
        n, d, f = cfg.num_layers, cfg.embed_dim, cfg.ffn_dim
        E, H, M = "speech_embed", "speech_heads", "speech_mlp"
        zeros, ones = nn.initializers.zeros, nn.initializers.ones

        def stacked(init):  # per-layer init, stacked along axis 0
            def f_(key, shape, dtype=jnp.float32):
                return jnp.stack([init(k, shape[1:], dtype) for k in jax.random.split(key, shape[0])])
            return f_

        normal = stacked(nn.initializers.normal(0.02))
        p = {
            "attn": {
                nm: {"kernel": _p(self, f"attn_{nm}_kernel", (n, d, d), ("layers", E, H), normal),
                     "bias": _p(self, f"attn_{nm}_bias", (n, d), ("layers", H), zeros)}
                for nm in ("q", "k", "v")
            },
            "out": {"kernel": _p(self, "attn_out_kernel", (n, d, d), ("layers", H, E), normal),
                    "bias": _p(self, "attn_out_bias", (n, d), ("layers", E), zeros)},
            "attn_ln": {"scale": _p(self, "attn_ln_scale", (n, d), ("layers", "norm"), ones),
                        "bias": _p(self, "attn_ln_bias", (n, d), ("layers", "norm"), zeros)},
            "fc1": {"kernel": _p(self, "fc1_kernel", (n, d, f), ("layers", E, M), normal),
                    "bias": _p(self, "fc1_bias", (n, f), ("layers", M), zeros)},
            "fc2": {"kernel": _p(self, "fc2_kernel", (n, f, d), ("layers", M, E), normal),
                    "bias": _p(self, "fc2_bias", (n, d), ("layers", E), zeros)},
            "final_ln": {"scale": _p(self, "final_ln_scale", (n, d), ("layers", "norm"), ones),
                         "bias": _p(self, "final_ln_bias", (n, d), ("layers", "norm"), zeros)},
        }
        k = cfg.layers_run
        if k < n:
            p = jax.tree.map(lambda a: a[:k], p)
        heads = cfg.num_heads
        hd = d // heads
        scaling = hd ** -0.5
        eps = cfg.layer_norm_eps
        act = _ACTIVATIONS[cfg.activation]
        dt = h.dtype
        # masked keys get the most negative float (not -inf: a fully padded row then stays finite)
        key_bias = jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)[:, None, None, :]

        def dense(x, q):
            return jnp.einsum("bti,io->bto", x, q["kernel"].astype(dt)) + q["bias"].astype(dt)

        def attention(x, lp):
            B, T, _ = x.shape
            q = (dense(x, lp["attn"]["q"]) * scaling).reshape(B, T, heads, hd)
            kk = dense(x, lp["attn"]["k"]).reshape(B, T, heads, hd)
            v = dense(x, lp["attn"]["v"]).reshape(B, T, heads, hd)
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, kk).astype(jnp.float32) + key_bias
            probs = jax.nn.softmax(logits, axis=-1).astype(dt)
            o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(B, T, d)
            return dense(o, lp["out"])

        def ffn(x, lp):
            return dense(act(dense(x, lp["fc1"])), lp["fc2"])

        def layer(x, lp):
            if cfg.layer_norm_first:
                x = x + attention(_layer_norm(x, lp["attn_ln"]["scale"], lp["attn_ln"]["bias"], eps), lp)
                x = x + ffn(_layer_norm(x, lp["final_ln"]["scale"], lp["final_ln"]["bias"], eps), lp)
            else:
                x = _layer_norm(x + attention(x, lp), lp["attn_ln"]["scale"], lp["attn_ln"]["bias"], eps)
                x = _layer_norm(x + ffn(x, lp), lp["final_ln"]["scale"], lp["final_ln"]["bias"], eps)
            return x, None

        h, _ = jax.lax.scan(layer, h, p)
        return h


class SpeechEncoder(nn.Module):
    """HuBERT / wav2vec2 body. ``__call__(wav (B, N), lengths (B,) | None)`` →
    ``{"features": (B, T, D), "frame_lengths": (B,), "conv_features": (B, T, C)}``; frames at or
    beyond a row's length are zero."""

    cfg: SpeechEncoderConfig
    dtype: Any = jnp.float32  # compute dtype (parameters are kept in float32)

    @nn.compact
    @with_precision(lambda m: m.cfg.precision)
    def __call__(self, wav: Array, lengths: Array | None = None) -> dict[str, Array]:
        cfg = self.cfg
        wav = jnp.asarray(wav)
        if wav.ndim != 2:
            raise ValueError(f"SpeechEncoder expects a (batch, samples) waveform, got shape {wav.shape}")
        B, N = wav.shape
        lengths = jnp.full((B,), N, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
        x = wav.astype(jnp.float32)
        smask = jnp.arange(N)[None, :] < lengths[:, None]
        if cfg.normalize_waveform:  # fairseq task normalize: F.layer_norm over the whole item
            x = _masked_time_norm(x[..., None], smask, cfg.waveform_norm_eps)[..., 0]
        x = jnp.where(smask, x, 0.0).astype(self.dtype)

        conv, flen, fmask = FeatureExtractor(cfg, name="feature_extractor")(x, lengths)
        scale, bias = _Norm(cfg.conv_dim, name="feature_ln")()
        h = _layer_norm(conv, scale.astype(self.dtype), bias.astype(self.dtype), cfg.layer_norm_eps)
        if cfg.has_projection:
            h = _Dense(cfg.conv_dim, cfg.embed_dim, ("conv_out", "speech_embed"), name="proj")(h)
        h = jnp.where(fmask[..., None], h, 0.0)  # the unbatched call's positional conv sees zeros here

        d, g, kpos = cfg.embed_dim, cfg.conv_pos_groups, cfg.conv_pos
        w = _p(self, "pos_conv_kernel", (kpos, d // g, d), ("conv_kernel", "conv_in", "conv_out"))
        b = _p(self, "pos_conv_bias", (d,), ("conv_out",), nn.initializers.zeros)
        pos = conv1d(h, w, padding=kpos // 2, groups=g) + b.astype(h.dtype)
        if kpos % 2 == 0:
            pos = pos[:, :-1]
        h = h + _ACTIVATIONS[cfg.activation](pos)

        if cfg.encoder_ln != "none":
            es, eb = _Norm(d, name="encoder_ln")()
        if cfg.encoder_ln == "before":
            h = _layer_norm(h, es, eb, cfg.layer_norm_eps)
        h = TransformerStack(cfg, name="layers")(h, fmask)
        if cfg.encoder_ln == "after":
            h = _layer_norm(h, es, eb, cfg.layer_norm_eps)
        h = jnp.where(fmask[..., None], h, 0.0)
        return {"features": h, "frame_lengths": flen, "conv_features": conv}


def init_params(cfg: SpeechEncoderConfig, seed: int = 0, n_samples: int | None = None) -> dict:
    """Random parameters (plain nested dict) for tests and benchmarks."""
    n = n_samples or max(cfg.receptive_field, 1)
    variables = jax.jit(lambda k: SpeechEncoder(cfg).init(k, jnp.zeros((1, n))))(jax.random.PRNGKey(seed))
    return nn.meta.unbox(variables)["params"]
