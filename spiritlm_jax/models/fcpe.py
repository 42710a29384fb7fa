"""FCPE pitch estimator (torchfcpe 0.0.4, bundled ``fcpe_c_v001``), exactly as Spirit LM calls it.

Spirit LM's ``FCPEF0Extractor`` calls ``model.infer(wav (1, N, 1), sr=16000,
decoder_mode="local_argmax", threshold=0.05, f0_min=50, f0_max=1100, interp_uv=True,
output_interp_target_length=N//80 + 1, retur_uv=True)`` (REFERENCE.md §5.1–5.2). This module is that
whole path as pure, jit-able JAX on a right-padded batch with per-row lengths:

1. log-mel front end (reflect padding 432/432, periodic Hann, |STFT| with +1e-9 inside the sqrt,
   Slaney mel filters, log(clamp(·, 1e-5)), ``N//160 + 1`` frames with one duplicated last frame);
2. the conv-only ``CFNaiveMelPE`` network (:class:`FCPENet`);
3. local-argmax decoding (9-bin window clamped to the table without de-duplication), voicing
   threshold on the max latent, cents → Hz;
4. ``uv = f0 < f0_min``; linear interpolation over unvoiced frames in torchfcpe's float32 operation
   order, edges copy the nearest voiced value; clamp above ``f0_max``; PyTorch legacy "nearest"
   resize from ``N//160 + 1`` to ``N//80 + 1`` frames.

Every row of a batch gives exactly what it gives alone: padded samples never reach a valid frame
(the STFT of row i reads only row i's own reflect-padded signal, convolutions see zeros beyond each
row's end exactly like their zero padding, GroupNorm statistics are taken over each row's valid
frames only).

Fully unvoiced input (no frame with f0 ≥ f0_min): the original raises an IndexError inside
torchfcpe's interpolation. Here it is defined instead: f0 = 0 Hz and vuv = 0 on every frame (there
is no voiced value to interpolate from, and 0 Hz is torchfcpe's own code for "unvoiced").
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spiritlm_jax.models.layers import DEFAULT_PRECISION, Conv1d, check_precision, precision_scope, with_precision


@dataclasses.dataclass(frozen=True)
class FCPEConfig:
    """Everything the bundled checkpoint's ``config_dict`` says, plus Spirit LM's call arguments."""

    sr: int = 16000
    n_mels: int = 128
    n_fft: int = 1024
    win_size: int = 1024
    hop_size: int = 160
    fmin: float = 0.0
    fmax: float = 8000.0
    clip_val: float = 1e-5
    out_dims: int = 360
    hidden_dims: int = 512
    n_layers: int = 6
    groups: int = 4  # GroupNorm groups of the input stack (fixed in CFNaiveMelPE)
    expansion: int = 2  # ConformerConvModule expansion factor (fixed)
    dw_kernel: int = 31  # depthwise kernel (fixed)
    # Spirit LM's call (FCPEF0Extractor.compute_f0_uv)
    threshold: float = 0.05
    f0_min: float = 50.0
    f0_max: float = 1100.0
    out_hop: int = 80  # F0 frames of the output: N // out_hop + 1 (200 Hz)
    # run-time: matmul/conv precision (models/layers.py); the default reproduces the original's F0
    precision: str = DEFAULT_PRECISION

    def __post_init__(self):
        check_precision(self.precision, "FCPEConfig")

    @classmethod
    def from_torchfcpe(cls, config_dict: Mapping[str, Any], **overrides) -> "FCPEConfig":
        mel, model = config_dict["mel"], config_dict["model"]
        mel_type = str(mel.get("type", "default")).lower()
        if mel_type not in ("default", "none"):
            raise ValueError(f"FCPE mel type {mel.get('type')!r} is not supported (only the default mel front end)")
        if model.get("type") != "CFNaiveMelPE":
            raise ValueError(f"FCPE model type {model.get('type')!r} is not supported (only CFNaiveMelPE)")
        if not model.get("conv_only", False):
            raise ValueError("only the conv-only FCPE (conv_only=True, as fcpe_c_v001) is supported")
        if model.get("use_harmonic_emb", False):
            raise ValueError("FCPE with use_harmonic_emb=True is not supported (fcpe_c_v001 has none)")
        kw = dict(
            sr=int(mel["sr"]), n_mels=int(mel["num_mels"]), n_fft=int(mel["n_fft"]), win_size=int(mel["win_size"]),
            hop_size=int(mel["hop_size"]), fmin=float(mel.get("fmin", 0) or 0),
            fmax=float(mel["fmax"]) if mel.get("fmax") is not None else float(mel["sr"]) / 2,
            out_dims=int(model["out_dims"]), hidden_dims=int(model["hidden_dims"]), n_layers=int(model["n_layers"]),
        )
        kw.update(overrides)
        return cls(**kw)


# ----------------------------------------------------------------------------------------------
# Front end constants and frame counts
# ----------------------------------------------------------------------------------------------

def frontend_constants(cfg: FCPEConfig) -> dict[str, np.ndarray]:
    """The two fixed arrays of the mel front end: librosa's Slaney mel filters (cast to float32, as
    torchfcpe does) and the periodic Hann window (torch.hann_window)."""
    import librosa

    mel = librosa.filters.mel(sr=cfg.sr, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
    n = np.arange(cfg.win_size, dtype=np.float64)
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / cfg.win_size)
    if cfg.win_size != cfg.n_fft:  # torch.stft centre-pads a shorter window to n_fft
        left = (cfg.n_fft - cfg.win_size) // 2
        window = np.pad(window, (left, cfg.n_fft - cfg.win_size - left))
    return {"mel_basis": mel.astype(np.float32), "window": window.astype(np.float32)}


def mel_frames(n: int | np.ndarray, cfg: FCPEConfig):
    """Mel frames torchfcpe returns for n samples: ``n // hop + 1``."""
    return n // cfg.hop_size + 1


def f0_frames(n: int | np.ndarray, cfg: FCPEConfig):
    """F0 frames Spirit LM asks for: ``n // 80 + 1``."""
    return n // cfg.out_hop + 1


def _pads(cfg: FCPEConfig):
    pad_left = (cfg.win_size - cfg.hop_size) // 2
    pad_right_min = (cfg.win_size - cfg.hop_size + 1) // 2
    return pad_left, pad_right_min


# ----------------------------------------------------------------------------------------------
# Mel front end (per-row lengths)
# ----------------------------------------------------------------------------------------------

def log_mel(wav: jax.Array, lengths: jax.Array, consts: Mapping[str, jax.Array], cfg: FCPEConfig) -> jax.Array:
    """(B, L) right-padded float32 waveforms + (B,) lengths → (B, L // hop + 1, n_mels) log-mel.

    Frames at or beyond a row's own ``len // hop + 1`` are garbage; mask them with
    :func:`frame_mask`.
    """
    B, L = wav.shape
    hop, n_fft = cfg.hop_size, cfg.n_fft
    pad_left, pad_right_min = _pads(cfg)
    lengths = lengths.astype(jnp.int32)
    T = L // hop + 1
    # padded signal positions needed by frames 0..T-1
    P = (T - 1) * hop + n_fft
    P = -(-P // hop) * hop  # a multiple of the hop for the strided framing below
    pos = jnp.arange(P, dtype=jnp.int32)[None, :] - pad_left  # (1, P) index into the row
    n = lengths[:, None]
    # torchfcpe: reflect if pad_right < n (pad_right = max(pad_right_min, win - n - pad_left)), else zeros
    pad_right = jnp.maximum(pad_right_min, cfg.win_size - n - pad_left)
    reflect = pad_right < n
    src = jnp.where(pos < 0, -pos, jnp.where(pos >= n, 2 * (n - 1) - pos, pos))
    inside = (pos >= 0) & (pos < n)
    valid = inside | (reflect & (src >= 0) & (src < n))
    src = jnp.clip(jnp.where(inside, pos, src), 0, L - 1)
    padded = jnp.where(valid, jnp.take_along_axis(wav, src, axis=1), 0.0).astype(jnp.float32)
    # frames: frame f = padded[f*hop : f*hop + n_fft], built from ceil(n_fft/hop) hop-sized rows
    rows = padded.reshape(B, P // hop, hop)
    k = -(-n_fft // hop)
    n_rows = P // hop
    assert n_rows == T - 1 + k
    frames = jnp.concatenate([rows[:, j:j + T] for j in range(k)], axis=-1)[..., :n_fft]  # (B, T, n_fft)
    spec = jnp.fft.rfft(frames * consts["window"], n=n_fft, axis=-1)
    mag = jnp.sqrt(jnp.real(spec) ** 2 + jnp.imag(spec) ** 2 + 1e-9)
    with precision_scope(cfg.precision):
        mel = jnp.einsum("btf,mf->btm", mag, consts["mel_basis"])  # (B, T, F) x (M, F)
    logmel = jnp.log(jnp.maximum(mel, cfg.clip_val))
    # STFT frames the original computes for this row; when fewer than len//hop + 1 it appends ONE
    # copy of the last frame (more is impossible at these sizes: it truncates).
    total = n[:, 0] + pad_left + pad_right[:, 0]
    n_stft = (total - n_fft) // hop + 1
    idx = jnp.minimum(jnp.arange(T, dtype=jnp.int32)[None, :], n_stft[:, None] - 1)
    return jnp.take_along_axis(logmel, idx[..., None], axis=1)


def frame_mask(lengths: jax.Array, T: int, hop: int) -> jax.Array:
    """(B, T) bool: frame t is valid for a row of ``len`` samples iff ``t < len // hop + 1``."""
    return jnp.arange(T, dtype=jnp.int32)[None, :] < (lengths.astype(jnp.int32) // hop + 1)[:, None]


# ----------------------------------------------------------------------------------------------
# The network (CFNaiveMelPE, conv-only)
# ----------------------------------------------------------------------------------------------

class LayerNorm(nn.Module):
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("speech_embed",)), (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("speech_embed",)), (c,), jnp.float32)
        mean = jnp.mean(x, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
        return (x - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias


class MaskedGroupNorm(nn.Module):
    """torch GroupNorm over (channels in group × valid frames), biased variance."""

    groups: int
    eps: float = 1e-5

    @nn.compact
    def __call__(self, x, mask):
        B, T, C = x.shape
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("speech_embed",)), (C,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("speech_embed",)), (C,), jnp.float32)
        g = x.reshape(B, T, self.groups, C // self.groups)
        # padding excluded with where, not a float-mask multiply: XLA:CPU reduces g * mask over
        # (time, channels-in-group) ~2x slower at (1 | 16, 1001, 512) (as HuBERT's _masked_time_norm)
        m = mask[:, :, None, None]
        count = jnp.sum(mask, axis=1).astype(x.dtype)[:, None, None, None] * (C // self.groups)
        mean = jnp.sum(jnp.where(m, g, 0.0), axis=(1, 3), keepdims=True) / count
        d = jnp.where(m, g - mean, 0.0)
        var = jnp.sum(d * d, axis=(1, 3), keepdims=True) / count
        y = ((g - mean) * jax.lax.rsqrt(var + self.eps)).reshape(B, T, C)
        return y * scale + bias


class ConformerConv(nn.Module):
    """ConformerConvModule: LN → pw 1→2·inner → GLU → depthwise k31 → SiLU → pw → (residual outside)."""

    dim: int
    expansion: int
    kernel: int

    @nn.compact
    def __call__(self, x, m):
        inner = self.dim * self.expansion
        h = LayerNorm(name="norm")(x)
        h = Conv1d(2 * inner, 1, name="pw1")(h)
        h = h[..., :inner] * jax.nn.sigmoid(h[..., inner:])
        h = h * m  # the depthwise conv must see zeros beyond each row's end (its zero padding)
        h = Conv1d(inner, self.kernel, padding=self.kernel // 2, groups=inner, name="dw")(h)
        h = jax.nn.silu(h)
        return Conv1d(self.dim, 1, name="pw2")(h)


class FCPENet(nn.Module):
    """CFNaiveMelPE (conv_only=True): mel (B, T, n_mels) + frame mask → latent (B, T, out_dims) in (0, 1)."""

    cfg: FCPEConfig

    @nn.compact
    @with_precision(lambda m: m.cfg.precision)
    def __call__(self, mel, mask):
        cfg = self.cfg
        m = mask[..., None].astype(jnp.float32)
        x = mel * m
        x = Conv1d(cfg.hidden_dims, 3, padding=1, name="input_conv0")(x)
        x = MaskedGroupNorm(cfg.groups, name="input_norm")(x, mask)
        x = jax.nn.leaky_relu(x, 0.01) * m
        x = Conv1d(cfg.hidden_dims, 3, padding=1, name="input_conv1")(x) * m
        for i in range(cfg.n_layers):
            x = (x + ConformerConv(cfg.hidden_dims, cfg.expansion, cfg.dw_kernel, name=f"layers_{i}")(x, m)) * m
        x = LayerNorm(name="norm")(x)
        x = Conv1d(cfg.out_dims, 1, name="output_proj")(x)
        return jax.nn.sigmoid(x)


# ----------------------------------------------------------------------------------------------
# Decoding and post-processing
# ----------------------------------------------------------------------------------------------

def local_argmax_f0(latent: jax.Array, cent_table: jax.Array, threshold: float) -> jax.Array:
    """torchfcpe ``latent2cents_local_decoder`` + ``cent_to_f0``: (B, T, D) → f0 Hz (B, T); 0 Hz where
    the max latent ≤ threshold."""
    D = latent.shape[-1]
    confident = jnp.max(latent, axis=-1)
    i_max = jnp.argmax(latent, axis=-1)  # first index on ties, as torch.max
    idx = jnp.clip(i_max[..., None] + jnp.arange(-4, 5), 0, D - 1)  # clamped, NOT de-duplicated
    y_l = jnp.take_along_axis(latent, idx, axis=-1)
    c_l = jnp.asarray(cent_table)[idx]
    cents = jnp.sum(c_l * y_l, axis=-1) / jnp.sum(y_l, axis=-1)
    cents = jnp.where(confident <= threshold, -jnp.inf, cents)
    return 10.0 * jnp.exp2(cents / 1200.0)


def interpolate_unvoiced(f0: jax.Array, uv: jax.Array, valid: jax.Array) -> jax.Array:
    """torchfcpe ``batch_interp_with_replacement_detach`` on each row's valid frames.

    Unvoiced frame u between voiced l < u < r: ``f0[l] + ((u − l)·(f0[r] − f0[l])) / (r − l)`` in
    float32; before the first / after the last voiced frame: that frame's value. Rows without any
    voiced frame are returned unchanged (the caller defines them).
    """
    B, T = f0.shape
    t = jnp.arange(T, dtype=jnp.int32)[None, :]
    voiced = (~uv) & valid
    big = jnp.int32(T + 1)
    last_v = jax.lax.cummax(jnp.where(voiced, t, -1), axis=1)  # voiced index ≤ t
    next_v = jax.lax.cummin(jnp.where(voiced, t, big), axis=1, reverse=True)  # voiced index ≥ t
    first = jnp.min(jnp.where(voiced, t, big), axis=1, keepdims=True)
    last = jnp.max(jnp.where(voiced, t, -1), axis=1, keepdims=True)
    l = jnp.clip(last_v, 0, T - 1)
    r = jnp.clip(next_v, 0, T - 1)
    fl = jnp.take_along_axis(f0, l, axis=1)
    fr = jnp.take_along_axis(f0, r, axis=1)
    den = jnp.maximum(r - l, 1).astype(jnp.float32)
    mid = fl + ((t - l).astype(jnp.float32) * (fr - fl)) / den
    f_first = jnp.take_along_axis(f0, jnp.clip(first, 0, T - 1), axis=1)
    f_last = jnp.take_along_axis(f0, jnp.clip(last, 0, T - 1), axis=1)
    out = jnp.where(t < first, f_first, jnp.where(t > last, f_last, mid))
    return jnp.where(uv & valid, out, f0)


def nearest_index(T_in: jax.Array, T_out: jax.Array, T_max_out: int) -> jax.Array:
    """PyTorch legacy 'nearest' source indices for each row (B,) → (B, T_max_out)."""
    i = jnp.arange(T_max_out, dtype=jnp.int32)[None, :]
    T_in = T_in.astype(jnp.int32)[:, None]
    T_out = T_out.astype(jnp.int32)[:, None]
    scale = T_in.astype(jnp.float32) / T_out.astype(jnp.float32)
    general = jnp.minimum(jnp.floor(i.astype(jnp.float32) * scale).astype(jnp.int32), T_in - 1)
    src = jnp.where(T_out == T_in, i, jnp.where(T_out == 2 * T_in, i >> 1, general))
    return jnp.clip(src, 0, T_in - 1)


def fcpe_f0(params, consts, wav: jax.Array, lengths: jax.Array, cfg: FCPEConfig):
    """The whole Spirit LM FCPE call on a padded batch.

    Returns ``(f0, vuv, latent)``: f0 (B, L//80 + 1) float32 Hz, vuv (same) float32 0/1, both valid
    for ``t < len//80 + 1`` (zero beyond), and the network latent (B, L//160 + 1, out_dims).
    """
    B, L = wav.shape
    T = L // cfg.hop_size + 1
    T2 = L // cfg.out_hop + 1
    lengths = lengths.astype(jnp.int32)
    mask = frame_mask(lengths, T, cfg.hop_size)
    mel = log_mel(wav, lengths, consts, cfg)
    latent = FCPENet(cfg).apply({"params": params["net"]}, mel, mask)
    f0 = local_argmax_f0(latent, consts["cent_table"], cfg.threshold)
    uv = f0 < cfg.f0_min
    any_voiced = jnp.any((~uv) & mask, axis=1, keepdims=True)
    f0 = interpolate_unvoiced(f0, uv, mask)
    f0 = jnp.where(f0 > cfg.f0_max, jnp.float32(cfg.f0_max), f0)
    # fully unvoiced rows: defined as 0 Hz everywhere (the original raises IndexError)
    f0 = jnp.where(any_voiced, f0, 0.0)
    n_in = lengths // cfg.hop_size + 1
    n_out = lengths // cfg.out_hop + 1
    src = nearest_index(n_in, n_out, T2)
    f0_out = jnp.take_along_axis(f0, src, axis=1)
    uv_out = jnp.take_along_axis(uv.astype(jnp.float32), src, axis=1)
    valid2 = jnp.arange(T2, dtype=jnp.int32)[None, :] < n_out[:, None]
    f0_out = jnp.where(valid2, f0_out, 0.0)
    vuv = jnp.where(valid2, 1.0 - uv_out, 0.0)
    return f0_out, vuv, latent


def fcpe_net_init_params(cfg: FCPEConfig, seed: int = 0):
    """Random parameters of the right shapes (tests and benchmarks)."""
    mel = jnp.zeros((1, 8, cfg.n_mels), jnp.float32)
    mask = jnp.ones((1, 8), bool)
    v = FCPENet(cfg).init(jax.random.PRNGKey(seed), mel, mask)
    return nn.meta.unbox(v["params"])
