"""Converters for the HuBERT quantizers and the parity runner for ``quantizer_*`` golden cases.

* ``L11_quantizer_500.pt``: ``{model_cfg: {vocab_size, dim, upstream_dim}, model_weight: state dict of
  a 5-element nn.Sequential (keys 0.*, 2.*, 4.*)}`` (REFERENCE.md §2.3). The widths are computed with
  the original's formula from ``model_cfg`` and every tensor's shape is checked against them.
* k-means (optional in the original): ``{cluster_centers: [K, d], n_clusters: K}``. The original
  cannot load this under torch ≥ 2.6 when the centers are numpy arrays (weights_only rejects them);
  here torch tensors load as is, numpy-pickled centers load when the numpy reconstruction classes are
  explicitly allowed (:data:`KMEANS_NUMPY_CLASSES`), and a plain ``.npy`` of centers is accepted too.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np

from spiritlm_jax.converters import torch_io
from spiritlm_jax.converters.schema import Row, import_state_dict
from spiritlm_jax.converters.torch_io import CheckpointError, check_shape
from spiritlm_jax.converters.transforms import COPY_F32, LINEAR_F32
from spiritlm_jax.models.quantizer import KmeansConfig, LinearQuantizerConfig

# What torch.load needs to rebuild a numpy array inside a weights_only pickle (opt-in only).
KMEANS_NUMPY_CLASSES = ("numpy.core.multiarray._reconstruct", "numpy.ndarray", "numpy.dtype")


def convert_linear_quantizer(path: str | os.PathLike, *, allow_classes: Iterable[str] = ()) -> tuple[LinearQuantizerConfig, dict]:
    where = str(path)
    ck = torch_io.torch_load(path, allow_classes=allow_classes)
    if not isinstance(ck, Mapping) or "model_cfg" not in ck or "model_weight" not in ck:
        found = sorted(ck) if isinstance(ck, Mapping) else type(ck).__name__
        raise CheckpointError(f"{where}: not a linear quantizer checkpoint: expected keys model_cfg and model_weight, found {found}")
    mc = ck["model_cfg"]
    miss = [k for k in ("vocab_size", "dim", "upstream_dim") if k not in mc]
    if miss:
        raise CheckpointError(f"{where}: model_cfg lacks {miss}")
    cfg = LinearQuantizerConfig.from_model_cfg(mc)
    if min(cfg.widths) <= 0:
        raise CheckpointError(f"{where}: model_cfg {dict(mc)} gives non-positive layer widths {cfg.widths}")
    sd = torch_io.state_dict_to_numpy(ck["model_weight"])
    return cfg, import_state_dict(linear_quantizer_rows(cfg), sd, where=where)


def linear_quantizer_rows(cfg: LinearQuantizerConfig) -> list[Row]:
    """nn.Sequential(Linear, LeakyReLU, Linear, LeakyReLU, Linear): keys 0.*, 2.*, 4.* (REFERENCE §2.3)."""
    rows = []
    for i in range(len(cfg.widths) - 1):
        rows.append(Row.one((f"dense_{i}_kernel",), f"{2 * i}.weight", (cfg.widths[i + 1], cfg.widths[i]), LINEAR_F32))
        rows.append(Row.one((f"dense_{i}_bias",), f"{2 * i}.bias", (cfg.widths[i + 1],), COPY_F32))
    return rows


def kmeans_rows(cfg: KmeansConfig) -> list[Row]:
    return [Row.one(("centers",), "cluster_centers", (cfg.n_clusters, cfg.dim), COPY_F32)]


def convert_kmeans(path: str | os.PathLike, *, allow_classes: Iterable[str] = ()) -> tuple[KmeansConfig, dict]:
    where = str(path)
    p = Path(path)
    if p.suffix == ".npy":
        if not p.exists():
            raise CheckpointError(f"k-means file not found: {p}")
        centers = np.load(p, allow_pickle=False)
        k = centers.shape[0] if centers.ndim == 2 else -1
    else:
        ck = torch_io.torch_load(path, allow_classes=allow_classes)
        if not isinstance(ck, Mapping) or "cluster_centers" not in ck or "n_clusters" not in ck:
            raise CheckpointError(f"{where}: not a valid k-means checkpoint (needs cluster_centers and n_clusters)")
        c = ck["cluster_centers"]
        centers = torch_io.to_numpy(c) if hasattr(c, "detach") else np.asarray(c)
        k = int(ck["n_clusters"])
    if centers.ndim != 2:
        raise CheckpointError(f"{where}: cluster_centers must be 2-D [K, d], got shape {centers.shape}")
    check_shape("cluster_centers", centers, (k, centers.shape[1]), where=where)
    cfg = KmeansConfig(n_clusters=k, dim=int(centers.shape[1]))
    return cfg, import_state_dict(kmeans_rows(cfg), {"cluster_centers": centers}, where=where)


# ------------------------------------------------------------------------------------------------
# Parity runner (``spiritlm-jax parity GOLDEN --only quantizer_``)
# ------------------------------------------------------------------------------------------------

def parity_cases(gs, case: str):
    import jax.numpy as jnp

    from spiritlm_jax.converters.parity import compare_exact, not_implemented
    from spiritlm_jax.models.quantizer import LinearQuantizer, fill_blanks, logits_to_raw_units

    ckpt = gs.checkpoints / "speech_tokenizer" / "hubert_25hz" / "L11_quantizer_500.pt"
    cfg, params = gs.cached("linear_quantizer", lambda: convert_linear_quantizer(ckpt))
    z = gs.npz(case)
    name = case[:-4] if case.endswith(".npz") else case
    if name != "quantizer_blank_edgecases":
        yield not_implemented(case, "*", "unknown quantizer case file")
        return
    yield compare_exact(case, "blank_id", cfg.blank_id, z["blank_id"])

    def quantize(feats):
        logits = LinearQuantizer(cfg).apply({"params": params}, jnp.asarray(feats))
        raw = logits_to_raw_units(logits)
        return np.asarray(raw), np.asarray(fill_blanks(raw, cfg.blank_id))

    raw, codes = quantize(z["feats_pattern"])
    pattern = "".join("B" if r == cfg.blank_id else "x" for r in raw[0])
    yield compare_exact(case, "pattern(raw argmax)", pattern, str(z["pattern"]))
    yield compare_exact(case, "codes_pattern", codes, z["codes_pattern"])
    _, codes_b = quantize(z["feats_all_blank"])
    yield compare_exact(case, "codes_all_blank", codes_b, z["codes_all_blank"])
