"""The wav2vec2 style encoder: one style unit per second (REFERENCE.md §6).

  waveform chunk → z-normalised over the whole chunk ((x − mean) / sqrt(var + 1e-7), float32; HF
  ``Wav2Vec2FeatureExtractor`` of facebook/wav2vec2-base; done on the host by
  :func:`normalize_waveform`, exactly as numpy computes it there)
  → wav2vec2 body (:class:`~spiritlm_jax.models.hubert.SpeechEncoder`, "group" norm, post-norm, all
    layers; the same code as HuBERT) → last hidden state (B, T, D), T at 50 Hz
  → projector Linear D → P per frame (applied BEFORE pooling, as the original)
  → mean over consecutive windows of ``pool_size`` (50) frames from frame 0, the last window
    averaged over its own (partial) length
  → classifier Linear P → num_labels → log-softmax → argmax (first index on ties).

Batched rows of different lengths: the body masks padding (see hubert.py) and each row's windows
and their counts come from its own frame length.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spiritlm_jax.models.hubert import SpeechEncoder, SpeechEncoderConfig, _Dense
from spiritlm_jax.models.layers import with_precision

Array = jax.Array

POOL_SIZE = 50  # the original's constructor default (not in config.json)
NORM_EPS = 1e-7  # HF Wav2Vec2FeatureExtractor zero-mean unit-variance epsilon


def normalize_waveform(x: np.ndarray, eps: float = NORM_EPS) -> np.ndarray:
    """(x − mean(x)) / sqrt(var(x) + eps) over the whole 1-D chunk, in float32 numpy (population
    variance), the same operations HF's feature extractor runs."""
    x = np.asarray(x, dtype=np.float32)
    return ((x - x.mean()) / np.sqrt(x.var() + np.float32(eps))).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class StyleEncoderConfig:
    encoder: SpeechEncoderConfig
    proj_size: int
    num_labels: int
    pool_size: int = POOL_SIZE
    norm_eps: float = NORM_EPS

    @classmethod
    def from_hf(cls, config: Mapping[str, Any], pool_size: int = POOL_SIZE) -> "StyleEncoderConfig":
        c = dict(config)
        n_labels = c.get("num_labels")
        if n_labels is None:
            n_labels = len(c.get("id2label") or {}) or 2
        return cls(
            encoder=SpeechEncoderConfig.from_hf_wav2vec2(c),
            proj_size=int(c.get("classifier_proj_size", 256)),
            num_labels=int(n_labels),
            pool_size=int(pool_size),
        )


def pool_windows(x: Array, frame_lengths: Array, pool_size: int) -> tuple[Array, Array]:
    """Mean over consecutive windows of ``pool_size`` frames per row: x (B, T, P) → (B, W, P) with
    W = ceil(T / pool_size), and the number of valid windows per row, ceil(len / pool_size)."""
    B, T, P = x.shape
    W = -(-T // pool_size)
    pad = W * pool_size - T
    valid = jnp.arange(T)[None, :] < frame_lengths[:, None]
    x = jnp.where(valid[..., None], x, 0.0)
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    sums = x.reshape(B, W, pool_size, P).sum(axis=2)
    starts = jnp.arange(W)[None, :] * pool_size
    counts = jnp.clip(frame_lengths[:, None] - starts, 0, pool_size)
    pooled = sums / jnp.maximum(counts, 1)[..., None].astype(sums.dtype)
    n_windows = -(-frame_lengths // pool_size)
    return pooled, n_windows


class StyleEncoder(nn.Module):
    """``__call__(normalised wav (B, N), lengths (B,) | None)`` → dict with ``last_hidden_state``
    (B, T, D), ``projected`` (B, T, P), ``pooled`` (B, W, P), ``logits`` (B, W, L), ``units`` (B, W),
    ``frame_lengths`` (B,), ``n_windows`` (B,)."""

    cfg: StyleEncoderConfig
    dtype: Any = jnp.float32

    @nn.compact
    @with_precision(lambda m: m.cfg.encoder.precision)  # one setting: the body's
    def __call__(self, wav: Array, lengths: Array | None = None) -> dict[str, Array]:
        cfg = self.cfg
        body = SpeechEncoder(cfg.encoder, dtype=self.dtype, name="encoder")(wav, lengths)
        h = body["features"].astype(jnp.float32)
        proj = _Dense(cfg.encoder.embed_dim, cfg.proj_size, ("speech_embed", "speech_mlp"), name="projector")(h)
        pooled, n_win = pool_windows(proj, body["frame_lengths"], cfg.pool_size)
        logits = _Dense(cfg.proj_size, cfg.num_labels, ("speech_mlp", None), name="classifier")(pooled)
        units = jnp.argmax(jax.nn.log_softmax(logits, axis=-1), axis=-1).astype(jnp.int32)
        return {"last_hidden_state": h, "projected": proj, "pooled": pooled, "logits": logits, "units": units,
                "frame_lengths": body["frame_lengths"], "n_windows": n_win}
