"""Which frame features a k-means unit quantizer reads, on the HuBERT encoder's own framing.

The Spirit LM tokenizer quantizes HuBERT layer-11 features. A k-means quantizer trained here
(``spiritlm-jax train-quantizer``) may read one of three features, all on the SAME frames as the
encoder (frame j covers samples ``[hop·j, hop·j + receptive_field)``; ``(n − rf) // hop + 1`` frames),
so every unit keeps the timestamps ``prepare`` stores and the interleaving rules rely on:

* ``hubert`` (``layer``): the encoder's transformer output after ``layer`` layers — the original's
  choice, meaningful with converted (trained) HuBERT weights;
* ``conv``: the conv feature extractor's output (before the projection);
* ``log_mel``: a log-mel spectrum of each frame's own window (Hann window of ``receptive_field``
  samples, zero-padded to the next power of two, ``n_mels`` triangular mel filters of librosa's Slaney
  kind, ``log(mel + 1e-6)``), with ``context`` neighbouring frames stacked on each side (edges repeat
  the first/last valid frame). A deterministic, weight-free feature: with random-weight HuBERT
  checkpoints (all this repository can ship) the encoder's features carry little of the words
  (docs/miniature.md gives the measured word–unit mutual information), log-mel frames carry much more.

The spec is stored with the quantizer (``kmeans.json``) so the tokenizer computes what the centres were
trained on.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FeatureSpecError", "FeatureSpec", "log_mel_frames", "select_features"]

KINDS = ("hubert", "conv", "log_mel")


class FeatureSpecError(ValueError):
    """A feature spec that names an unknown kind or impossible parameters."""


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
    kind: str = "hubert"
    layer: int | None = None  # hubert: transformer layers run (None: the checkpoint's tokenizer layer, 11)
    n_mels: int = 40  # log_mel
    context: int = 1  # log_mel: frames stacked on each side

    def __post_init__(self):
        if self.kind not in KINDS:
            raise FeatureSpecError(f"unknown feature kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if self.kind == "log_mel" and not (1 <= self.n_mels <= 256 and 0 <= self.context <= 8):
            raise FeatureSpecError(f"log_mel needs 1 <= n_mels <= 256 and 0 <= context <= 8, got {self.n_mels}, "
                                   f"{self.context}")
        if self.layer is not None and self.layer < 1:
            raise FeatureSpecError(f"layer must be >= 1, got {self.layer}")

    @classmethod
    def parse(cls, text: str) -> "FeatureSpec":
        """``hubert:11`` | ``hubert`` | ``conv`` | ``log_mel`` | ``log_mel:40:1`` (mels, context)."""
        parts = str(text).strip().split(":")
        kind = parts[0].replace("-", "_")
        try:
            if kind == "hubert":
                return cls("hubert", layer=int(parts[1]) if len(parts) > 1 else None)
            if kind == "log_mel":
                return cls("log_mel", n_mels=int(parts[1]) if len(parts) > 1 else 40,
                           context=int(parts[2]) if len(parts) > 2 else 1)
            if kind == "conv" and len(parts) == 1:
                return cls("conv")
        except ValueError:
            pass
        raise FeatureSpecError(f"cannot read the feature spec {text!r}: use hubert[:LAYER], conv or "
                               f"log_mel[:N_MELS[:CONTEXT]]")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "FeatureSpec":
        return cls(**{k: d[k] for k in ("kind", "layer", "n_mels", "context") if k in d})

    def dim(self, encoder_cfg) -> int:
        if self.kind == "hubert":
            return encoder_cfg.embed_dim
        if self.kind == "conv":
            return encoder_cfg.conv_dim
        return self.n_mels * (2 * self.context + 1)


def _mel_matrix(n_fft: int, n_mels: int, sr: int = 16_000) -> np.ndarray:
    import librosa

    return librosa.filters.mel(sr=sr, n_fft=n_fft, n_mels=n_mels).astype(np.float32)  # (n_mels, n_fft//2 + 1)


def log_mel_frames(wav, lengths, *, hop: int, window: int, n_mels: int, context: int, n_frames: int):
    """(B, N) waveform, (B,) valid samples → (B, n_frames, n_mels·(2·context+1)) on the encoder's framing."""
    n_fft = 1 << int(np.ceil(np.log2(window)))
    mel = jnp.asarray(_mel_matrix(n_fft, n_mels))  # (M, F)
    hann = jnp.asarray(np.hanning(window + 2)[1:-1].astype(np.float32))  # (W,)
    B, N = wav.shape
    starts = hop * jnp.arange(n_frames)  # (T,)
    idx = jnp.minimum(starts[:, None] + jnp.arange(window)[None, :], N - 1)  # (T, W)
    frames = wav[:, idx] * hann  # (B, T, W)
    spec = jnp.abs(jnp.fft.rfft(frames, n=n_fft, axis=-1)) ** 2  # (B, T, F)
    logmel = jnp.log(jnp.einsum("btf,mf->btm", spec, mel) + 1e-6)  # (B, T, M)
    valid = jnp.maximum((lengths - window) // hop + 1, 1)  # (B,) frames per row
    if context:
        t = jnp.arange(n_frames)
        parts = []
        for off in range(-context, context + 1):
            src = jnp.clip(t[None, :] + off, 0, valid[:, None] - 1)  # (B, T)
            parts.append(jnp.take_along_axis(logmel, src[..., None], axis=1))
        logmel = jnp.concatenate(parts, axis=-1)  # (B, T, M·(2c+1))
    mask = jnp.arange(n_frames)[None, :] < valid[:, None]
    return jnp.where(mask[..., None], logmel, 0.0)


def select_features(spec: FeatureSpec, encoder_out: Mapping[str, Any], wav, lengths, encoder_cfg):
    """The frame features ``spec`` names, from the encoder's outputs (and the waveform for log_mel)."""
    if spec.kind == "hubert":
        return encoder_out["features"].astype(jnp.float32)
    if spec.kind == "conv":
        return encoder_out["conv_features"].astype(jnp.float32)
    T = encoder_out["features"].shape[1]
    return log_mel_frames(jnp.asarray(wav, jnp.float32), jnp.asarray(lengths), hop=encoder_cfg.hop,
                          window=encoder_cfg.receptive_field, n_mels=spec.n_mels, context=spec.context, n_frames=T)


# ------------------------------------------------------------------------------------------------
# The k-means quantizer folder (ours): kmeans.json + centers.npy
# ------------------------------------------------------------------------------------------------

KMEANS_CONFIG = "kmeans.json"
KMEANS_CENTERS = "centers.npy"
KMEANS_FORMAT = "spiritlm-jax-kmeans/1"


def write_kmeans_dir(folder, centers: np.ndarray, spec: FeatureSpec, **info) -> None:
    """Write ``kmeans.json`` (format, n_clusters, dim, features, and ``info``: inertia, seed, ...) and
    ``centers.npy`` into ``folder`` (created)."""
    import json
    from pathlib import Path

    d = Path(folder)
    d.mkdir(parents=True, exist_ok=True)
    centers = np.asarray(centers, np.float32)
    np.save(d / KMEANS_CENTERS, centers, allow_pickle=False)
    meta = {"format": KMEANS_FORMAT, "n_clusters": int(centers.shape[0]), "dim": int(centers.shape[1]),
            "features": spec.to_json(), **info}
    (d / KMEANS_CONFIG).write_text(json.dumps(meta, indent=1))


def read_kmeans_dir(folder) -> tuple[np.ndarray, FeatureSpec, dict]:
    """``(centers (K, D), feature spec, metadata)`` of a folder written by :func:`write_kmeans_dir`."""
    import json
    from pathlib import Path

    d = Path(folder)
    cfg_path = d / KMEANS_CONFIG
    if not cfg_path.is_file():
        raise FeatureSpecError(f"{d}: no {KMEANS_CONFIG}; train a quantizer with `spiritlm-jax train-quantizer`")
    try:
        meta = json.loads(cfg_path.read_text())
        centers = np.load(d / KMEANS_CENTERS, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise FeatureSpecError(f"{d}: unreadable k-means quantizer ({e})") from None
    if meta.get("format") != KMEANS_FORMAT:
        raise FeatureSpecError(f"{cfg_path}: format {meta.get('format')!r}, expected {KMEANS_FORMAT!r}")
    if centers.shape != (meta.get("n_clusters"), meta.get("dim")):
        raise FeatureSpecError(f"{d}: centers have shape {centers.shape} but {KMEANS_CONFIG} says "
                               f"({meta.get('n_clusters')}, {meta.get('dim')})")
    if not np.isfinite(centers).all():
        raise FeatureSpecError(f"{d}: the centres contain NaN or inf")
    return centers.astype(np.float32), FeatureSpec.from_json(meta.get("features", {})), meta
