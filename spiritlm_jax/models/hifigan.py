"""Unit HiFi-GAN vocoder (Spirit LM's ``CodeGenerator``) in Flax: embeddings, duration predictor,
conditioning assembly and the generator. Pure modules, no I/O (loading is in
``spiritlm_jax.converters.hifigan``; the user-facing object is ``spiritlm_jax.vocoder``).

Layout is channels-last: activations are ``(B, T, C)``; conv kernels are ``(k, C_in, C_out)``.

Batching and chunking rest on one rule (REFERENCE §7.4): the original pads every conv input with
zeros at the sequence boundaries. Each row here carries a valid frame range ``[start, end)``; before
every convolution the activations outside that range (at the layer's own time resolution) are set
to zero, so a row of a padded batch, or a window cut out of a longer sequence, sees exactly the
zeros the original sees at its boundaries. Outputs inside the range are therefore the unbatched
outputs; outputs outside it are garbage that the caller crops.

Numerical details that matter (REFERENCE §13, items 25-32):
* leaky-ReLU slope 0.1 in the stages and residual blocks, 0.01 (PyTorch's default) before
  ``conv_post``;
* the residual blocks of a stage are averaged (sum / number of kernels);
* transposed convs use padding ``(k-u)//2`` (the shared polyphase ``layers.conv_transpose1d``);
* durations ``max(1, round_half_even(exp(log_d) - 1))``; the duration predictor's second conv has
  padding 1 whatever its kernel size (so only kernel 3 keeps the length; others are refused).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from spiritlm_jax.models.layers import DEFAULT_PRECISION, Conv1d, check_precision, with_precision

LRELU_SLOPE = 0.1  # every leaky ReLU of the stages and residual blocks
LRELU_SLOPE_POST = 0.01  # the one before conv_post: F.leaky_relu's default (REFERENCE §7.4 step 3)


class HifiGANConfigError(ValueError):
    """config.json describes a vocoder this port cannot build (or an inconsistent one)."""


@dataclasses.dataclass(frozen=True)
class HifiGANConfig:
    upsample_rates: tuple[int, ...]
    upsample_kernel_sizes: tuple[int, ...]
    upsample_initial_channel: int
    resblock_kernel_sizes: tuple[int, ...]
    resblock_dilation_sizes: tuple[tuple[int, ...], ...]
    num_embeddings: int
    embedding_dim: int
    model_in_dim: int = 80
    num_speakers: int = 0  # 0: not multi-speaker
    num_styles: int = 0  # 0: no global style table (Expressive)
    num_f0_tokens: int = 0  # 0: no pitch-code table (Base)
    num_style_tokens: int = 0  # 0: no style-code table (Base)
    hubert_to_f0: int = 0
    hubert_to_style: int = 0
    dur_hidden: int = 0  # 0: no duration predictor
    dur_kernel: int = 3
    # run-time, not from the checkpoint: matmul/conv precision (models/layers.py); the default
    # reproduces the original's durations and waveform on every backend
    precision: str = DEFAULT_PRECISION

    def __post_init__(self):
        check_precision(self.precision, "HifiGANConfig")

    # ---------------------------------------------------------------- derived
    @property
    def hop(self) -> int:
        return int(math.prod(self.upsample_rates))

    @property
    def has_dur_predictor(self) -> bool:
        return self.dur_hidden > 0

    @property
    def cond_dim(self) -> int:
        n = 1 + (self.num_f0_tokens > 0) + (self.num_style_tokens > 0) + (self.num_speakers > 0) + (self.num_styles > 0)
        return n * self.embedding_dim

    def channels(self, i: int) -> int:
        """Channels after upsampling stage i (C_{i+1} of REFERENCE §7.4)."""
        return self.upsample_initial_channel // (2 ** (i + 1))

    def receptive_margin_frames(self) -> int:
        """Frames of context on each side that can influence a frame's output samples (an upper
        bound, from every conv's half-extent at its own rate, plus one frame of slack)."""
        total = 3.0  # conv_pre: kernel 7, padding 3, at the frame rate
        rate = 1
        for u, k in zip(self.upsample_rates, self.upsample_kernel_sizes):
            # transposed conv: an output sample depends on inputs within ceil(k/u) of it (input rate)
            total += math.ceil(k / u) / rate
            rate *= u
            ext = max(
                sum((kk - 1) // 2 * (d + 1) for d in dil)
                for kk, dil in zip(self.resblock_kernel_sizes, self.resblock_dilation_sizes)
            )
            total += ext / rate
        total += 3.0 / rate  # conv_post
        return int(math.ceil(total)) + 1

    # ---------------------------------------------------------------- reading the original
    @classmethod
    def from_original(cls, cfg: Mapping[str, Any]) -> "HifiGANConfig":
        """Build from the original's ``config.json`` dict (fields of REFERENCE §2.6)."""
        where = "hifigan config.json"
        for key in ("upsample_rates", "upsample_kernel_sizes", "upsample_initial_channel",
                    "resblock_kernel_sizes", "resblock_dilation_sizes", "num_embeddings", "embedding_dim"):
            if key not in cfg:
                raise HifiGANConfigError(f"{where}: required field {key!r} is missing")
        if cfg.get("embedder_params"):
            raise HifiGANConfigError(f"{where}: 'embedder_params' (a Linear speaker embedder) is not supported; "
                                     "Spirit LM's vocoders use a speaker embedding table")
        if cfg.get("f0") or cfg.get("f0_quant_num_bin", 0) > 0:
            raise HifiGANConfigError(f"{where}: continuous F0 conditioning ('f0' / 'f0_quant_num_bin') is not "
                                     "supported; Spirit LM's vocoders use pitch codes (num_f0_tokens)")
        ur = tuple(int(v) for v in cfg["upsample_rates"])
        uk = tuple(int(v) for v in cfg["upsample_kernel_sizes"])
        if len(ur) != len(uk) or not ur:
            raise HifiGANConfigError(f"{where}: upsample_rates {ur} and upsample_kernel_sizes {uk} must be "
                                     "non-empty and of equal length")
        for u, k in zip(ur, uk):
            if (k - u) % 2 or k < u:
                raise HifiGANConfigError(f"{where}: upsample kernel {k} with rate {u}: k-u must be even and >= 0 "
                                         "so that each stage multiplies the length exactly by u")
        rk = tuple(int(v) for v in cfg["resblock_kernel_sizes"])
        rd = tuple(tuple(int(d) for d in ds) for ds in cfg["resblock_dilation_sizes"])
        if len(rk) != len(rd) or any(len(d) != 3 for d in rd):
            raise HifiGANConfigError(f"{where}: resblock_dilation_sizes {rd} must give 3 dilations for each of "
                                     f"the resblock_kernel_sizes {rk}")
        if any(k % 2 == 0 for k in rk):
            raise HifiGANConfigError(f"{where}: even residual-block kernel sizes {rk} change the length")
        c0 = int(cfg["upsample_initial_channel"])
        if c0 % (2 ** len(ur)):
            raise HifiGANConfigError(f"{where}: upsample_initial_channel {c0} is not divisible by 2^{len(ur)}")
        multispkr = bool(cfg.get("multispkr"))
        multistyle = bool(cfg.get("multistyle"))
        nf0 = int(cfg.get("num_f0_tokens") or 0)
        nst = int(cfg.get("num_style_tokens") or 0)
        h2f0 = h2st = 0
        if nf0:
            h2f0 = round(cfg["f0_hop_size"] / cfg["code_hop_size"])
        if nst:
            h2st = round(cfg["style_hop_size"] / cfg["code_hop_size"])
        dp = cfg.get("dur_predictor_params") or None
        dur_hidden = dur_kernel = 0
        if dp:
            if int(dp["encoder_embed_dim"]) != int(cfg["embedding_dim"]):
                raise HifiGANConfigError(f"{where}: dur_predictor_params.encoder_embed_dim "
                                         f"{dp['encoder_embed_dim']} != embedding_dim {cfg['embedding_dim']}")
            dur_hidden = int(dp["var_pred_hidden_dim"])
            dur_kernel = int(dp["var_pred_kernel_size"])
        out = cls(
            upsample_rates=ur, upsample_kernel_sizes=uk, upsample_initial_channel=c0,
            resblock_kernel_sizes=rk, resblock_dilation_sizes=rd,
            num_embeddings=int(cfg["num_embeddings"]), embedding_dim=int(cfg["embedding_dim"]),
            model_in_dim=int(cfg.get("model_in_dim", 80)),
            num_speakers=int(cfg.get("num_speakers", 200)) if multispkr else 0,
            num_styles=int(cfg.get("num_styles", 100)) if multistyle else 0,
            num_f0_tokens=nf0, num_style_tokens=nst, hubert_to_f0=h2f0, hubert_to_style=h2st,
            dur_hidden=dur_hidden, dur_kernel=dur_kernel or 3,
        )
        if out.cond_dim != out.model_in_dim:
            raise HifiGANConfigError(
                f"{where}: model_in_dim {out.model_in_dim} != the concatenated conditioning width "
                f"{out.cond_dim} (embedding_dim {out.embedding_dim} x number of tables)")
        return out


# -------------------------------------------------------------------------------------------------
# building blocks


def _mask_from_range(n: int, rate: int, start: jax.Array, end: jax.Array, dtype) -> jax.Array:
    """(B, n, 1) float mask: 1 where start*rate <= t < end*rate."""
    t = jnp.arange(n, dtype=jnp.int32)[None, :]
    m = (t >= (start[:, None] * rate)) & (t < (end[:, None] * rate))
    return m[:, :, None].astype(dtype)


def _leaky(x, slope):
    return jnp.where(x >= 0, x, x * slope)


class ResBlock(nn.Module):
    """HiFi-GAN "type 1" residual block (3 dilated convs, each followed by a dilation-1 conv)."""

    channels: int
    kernel_size: int
    dilations: tuple[int, ...]

    @nn.compact
    def __call__(self, x, mask):
        k = self.kernel_size
        for m, d in enumerate(self.dilations):
            t = _leaky(x, LRELU_SLOPE) * mask
            t = Conv1d(self.channels, k, dilation=d, padding=(k * d - d) // 2, name=f"convs1_{m}")(t)
            t = _leaky(t, LRELU_SLOPE) * mask
            t = Conv1d(self.channels, k, padding=(k - 1) // 2, name=f"convs2_{m}")(t)
            x = x + t
        return x


class Embed(nn.Module):
    num: int
    dim: int

    @nn.compact
    def __call__(self, ids):
        table = self.param(
            "embedding",
            nn.with_logical_partitioning(nn.initializers.normal(1.0), ("codebook", "speech_embed")),
            (self.num, self.dim),
        )
        return jnp.take(table, ids, axis=0)


class DurationPredictor(nn.Module):
    """fairseq VariancePredictor: conv → ReLU → LN → conv(padding 1) → ReLU → LN → Linear."""

    hidden: int
    kernel_size: int

    @nn.compact
    def __call__(self, x, mask):
        k = self.kernel_size
        x = Conv1d(self.hidden, k, padding=(k - 1) // 2, name="conv1")(x * mask)
        x = nn.LayerNorm(epsilon=1e-5, name="ln1")(jax.nn.relu(x))
        x = Conv1d(self.hidden, k, padding=1, name="conv2")(x * mask)  # padding 1 whatever k (original)
        x = nn.LayerNorm(epsilon=1e-5, name="ln2")(jax.nn.relu(x))
        return nn.Dense(1, name="proj")(x)[..., 0]


# -------------------------------------------------------------------------------------------------
# the whole model


class CodeHifiGAN(nn.Module):
    """Spirit LM's CodeGenerator. Two entry points:

    * ``durations(codes, lengths)`` → ``(log_d, d)``: the duration predictor on the unit
      embeddings; ``d = max(1, round_half_even(exp(log_d) − 1))``, 0 past each row's length.
    * ``__call__(codes, f0_codes, style_codes, speaker, style, start, end)`` → waveform
      ``(B, T·hop)``: all id arrays are per FRAME (already repeated by the durations and aligned to
      the unit rate by the caller); ``speaker``/``style`` are ``(B,)``; frames outside
      ``[start, end)`` of a row are treated as the zero padding beyond its boundaries.
    """

    cfg: HifiGANConfig

    def setup(self):
        c = self.cfg
        self.dict = Embed(c.num_embeddings, c.embedding_dim)
        if c.num_f0_tokens:
            self.f0_dict = Embed(c.num_f0_tokens, c.embedding_dim)
        if c.num_style_tokens:
            self.style_dict = Embed(c.num_style_tokens, c.embedding_dim)
        if c.num_speakers:
            self.spkr = Embed(c.num_speakers, c.embedding_dim)
        if c.num_styles:
            self.style = Embed(c.num_styles, c.embedding_dim)
        if c.has_dur_predictor:
            self.dur_predictor = DurationPredictor(c.dur_hidden, c.dur_kernel)
        self.conv_pre = Conv1d(c.upsample_initial_channel, 7, padding=3)
        self.ups = [
            Conv1d(c.channels(i), k, stride=u, padding=(k - u) // 2, transpose=True)
            for i, (u, k) in enumerate(zip(c.upsample_rates, c.upsample_kernel_sizes))
        ]
        self.resblocks = [
            ResBlock(c.channels(i), k, tuple(d))
            for i in range(len(c.upsample_rates))
            for k, d in zip(c.resblock_kernel_sizes, c.resblock_dilation_sizes)
        ]
        self.conv_post = Conv1d(1, 7, padding=3)

    @with_precision(lambda m: m.cfg.precision)
    def durations(self, codes, lengths):
        c = self.cfg
        if not c.has_dur_predictor:
            raise HifiGANConfigError("this vocoder has no duration predictor (config has no dur_predictor_params)")
        if c.dur_kernel != 3:
            raise HifiGANConfigError(
                f"duration predictor kernel {c.dur_kernel}: the original's second conv has padding 1, so only "
                "kernel 3 keeps the sequence length (the original fails in repeat_interleave otherwise)")
        x = self.dict(codes)
        mask = _mask_from_range(codes.shape[1], 1, jnp.zeros_like(lengths), lengths, x.dtype)
        log_d = self.dur_predictor(x, mask)
        d = jnp.maximum(1, jnp.round(jnp.exp(log_d) - 1.0)).astype(jnp.int32)
        d = jnp.where(mask[..., 0] > 0, d, 0)
        return log_d, d

    def conditioning(self, codes, f0_codes, style_codes, speaker, style):
        c = self.cfg
        parts = [self.dict(codes)]
        if c.num_f0_tokens:
            parts.append(self.f0_dict(f0_codes))
        if c.num_style_tokens:
            parts.append(self.style_dict(style_codes))
        t = codes.shape[1]
        if c.num_speakers:
            s = self.spkr(speaker)[:, None, :]
            parts.append(jnp.broadcast_to(s, (s.shape[0], t, s.shape[2])))
        if c.num_styles:
            s = self.style(style)[:, None, :]
            parts.append(jnp.broadcast_to(s, (s.shape[0], t, s.shape[2])))
        return jnp.concatenate(parts, axis=-1)

    @with_precision(lambda m: m.cfg.precision)
    def generate(self, x, start, end):
        """Generator on conditioning (B, T, model_in_dim) → (B, T·hop)."""
        c = self.cfg
        nk = len(c.resblock_kernel_sizes)
        rate = 1
        x = self.conv_pre(x * _mask_from_range(x.shape[1], rate, start, end, x.dtype))
        for i, u in enumerate(c.upsample_rates):
            x = _leaky(x, LRELU_SLOPE) * _mask_from_range(x.shape[1], rate, start, end, x.dtype)
            x = self.ups[i](x)
            rate *= u
            mask = _mask_from_range(x.shape[1], rate, start, end, x.dtype)
            xs = None
            for j in range(nk):
                y = self.resblocks[i * nk + j](x, mask)
                xs = y if xs is None else xs + y
            x = xs / nk
        x = _leaky(x, LRELU_SLOPE_POST) * _mask_from_range(x.shape[1], rate, start, end, x.dtype)
        x = self.conv_post(x)
        return jnp.tanh(x)[..., 0]

    def __call__(self, codes, f0_codes, style_codes, speaker, style, start, end):
        x = self.conditioning(codes, f0_codes, style_codes, speaker, style)
        return self.generate(x, start, end)

    def init_all(self, codes, f0_codes, style_codes, speaker, style, start, end):
        """Touches every parameter (for ``init``)."""
        out = self(codes, f0_codes, style_codes, speaker, style, start, end)
        if self.cfg.has_dur_predictor:
            self.durations(codes, end)
        return out


def init_params(cfg: HifiGANConfig, seed: int = 0, frames: int = 4) -> dict:
    """Random parameters (plain nested dict) of the right shapes, e.g. for tests and benchmarks."""
    model = CodeHifiGAN(cfg)
    z = jnp.zeros((1, frames), jnp.int32)
    b = jnp.zeros((1,), jnp.int32)
    variables = model.init(jax.random.PRNGKey(seed), z, z, z, b, b, b, b + frames, method=CodeHifiGAN.init_all)
    return nn.meta.unbox(variables["params"])


def param_count(params) -> int:
    return int(sum(np.prod(v.shape) for v in jax.tree_util.tree_leaves(params)))


def generator_flops(cfg: HifiGANConfig, frames: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of the generator for ``frames`` frames (the useful work: the
    transposed convs counted at k taps per input sample)."""
    f = 2.0 * cfg.model_in_dim * cfg.upsample_initial_channel * 7 * frames
    n = frames
    cin = cfg.upsample_initial_channel
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        cout = cfg.channels(i)
        f += 2.0 * cin * cout * k * n
        n *= u
        taps = sum(6 * kk for kk in cfg.resblock_kernel_sizes)
        f += 2.0 * cout * cout * taps * n
        cin = cout
    f += 2.0 * cin * 1 * 7 * n
    return f
