"""Layers every model shares: the one Conv1d (and its transposed form), and the matmul-precision rule.

Precision is part of the model, not of the environment. Each component's config carries a
``precision`` field; the component's entry points trace their math inside :func:`precision_scope`,
so every contraction (dots, einsums, convolutions) gets that precision written into it whatever
``jax_default_matmul_precision`` the user's process has. The default, ``"float32"``, is true fp32
on every backend (no TF32 on GPU, no single bf16 pass on TPU): what reproduces the original's
discrete outputs (HuBERT units, pitch codes, style units, vocoder durations, greedy LM ids).
``"tensorfloat32"`` and ``"bfloat16"`` trade that for speed on accelerators (XLA:CPU ignores them).

Conv1d is channels-last: activations (B, T, C), kernels (k, C_in / groups, C_out) — the torch
weight (C_out, C_in / groups, k) with its tap axis moved first. One formulation per case, chosen by
measurement on XLA:CPU (see bench/conv_bench.py):

* k = 1: one dot (``'btc,cd->btd'``);
* depthwise (groups = C_in = C_out): a fused sum of k shifted products — XLA:CPU's grouped
  convolution runs ~15x slower on FCPE's (16, 1001, 1024) k = 31 shape;
* other grouped convs (2 ≤ groups ≤ 32): one ordinary conv per group on its channel slice,
  concatenated — bit-identical to ``feature_group_count`` and faster on XLA:CPU (HuBERT's positional
  conv, 768 ch, 16 groups, k = 128, 250 frames: 42 → 27 ms at batch 1, 236 → 159 ms at batch 8);
* everything else: ``lax.conv_general_dilated`` (XLA:CPU hands it to its Eigen/oneDNN kernel).

ConvTranspose1d is written as a polyphase ordinary conv (no work on the zeros a dilated-input
formulation would multiply).
"""
from __future__ import annotations

import contextlib
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# config value -> the name jax.default_matmul_precision takes
PRECISIONS = ("float32", "tensorfloat32", "bfloat16")
DEFAULT_PRECISION = "float32"


class PrecisionError(ValueError):
    """A ``precision`` setting that is not one of :data:`PRECISIONS`."""


def check_precision(value: str, where: str) -> str:
    """``value`` if it is a known precision setting, else a :class:`PrecisionError` naming ``where``."""
    if value not in PRECISIONS:
        raise PrecisionError(
            f"{where}: precision={value!r} is not supported; use one of {list(PRECISIONS)} "
            f"('float32' reproduces the original's outputs; the others are faster on GPU/TPU)")
    return value


def precision_scope(value: str):
    """Context in which every traced contraction gets ``value``'s precision (see module doc)."""
    return jax.default_matmul_precision(check_precision(value, "precision_scope"))


def with_precision(precision_of):
    """Method decorator: trace the method's body in ``precision_scope(precision_of(self))``.

    ``precision_of`` reads the setting from the module, e.g. ``lambda m: m.cfg.precision``. Put it
    UNDER ``@nn.compact`` (functools.wraps keeps the method's flax markers)."""
    def decorate(method):
        @functools.wraps(method)
        def wrapped(self, *args, **kwargs):
            with precision_scope(precision_of(self)):
                return method(self, *args, **kwargs)
        return wrapped
    return decorate


@contextlib.contextmanager
def global_matmul_precision(value: str | None):
    """Set (or unset, with None) the PROCESS-wide ``jax_default_matmul_precision`` for a block and
    restore it afterwards: what the precision tests and benchmarks vary."""
    old = jax.config.jax_default_matmul_precision
    jax.config.update("jax_default_matmul_precision", value)
    try:
        yield
    finally:
        jax.config.update("jax_default_matmul_precision", old)


# ------------------------------------------------------------------------------------------ conv

def _pair(padding: int | tuple[int, int]) -> tuple[int, int]:
    return (padding, padding) if isinstance(padding, int) else (int(padding[0]), int(padding[1]))


# grouped convs with at most this many groups run as one ordinary conv per group (see module doc);
# more groups (small slices) stay one feature_group_count conv
_SPLIT_MAX_GROUPS = 32


def conv1d(x: Array, kernel: Array, *, stride: int = 1, padding: int | tuple[int, int] = 0,
           dilation: int = 1, groups: int = 1) -> Array:
    """torch ``F.conv1d`` (cross-correlation, zero padding) on channels-last arrays.

    x (B, T, C_in), kernel (k, C_in / groups, C_out) → (B, T_out, C_out) with
    T_out = (T + left + right − dilation·(k − 1) − 1) // stride + 1.
    """
    k, cin_g, cout = kernel.shape
    cin = x.shape[-1]
    if cin != cin_g * groups:
        raise ValueError(f"conv1d: input has {cin} channels; the kernel expects {cin_g} x {groups} groups")
    kernel = kernel.astype(x.dtype)
    left, right = _pair(padding)
    if k == 1 and groups == 1 and stride == 1:
        if left or right:
            x = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
        return jnp.einsum("btc,cd->btd", x, kernel[0])  # (B, T, C_in) x (C_in, C_out)
    if groups == cin == cout and stride == 1:
        return _depthwise(x, kernel[:, 0, :], left, right, dilation)
    if 1 < groups <= _SPLIT_MAX_GROUPS:
        if cout % groups:
            raise ValueError(f"conv1d: {cout} output channels are not divisible by {groups} groups")
        og = cout // groups
        return jnp.concatenate(
            [conv1d(x[..., g * cin_g:(g + 1) * cin_g], kernel[..., g * og:(g + 1) * og], stride=stride,
                    padding=(left, right), dilation=dilation) for g in range(groups)], axis=-1)
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=(stride,), padding=[(left, right)], rhs_dilation=(dilation,),
        dimension_numbers=("NWC", "WIO", "NWC"), feature_group_count=groups)


def _depthwise(x: Array, taps: Array, left: int, right: int, dilation: int) -> Array:
    """Depthwise conv as Σ_j x[t + j·d] · taps[j]: x (B, T, C), taps (k, C)."""
    k = taps.shape[0]
    xp = jnp.pad(x, ((0, 0), (left, right), (0, 0)))
    t_out = xp.shape[1] - dilation * (k - 1)
    y = xp[:, 0:t_out] * taps[0]
    for j in range(1, k):
        y = y + xp[:, j * dilation:j * dilation + t_out] * taps[j]
    return y


def conv_transpose1d(x: Array, kernel: Array, *, stride: int, padding: int) -> Array:
    """torch ``F.conv_transpose1d`` (no output padding) on channels-last arrays, polyphase.

    x (B, T, C_in), kernel (k, C_in, C_out) (torch's (C_in, C_out, k) with the tap axis first) →
    (B, (T − 1)·u − 2p + k, C_out). With A = ceil(k/u) and the kernel zero-padded to A·u taps,
    ``z[q·u + r] = Σ_a x[q − a] · w[r + a·u]`` is ONE ordinary conv of x (left-padded by A − 1) with
    an (A, C_in, u·C_out) kernel; the output is ``y[n] = z[n + p]``.
    """
    k, cin, cout = kernel.shape
    u, p = stride, padding
    a_taps = -(-k // u)
    w = jnp.pad(kernel.astype(x.dtype), ((0, a_taps * u - k), (0, 0), (0, 0)))
    w = w.reshape(a_taps, u, cin, cout)[::-1]  # tap t <-> a = A-1-t
    w = w.transpose(0, 2, 1, 3).reshape(a_taps, cin, u * cout)  # (A, C_in, u·C_out)
    length = x.shape[1]
    n_out = (length - 1) * u - 2 * p + k
    if n_out <= 0:
        raise ValueError(f"conv_transpose1d: {length} input frames give no output (k={k}, stride={u}, padding={p})")
    q = (n_out - 1 + p) // u + 1  # z positions needed
    right = max(0, q - length)
    z = jax.lax.conv_general_dilated(
        x, w, window_strides=(1,), padding=[(a_taps - 1, right)], dimension_numbers=("NWC", "WIO", "NWC"))
    z = z[:, :q].reshape(x.shape[0], q * u, cout)
    return z[:, p:p + n_out]


class Conv1d(nn.Module):
    """torch ``nn.Conv1d`` / ``nn.ConvTranspose1d`` (``transpose=True``) as one linen module.

    Parameters: ``kernel`` (k, C_in / groups, C_out) [conv_kernel, conv_in, conv_out] and, with
    ``use_bias``, ``bias`` (C_out,) [conv_out]; kept in float32, applied in the input's dtype."""

    features: int
    kernel_size: int
    stride: int = 1
    padding: int | tuple[int, int] = 0
    dilation: int = 1
    groups: int = 1
    use_bias: bool = True
    transpose: bool = False

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cin = x.shape[-1]
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("conv_kernel", "conv_in", "conv_out")),
            (self.kernel_size, cin // self.groups, self.features), jnp.float32)
        if self.transpose:
            if self.groups != 1 or self.dilation != 1 or not isinstance(self.padding, int):
                raise ValueError("Conv1d(transpose=True) supports groups=1, dilation=1 and symmetric padding only")
            y = conv_transpose1d(x, kernel, stride=self.stride, padding=self.padding)
        else:
            y = conv1d(x, kernel, stride=self.stride, padding=self.padding, dilation=self.dilation,
                       groups=self.groups)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("conv_out",)),
                              (self.features,), jnp.float32)
            y = y + bias.astype(y.dtype)
        return y
