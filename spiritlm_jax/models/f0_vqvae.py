"""Spirit LM's pitch VQ-VAE (jukebox-style, speech-resynthesis F0 recipe): normalisation, encoder,
nearest-codebook bottleneck, and the decoder (REFERENCE.md §2.4, §5.4–5.6).

Tokenization uses the encoder and the bottleneck only; the decoder reproduces
``F0Tokenizer(..., compute_vqvae_pred=True)``'s reconstruction.

Layout: time-major (B, T, C) throughout. Batched rows of different lengths are exact: every
convolution sees zeros beyond a row's end, exactly like its own zero padding, because activations
are masked to each row's valid length at every stage (lengths shrink by ``stride`` per down-conv:
``floor(L/s)`` for the even strides the original supports).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spiritlm_jax.models.layers import DEFAULT_PRECISION, Conv1d, check_precision, precision_scope, with_precision

FEATURES = ("f0_interp,vuv", "f0,vuv", "norm_f0_interp,vuv", "norm_f0,vuv")


class VQVAEConfigError(ValueError):
    """The VQ-VAE config.yaml describes something the original cannot run (or that we do not support)."""


@dataclasses.dataclass(frozen=True)
class ConvStackConfig:
    input_emb_width: int
    output_emb_width: int
    levels: int
    downs_t: tuple[int, ...]
    strides_t: tuple[int, ...]
    width: int
    depth: int
    m_conv: float = 1.0
    dilation_growth_rate: int = 1
    dilation_cycle: int | None = None
    zero_out: bool = False
    res_scale: bool = False
    reverse_decoder_dilation: bool = False

    @property
    def n_state(self) -> int:
        return int(self.m_conv * self.width)

    def dilations(self, reverse: bool = False) -> list[int]:
        d = [self.dilation_growth_rate ** (j if self.dilation_cycle is None else j % self.dilation_cycle)
             for j in range(self.depth)]
        return d[::-1] if reverse else d

    @property
    def res_factor(self) -> float:
        return 1.0 if not self.res_scale else 1.0 / math.sqrt(self.depth)

    @property
    def total_stride(self) -> int:
        return int(np.prod([s ** d for s, d in zip(self.strides_t, self.downs_t)]))


@dataclasses.dataclass(frozen=True)
class F0VQVAEConfig:
    encoder: ConvStackConfig
    decoder: ConvStackConfig
    l_bins: int
    emb_width: int
    vq_levels: int
    features: str
    speaker_norm: bool = False
    # run-time, not from config.yaml: matmul/conv precision (models/layers.py); the default
    # reproduces the original's pitch codes on every backend
    precision: str = DEFAULT_PRECISION

    def __post_init__(self):
        check_precision(self.precision, "F0VQVAEConfig")

    @property
    def normalize(self) -> bool:
        """Mean removal before the VQ-VAE (§5.4)."""
        return bool(self.speaker_norm) or "norm_" in self.features

    @classmethod
    def from_yaml_dict(cls, cfg: Mapping[str, Any], where: str = "config.yaml") -> "F0VQVAEConfig":
        try:
            enc, dec, vq = dict(cfg["encoder_params"]), dict(cfg["decoder_params"]), dict(cfg["vq_params"])
            features = str(cfg["features"])
        except KeyError as e:
            raise VQVAEConfigError(f"{where}: missing field {e}; expected encoder_params, decoder_params, "
                                   f"vq_params and features (the pitch VQ-VAE config.yaml)") from None
        if features not in FEATURES:
            raise VQVAEConfigError(f"{where}: features={features!r}; the original accepts only {list(FEATURES)}")
        enc.pop("reverse_decoder_dilation", None)  # the original drops it for the encoder
        if "checkpoint_res" in enc:
            raise VQVAEConfigError(f"{where}: encoder_params has checkpoint_res, which the original encoder rejects")
        dec.pop("checkpoint_res", None)  # only gradient checkpointing (or NotImplemented when 1)
        stacks = {}
        for name, p in (("encoder_params", enc), ("decoder_params", dec)):
            try:
                downs, strides = p.pop("downs_t"), p.pop("strides_t")
                downs = tuple(int(d) for d in downs)
                strides = tuple(int(s) for s in strides)
                known = {f.name for f in dataclasses.fields(ConvStackConfig)}
                unknown = set(p) - known
                if unknown:
                    raise VQVAEConfigError(f"{where}: {name} has unknown field(s) {sorted(unknown)}")
                stacks[name] = ConvStackConfig(downs_t=downs, strides_t=strides, **p)
            except TypeError as e:
                raise VQVAEConfigError(f"{where}: {name} is incomplete or malformed ({e})") from None
            c = stacks[name]
            if len(c.downs_t) != c.levels or len(c.strides_t) != c.levels:
                raise VQVAEConfigError(f"{where}: {name} needs one downs_t/strides_t entry per level ({c.levels})")
            for s in c.strides_t:
                if s % 2:
                    raise VQVAEConfigError(
                        f"{where}: {name} has odd stride {s}: kernel 2s+1 with padding s//2+1 does not give "
                        f"T//s frames, and the original asserts that length; only even strides run")
            if any(d <= 0 for d in c.downs_t):
                raise VQVAEConfigError(f"{where}: {name}: downs_t must be positive, got {list(c.downs_t)}")
        l_bins, emb_width, vq_levels = int(vq["l_bins"]), int(vq["emb_width"]), int(vq["levels"])
        e = stacks["encoder_params"]
        if e.input_emb_width != 2:
            raise VQVAEConfigError(f"{where}: encoder input_emb_width must be 2 ([f0, vuv]), got {e.input_emb_width}")
        if e.output_emb_width not in (emb_width, 2 * emb_width):
            raise VQVAEConfigError(f"{where}: encoder output_emb_width {e.output_emb_width} must be emb_width "
                                   f"({emb_width}) or twice it")
        return cls(encoder=e, decoder=stacks["decoder_params"], l_bins=l_bins, emb_width=emb_width,
                   vq_levels=vq_levels, features=features, speaker_norm=bool(cfg.get("speaker_norm", False) or False))


# ----------------------------------------------------------------------------------------------
# Normalisation (§5.4)
# ----------------------------------------------------------------------------------------------

def normalize_f0(f0: jax.Array, vuv: jax.Array, valid: jax.Array, normalize: bool) -> jax.Array:
    """``f0[f0 != 0] -= mean(f0[vuv != 0])`` per row (float32), when the config asks for it.

    A row with no voiced frame: the original's mean is NaN (and the FCPE path raised before that);
    here nothing is subtracted, so the contour stays as extracted (0 Hz for our fully unvoiced rows).
    """
    if not normalize:
        return f0
    voiced = (vuv != 0) & valid
    n = jnp.sum(voiced, axis=-1, keepdims=True)
    mean = jnp.sum(jnp.where(voiced, f0, 0.0), axis=-1, keepdims=True) / jnp.maximum(n, 1).astype(f0.dtype)
    mean = jnp.where(n > 0, mean, 0.0)
    return jnp.where((f0 != 0) & valid, f0 - mean, f0)


# ----------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------

def _mask(lengths, T):
    if lengths is None:
        return None
    return (jnp.arange(T, dtype=jnp.int32)[None, :] < lengths[:, None])[..., None].astype(jnp.float32)


def _apply_mask(x, m):
    return x if m is None else x * m


class ResStack(nn.Module):
    """Resnet1D: blocks ``x + res_scale · conv1x1(relu(conv3_dil(relu(x))))``."""

    cfg: ConvStackConfig
    reverse: bool = False

    @nn.compact
    def __call__(self, x, m):
        c = self.cfg
        for j, d in enumerate(c.dilations(self.reverse)):
            h = jax.nn.relu(x)
            h = Conv1d(c.n_state, 3, padding=d, dilation=d, name=f"block_{j}_conv3")(h)
            h = jax.nn.relu(h)
            h = Conv1d(x.shape[-1], 1, name=f"block_{j}_conv1")(h)
            x = _apply_mask(x + c.res_factor * h, m)
        return x


class Encoder(nn.Module):
    """Returns the list of per-level encodings (each (B, T_l, output_emb_width)) and their lengths."""

    cfg: ConvStackConfig
    precision: str = DEFAULT_PRECISION

    @nn.compact
    @with_precision(lambda m: m.precision)
    def __call__(self, x, lengths=None):
        c = self.cfg
        xs, ls = [], []
        for level in range(c.levels):
            s, D = c.strides_t[level], c.downs_t[level]
            for i in range(D):
                x = Conv1d(c.width, 2 * s, stride=s, padding=s // 2, name=f"level{level}_down{i}")(x)
                if lengths is not None:
                    lengths = lengths // s
                m = _mask(lengths, x.shape[1])
                x = _apply_mask(x, m)
                x = ResStack(c, name=f"level{level}_res{i}")(x, m)
            x = Conv1d(c.output_emb_width, 3, padding=1, name=f"level{level}_out")(x)
            x = _apply_mask(x, _mask(lengths, x.shape[1]))
            xs.append(x)
            ls.append(lengths)
        return xs, ls


class Decoder(nn.Module):
    cfg: ConvStackConfig
    precision: str = DEFAULT_PRECISION

    @nn.compact
    @with_precision(lambda m: m.precision)
    def __call__(self, xs: Sequence[jax.Array]):
        c = self.cfg
        x = xs[-1]
        for level in reversed(range(c.levels)):
            s, D = c.strides_t[level], c.downs_t[level]
            x = Conv1d(c.width, 3, padding=1, name=f"level{level}_in")(x)
            for i in range(D):
                x = ResStack(c, reverse=c.reverse_decoder_dilation, name=f"level{level}_res{i}")(x, None)
                out = c.output_emb_width if i == D - 1 else c.width
                x = Conv1d(out, 2 * s, stride=s, padding=s // 2, transpose=True, name=f"level{level}_up{i}")(x)
            if level != 0:
                x = x + xs[level - 1]
        return Conv1d(c.input_emb_width, 3, padding=1, name="out")(x)


def quantise(z: jax.Array, codebook: jax.Array) -> jax.Array:
    """Nearest codebook entry (§5.6): (B, T, C) → (B, T) int32, first index on ties."""
    emb = codebook.shape[1]
    if z.shape[-1] == 2 * emb:
        z = z[..., :emb] + z[..., emb:]
    d = (jnp.sum(z ** 2, axis=-1, keepdims=True)
         - 2 * jnp.einsum("btc,kc->btk", z, codebook)
         + jnp.sum(codebook.T ** 2, axis=0)[None, None, :])
    return jnp.argmin(d, axis=-1).astype(jnp.int32)


def encode(params, cfg: F0VQVAEConfig, x: jax.Array, lengths: jax.Array | None = None):
    """(B, T, 2) [f0, vuv] → (level-0 codes (B, T//stride), level-0 latent, code lengths)."""
    xs, ls = Encoder(cfg.encoder, cfg.precision).apply({"params": params["encoder"]}, x, lengths)
    with precision_scope(cfg.precision):
        codes = quantise(xs[0], params["codebook"][0])
    return codes, xs[0], ls[0]


def reconstruct(params, cfg: F0VQVAEConfig, x: jax.Array):
    """The decoder output of ``VQVAE.forward(x, compute_pred=True)``: (B, T', 2), T' = codes·stride."""
    xs, _ = Encoder(cfg.encoder, cfg.precision).apply({"params": params["encoder"]}, x)
    zq = []
    for level, z in enumerate(xs):
        cb = params["codebook"][level]
        emb = cb.shape[1]
        with precision_scope(cfg.precision):
            codes = quantise(z, cb)
        zz = z[..., :emb] + z[..., emb:] if z.shape[-1] == 2 * emb else z
        xd = cb[codes]
        zq.append(zz + (xd - zz))  # straight-through pass, same float rounding as the original
    return Decoder(cfg.decoder, cfg.precision).apply({"params": params["decoder"]}, zq)


def init_params(cfg: F0VQVAEConfig, seed: int = 0):
    """Random parameters of the right shapes (tests, benchmarks)."""
    T = cfg.encoder.total_stride * 2
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    enc = nn.meta.unbox(Encoder(cfg.encoder).init(k1, jnp.zeros((1, T, cfg.encoder.input_emb_width)))["params"])
    xs = [jnp.zeros((1, 2, cfg.emb_width))] * cfg.decoder.levels
    dec = nn.meta.unbox(Decoder(cfg.decoder).init(k2, xs)["params"])
    cbs = [jax.random.normal(jax.random.fold_in(k3, i), (cfg.l_bins, cfg.emb_width)) for i in range(cfg.vq_levels)]
    return {"encoder": enc, "decoder": dec, "codebook": cbs}
