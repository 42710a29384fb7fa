"""The weight-layout transforms between PyTorch checkpoints and our Flax parameters, each with its
inverse, in ONE place (every converter's table uses these; the exporters run them backwards).

Layouts (torch → ours):

* ``LINEAR``       nn.Linear weight (out, in)               → kernel (in, out)
* ``CONV1D``       nn.Conv1d weight (out, in/groups, k)     → kernel (k, in/groups, out)
* ``CONV_T1D``     nn.ConvTranspose1d weight (in, out, k)   → kernel (k, in, out)
* ``LINEAR_AS_CONV`` nn.Linear weight (out, in)             → kernel (1, in, out) (a k=1 conv)
* ``weight_norm(inner, dim)``  the pair (g, v) of torch's weight norm → ``inner(g · v / ‖v‖)``, the norm
  over every axis but ``dim``, computed in float64 and rounded ONCE to float32. The inverse stores
  ``v = w`` and ``g = ‖w‖``, so folding it again gives ``w`` back to fp32 rounding (the pair itself is not
  unique: only the folded weight is a parity target).
* ``heads_in(n, d)`` / ``heads_out(n, d)``  attention projections (n·d, E) → (E, n, d) and
  (E, n·d) → (n, d, E)
* ``COPY`` / ``COPY_F32``  as stored / cast to float32 (the speech models run in float32)
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Transform:
    """``forward(*original arrays) -> ours``; ``inverse(ours) -> tuple of original arrays`` (same order)."""

    name: str
    forward: Callable[..., np.ndarray]
    inverse: Callable[[np.ndarray], tuple[np.ndarray, ...]]


def _contig(a) -> np.ndarray:
    return np.ascontiguousarray(a)


COPY = Transform("copy", lambda a: np.asarray(a), lambda w: (np.asarray(w),))
COPY_F32 = Transform("copy", lambda a: np.asarray(a, np.float32), lambda w: (np.asarray(w),))
LINEAR = Transform("linear", lambda a: _contig(np.asarray(a).T), lambda w: (_contig(np.asarray(w).T),))
LINEAR_F32 = Transform("linear", lambda a: _contig(np.asarray(a, np.float32).T), lambda w: (_contig(np.asarray(w).T),))
CONV1D = Transform("conv", lambda a: _contig(np.asarray(a, np.float32).transpose(2, 1, 0)),
                   lambda w: (_contig(np.asarray(w).transpose(2, 1, 0)),))
CONV_T1D = Transform("convT", lambda a: _contig(np.asarray(a, np.float32).transpose(2, 0, 1)),
                     lambda w: (_contig(np.asarray(w).transpose(1, 2, 0)),))
LINEAR_AS_CONV = Transform("linear_as_conv", lambda a: _contig(np.asarray(a, np.float32).T[None]),
                           lambda w: (_contig(np.asarray(w)[0].T),))


def fold_weight_norm(g: np.ndarray, v: np.ndarray, dim: int) -> np.ndarray:
    """torch weight norm ``w = g · v / ‖v‖`` (norm over every axis except ``dim``), in float64, rounded
    once to float32."""
    v64 = np.asarray(v, np.float64)
    axes = tuple(i for i in range(v64.ndim) if i != dim)
    norm = np.sqrt(np.sum(v64 * v64, axis=axes, keepdims=True))
    return (np.asarray(g, np.float64) * v64 / norm).astype(np.float32)


def weight_norm(inner: Transform, dim: int, g_shape: Callable[[tuple[int, ...]], tuple[int, ...]] | None = None) -> Transform:
    """The (weight_g, weight_v) pair of a weight-normed layer, folded, then ``inner``'s layout change.

    ``g_shape``: the stored shape of g from v's shape (default: v's shape with 1 on every axis but
    ``dim``; FCPE's Linear stores (out, 1))."""

    def g_of(v_shape):
        return g_shape(v_shape) if g_shape else tuple(n if i == dim else 1 for i, n in enumerate(v_shape))

    def forward(g, v):
        return inner.forward(fold_weight_norm(g, v, dim))

    def inverse(w):
        (v,) = inner.inverse(w)
        v = np.asarray(v, np.float32)
        axes = tuple(i for i in range(v.ndim) if i != dim)
        g = np.sqrt(np.sum(np.asarray(v, np.float64) ** 2, axis=axes)).astype(np.float32)
        return g.reshape(g_of(v.shape)), _contig(v)

    return Transform(f"weight_norm({inner.name})", forward, inverse)


def heads_in(n_heads: int, head_dim: int) -> Transform:
    """q/k/v projection (n·d, E) → (E, n, d)."""

    def forward(w):
        w = np.asarray(w)
        return _contig(w.T.reshape(w.shape[1], n_heads, head_dim))

    def inverse(w):
        w = np.asarray(w)
        return (_contig(w.reshape(w.shape[0], n_heads * head_dim).T),)

    return Transform("heads_in", forward, inverse)


def heads_out(n_heads: int, head_dim: int) -> Transform:
    """output projection (E, n·d) → (n, d, E)."""

    def forward(w):
        w = np.asarray(w)
        return _contig(w.T.reshape(n_heads, head_dim, w.shape[0]))

    def inverse(w):
        w = np.asarray(w)
        return (_contig(w.reshape(n_heads * head_dim, w.shape[-1]).T),)

    return Transform("heads_out", forward, inverse)
