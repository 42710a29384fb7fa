"""k-means in JAX: Lloyd iterations over mini-batches, sharded over the mesh, deterministic for a seed.

Why our own: the tokenizer's k-means (``models/quantizer.KmeansQuantizer``) runs inside our jitted
speech tokenizer, and the features that train it come out of the same JAX encoder on the same mesh;
scikit-learn's ``KMeans`` (the usual tool, and our oracle in the tests) would pull every feature to
one host and one process. ``MiniBatchKMeans`` is a different algorithm (stochastic centre updates)
whose result depends on batch order; here every iteration is an EXACT Lloyd step — the E-step and the
per-cluster sums are computed one mini-batch at a time (bounded memory) and summed — so the result
does not depend on the batch size or on the number of devices, up to float32 summation order.

* init: k-means++ (Arthur & Vassilvitskii 2007; greedy variant with ``2 + ln k`` candidates per step,
  as scikit-learn) on a seeded subsample of at most ``init_samples`` points, in float64 numpy;
* each iteration: for every mini-batch (rows sharded over the mesh's batch axes, centres replicated),
  ``argmin_k ‖x‖² − 2 x·c_k + ‖c_k‖²`` (first index on ties, the quantizer's rule), then one-hot sums
  ``Σ x`` and counts per cluster (XLA all-reduces them over the devices); the new centre is the mean; a
  cluster that lost all its points keeps its previous centre;
* stop when the squared centre shift, relative to the data variance, is ≤ ``tol`` (scikit-learn's
  criterion) or after ``max_iter`` iterations; the reported inertia is Σ min distance² under the
  FINAL centres.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

__all__ = ["KmeansError", "KmeansResult", "kmeans_plus_plus", "fit_kmeans", "assign", "inertia"]


class KmeansError(ValueError):
    """Bad k-means input (too few points for k, non-finite features, bad options)."""


@dataclasses.dataclass
class KmeansResult:
    centers: np.ndarray  # (K, D) float32
    inertia: float  # Σ_i min_k ‖x_i − c_k‖² under the final centres
    n_iter: int
    converged: bool
    history: list  # inertia (under the centres of the E-step) per iteration


def kmeans_plus_plus(x: np.ndarray, k: int, seed: int, *, init_samples: int = 20_000) -> np.ndarray:
    """Greedy k-means++ on a seeded subsample (float64 numpy): (K, D) float32 initial centres."""
    rng = np.random.default_rng(seed)
    n = len(x)
    sub = x if n <= init_samples else x[np.sort(rng.choice(n, init_samples, replace=False))]
    sub = np.asarray(sub, np.float64)
    m = len(sub)
    n_trials = 2 + int(math.log(k))
    sq = np.einsum("nd,nd->n", sub, sub)
    centers = np.empty((k, sub.shape[1]), np.float64)
    first = int(rng.integers(m))
    centers[0] = sub[first]
    closest = np.maximum(sq - 2 * sub @ centers[0] + sq[first], 0.0)
    for c in range(1, k):
        total = closest.sum()
        if total <= 0:  # fewer distinct points than clusters: duplicate centres, handled by the caller
            centers[c:] = sub[rng.integers(m, size=k - c)]
            break
        cand = np.searchsorted(np.cumsum(closest), rng.random(n_trials) * total)
        cand = np.minimum(cand, m - 1)
        d_cand = np.maximum(sq[cand][:, None] - 2 * sub[cand] @ sub.T + sq[None, :], 0.0)  # (trials, m)
        pot = np.minimum(closest[None, :], d_cand).sum(axis=1)
        best = int(np.argmin(pot))
        centers[c] = sub[cand[best]]
        closest = np.minimum(closest, d_cand[best])
    return centers.astype(np.float32)


def _distances(x, c):
    # x (B, D), c (K, D) → (B, K) squared distances ‖x‖² − 2 x·c + ‖c‖²
    return (jnp.sum(x * x, axis=-1, keepdims=True) - 2.0 * jnp.einsum("bd,kd->bk", x, c)
            + jnp.sum(c * c, axis=-1)[None, :])


@jax.jit
def _batch_stats(centers, x, w):
    """One mini-batch: per-cluster sums (K, D), counts (K,), weighted inertia; w = 0 marks padding rows."""
    d = _distances(x, centers)  # (B, K)
    lab = jnp.argmin(d, axis=-1)  # (B,)
    dmin = jnp.maximum(jnp.take_along_axis(d, lab[:, None], axis=-1)[:, 0], 0.0)
    onehot = jax.nn.one_hot(lab, centers.shape[0], dtype=jnp.float32) * w[:, None]  # (B, K)
    sums = jnp.einsum("bk,bd->kd", onehot, x)  # (K, D)
    return sums, jnp.sum(onehot, axis=0), jnp.sum(dmin * w)


@jax.jit
def _batch_assign(centers, x):
    d = _distances(x, centers)
    lab = jnp.argmin(d, axis=-1)
    return lab.astype(jnp.int32), jnp.maximum(jnp.take_along_axis(d, lab[:, None], axis=-1)[:, 0], 0.0)


class _Batches:
    """Fixed mini-batches of the data (the last padded with weight-0 rows), placed on the mesh."""

    def __init__(self, x: np.ndarray, batch_size: int, mesh: Mesh | None):
        self.x = x
        self.mesh = mesh
        n_dev = 1
        if mesh is not None:
            from spiritlm_jax.sharding import logical_spec

            self.spec = logical_spec("batch", None)
            axes = self.spec[0] if isinstance(self.spec[0], tuple) else (self.spec[0],)
            n_dev = int(np.prod([mesh.shape[a] for a in axes if a is not None]))
        self.batch_size = -(-int(batch_size) // n_dev) * n_dev  # whole rows per device
        self.n_dev = n_dev

    def __iter__(self):
        n, bs = len(self.x), self.batch_size
        for s in range(0, n, bs):
            xb = self.x[s:s + bs]
            w = np.ones(len(xb), np.float32)
            if len(xb) < bs:
                xb = np.concatenate([xb, np.zeros((bs - len(xb), xb.shape[1]), np.float32)])
                w = np.concatenate([w, np.zeros(bs - len(w), np.float32)])
            if self.mesh is not None:
                yield (jax.device_put(xb, NamedSharding(self.mesh, self.spec)),
                       jax.device_put(w, NamedSharding(self.mesh, P(self.spec[0]))))
            else:
                yield jnp.asarray(xb), jnp.asarray(w)


def _check(x: np.ndarray, k: int) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise KmeansError(f"k-means needs a (points, dims) feature matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise KmeansError("the features contain NaN or inf; check the audio and the feature extractor")
    if not (isinstance(k, (int, np.integer)) and k >= 1):
        raise KmeansError(f"the number of clusters must be a positive integer, got {k!r}")
    if len(x) < k:
        raise KmeansError(f"{len(x)} feature frames cannot make {k} clusters: give more audio or fewer units")
    return x


def fit_kmeans(x: np.ndarray, k: int, *, seed: int = 0, max_iter: int = 100, tol: float = 1e-4,
               batch_size: int = 8192, mesh: Mesh | None = None, init: np.ndarray | None = None,
               init_samples: int = 20_000, progress: Callable[[int, float], None] | None = None) -> KmeansResult:
    """Lloyd k-means on ``x`` (N, D); see the module docstring. ``init``: given initial centres (K, D)."""
    x = _check(x, k)
    if init is None:
        centers = kmeans_plus_plus(x, k, seed, init_samples=init_samples)
    else:
        centers = np.asarray(init, np.float32)
        if centers.shape != (k, x.shape[1]):
            raise KmeansError(f"init centres have shape {centers.shape}, expected {(k, x.shape[1])}")
    batches = _Batches(x, batch_size, mesh)
    rep = NamedSharding(mesh, P()) if mesh is not None else None
    tol_abs = float(tol) * float(np.mean(np.var(x, axis=0)))
    history: list[float] = []
    converged = False
    it = 0
    for it in range(1, max_iter + 1):
        c_dev = jax.device_put(centers, rep) if rep is not None else jnp.asarray(centers)
        sums = np.zeros((k, x.shape[1]), np.float64)
        counts = np.zeros(k, np.float64)
        total = 0.0
        for xb, wb in batches:
            s, c, i = jax.device_get(_batch_stats(c_dev, xb, wb))
            sums += s
            counts += c
            total += float(i)
        history.append(total)
        new = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], centers).astype(np.float32)
        shift = float(np.sum((new - centers) ** 2))
        centers = new
        if progress is not None:
            progress(it, total)
        if shift <= tol_abs:
            converged = True
            break
    return KmeansResult(centers, inertia(x, centers, batch_size=batch_size, mesh=mesh), it, converged, history)


def assign(x: np.ndarray, centers: np.ndarray, *, batch_size: int = 8192, mesh: Mesh | None = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """(labels (N,) int32, squared distances (N,)) of every point to its nearest centre."""
    x = np.asarray(x, np.float32)
    batches = _Batches(x, batch_size, mesh)
    c = jax.device_put(np.asarray(centers, np.float32), NamedSharding(mesh, P()) if mesh is not None else None)
    labs, dists = [], []
    for xb, _ in batches:
        lab, d = jax.device_get(_batch_assign(c, xb))
        labs.append(lab)
        dists.append(d)
    return np.concatenate(labs)[:len(x)], np.concatenate(dists)[:len(x)]


def inertia(x: np.ndarray, centers: np.ndarray, **kw) -> float:
    return float(np.sum(assign(x, centers, **kw)[1], dtype=np.float64))
