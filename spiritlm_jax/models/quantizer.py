"""HuBERT feature quantizers: the MLP ("linear") quantizer Spirit LM ships, with its CTC-blank
filling rule, and the k-means quantizer the original supports as an option (REFERENCE.md §2.3, §4.6).

Linear quantizer: Linear → LeakyReLU(0.01) → Linear → LeakyReLU(0.01) → Linear → (V + 1) logits,
log-softmax, argmax (first index on ties; log-softmax is applied because it can merge near-equal
logits into ties). Blank id = V.

Blank filling (:func:`fill_blanks`): the original repeats ``code[blank] = roll(code, 1)[blank]`` up
to 10 000 times on the flattened tensor. Per row that means: a blank takes the nearest non-blank
unit on its left; leading blanks wrap around and take the row's LAST non-blank unit; a row with no
non-blank stays blank; a blank more than 10 000 steps (circularly) from its source stays blank.
Here this is computed in closed form with a cumulative max — no loop over frames, jit-friendly —
and per row of a batch (with valid lengths), NOT across the flattened batch as the original would
for B > 1 (that would leak units between utterances).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from spiritlm_jax.models.layers import DEFAULT_PRECISION, check_precision, with_precision

Array = jax.Array

# The original gives up after this many roll iterations.
MAX_FILL_ITERATIONS = 10_000


@dataclasses.dataclass(frozen=True)
class LinearQuantizerConfig:
    vocab_size: int  # units; blank id = vocab_size, logits = vocab_size + 1
    widths: tuple[int, ...]  # (dim, h1, h2, vocab_size + 1)
    negative_slope: float = 0.01  # torch LeakyReLU default
    # run-time: matmul precision (models/layers.py); the default reproduces the original's units
    precision: str = DEFAULT_PRECISION

    def __post_init__(self):
        check_precision(self.precision, "LinearQuantizerConfig")

    @property
    def blank_id(self) -> int:
        return self.vocab_size

    @classmethod
    def from_model_cfg(cls, model_cfg: dict) -> "LinearQuantizerConfig":
        """The original's width formula: mid = upstream_dim − (V+1); h1 = dim − mid//4; h2 = dim − mid//2
        (Python floor division)."""
        v, dim, up = int(model_cfg["vocab_size"]), int(model_cfg["dim"]), int(model_cfg["upstream_dim"])
        out = v + 1
        mid = up - out
        return cls(vocab_size=v, widths=(dim, dim - mid // 4, dim - mid // 2, out))


class LinearQuantizer(nn.Module):
    """features (..., dim) → logits (..., V+1)."""

    cfg: LinearQuantizerConfig

    @nn.compact
    @with_precision(lambda m: m.cfg.precision)
    def __call__(self, x: Array) -> Array:
        w = self.cfg.widths
        h = x.astype(jnp.float32)
        for i in range(len(w) - 1):
            k = self.param(f"dense_{i}_kernel", nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                           ("speech_embed", "speech_mlp")), (w[i], w[i + 1]))
            b = self.param(f"dense_{i}_bias", nn.with_logical_partitioning(nn.initializers.zeros,
                           ("speech_mlp",)), (w[i + 1],))
            h = jnp.einsum("...i,io->...o", h, k) + b
            if i < len(w) - 2:
                h = jnp.where(h >= 0, h, h * self.cfg.negative_slope)
        return h


def logits_to_raw_units(logits: Array) -> Array:
    """log-softmax then argmax (first index on ties), as the original."""
    return jnp.argmax(jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1), axis=-1).astype(jnp.int32)


def fill_blanks(units: Array, blank_id: int, lengths: Array | None = None,
                max_iterations: int = MAX_FILL_ITERATIONS) -> Array:
    """Replace blanks per row by the nearest non-blank on the left, wrapping around within the row's
    valid length (see module doc). ``units`` (B, T) or (T,); ``lengths`` (B,) valid frames per row
    (None: all). Frames at or beyond a row's length are returned unchanged."""
    squeeze = units.ndim == 1
    u = units[None] if squeeze else units
    B, T = u.shape
    pos = jnp.arange(T, dtype=jnp.int32)[None, :]
    L = jnp.full((B,), T, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32).reshape(B)
    valid = pos < L[:, None]
    good = valid & (u != blank_id)
    idx = jnp.where(good, pos, -1)
    left = jax.lax.cummax(idx, axis=1)  # last non-blank at or before each position (-1: none)
    last = jnp.max(idx, axis=1, keepdims=True)  # the row's last non-blank (-1: none at all)
    src = jnp.where(left >= 0, left, last)
    # circular distance walked by the original's roll loop
    dist = jnp.where(left >= 0, pos - left, pos + (L[:, None] - last))
    fill = valid & (u == blank_id) & (src >= 0) & (dist <= max_iterations)
    out = jnp.where(fill, jnp.take_along_axis(u, jnp.maximum(src, 0), axis=1), u)
    return out[0] if squeeze else out


def linear_quantize(params: Any, cfg: LinearQuantizerConfig, feats: Array, lengths: Array | None = None) -> Array:
    """features (B, T, dim) → units (B, T) (blanks filled per row)."""
    logits = LinearQuantizer(cfg).apply({"params": params}, feats)
    return fill_blanks(logits_to_raw_units(logits), cfg.blank_id, lengths)


# ------------------------------------------------------------------------------------------------
# k-means (optional in the original; not used by Spirit LM's factories)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KmeansConfig:
    n_clusters: int
    dim: int
    precision: str = DEFAULT_PRECISION  # as LinearQuantizerConfig.precision

    def __post_init__(self):
        check_precision(self.precision, "KmeansConfig")


class KmeansQuantizer(nn.Module):
    """features (..., dim) → nearest centroid id: argmin ‖x‖² − 2 x·c + ‖c‖² (first index on ties)."""

    cfg: KmeansConfig

    @nn.compact
    @with_precision(lambda m: m.cfg.precision)
    def __call__(self, x: Array) -> Array:
        c = self.param("centers", nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codebook", "speech_embed")),
                       (self.cfg.n_clusters, self.cfg.dim))
        x = x.astype(jnp.float32)
        dist = (jnp.sum(x * x, axis=-1, keepdims=True) - 2.0 * jnp.einsum("...d,kd->...k", x, c)
                + jnp.sum(c * c, axis=-1))
        return jnp.argmin(dist, axis=-1).astype(jnp.int32)


def quantizer_widths_from_state(shapes: Sequence[tuple[int, ...]]) -> tuple[int, ...]:
    """Linear weight shapes (out, in) in order → widths (in0, out0, out1, ...)."""
    w = [shapes[0][1]]
    for s in shapes:
        w.append(s[0])
    return tuple(w)
