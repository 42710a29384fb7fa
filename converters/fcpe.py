"""torchfcpe 0.0.4's bundled FCPE checkpoint (``torchfcpe/assets/fcpe_c_v001.pt``) → JAX params.

The file is a torch zip holding ``{"global_step", "model" (state dict), "config_dict"}``; it loads
with ``torch.load(weights_only=True)`` (no class needs allowing). Only the file is read: the torchfcpe
package is never imported (it imports torchaudio, which must stay out of the environment), so
:func:`find_bundled_weights` locates the file through the installed package's metadata.

Transforms: Conv1d weights (out, in/groups, k) → (k, in/groups, out); the weight-normed output Linear
is folded ``w = v · (g / ‖v‖₂)`` row-wise (torch's ``_weight_norm`` with dim 0) and transposed.
Unused by the conv-only network and deliberately dropped: each layer's ``norm`` (attention is
disabled) and ``gaussian_blurred_cent_mask`` (training only). ``cent_table`` is kept as stored.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from spiritlm_jax.converters.torch_io import CheckpointError, check_keys, check_shape, to_numpy, torch_load
from spiritlm_jax.models.fcpe import FCPEConfig, frontend_constants

BUNDLED_RELPATH = ("assets", "fcpe_c_v001.pt")
IGNORED = [r"net\.encoder_layers\.\d+\.norm\.(weight|bias)", r"gaussian_blurred_cent_mask"]


def find_bundled_weights() -> Path:
    """Path of ``fcpe_c_v001.pt`` inside an installed torchfcpe (found without importing it)."""
    spec = importlib.util.find_spec("torchfcpe")
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(
            "torchfcpe is not installed, so its bundled FCPE weights (assets/fcpe_c_v001.pt) cannot be "
            "found. Install exactly version 0.0.4 WITHOUT its dependencies (it would pull torchaudio, "
            "which breaks torch 2.13): pip install --no-deps torchfcpe==0.0.4 — or pass the .pt path."
        )
    for loc in spec.submodule_search_locations:
        p = Path(loc).joinpath(*BUNDLED_RELPATH)
        if p.exists():
            return p
    raise CheckpointError(f"torchfcpe is installed at {list(spec.submodule_search_locations)} but has no "
                          f"{'/'.join(BUNDLED_RELPATH)}; reinstall torchfcpe==0.0.4")


def _table(cfg: FCPEConfig):
    """(our param path, torch key, kind, expected torch shape)."""
    H, M, D = cfg.hidden_dims, cfg.n_mels, cfg.out_dims
    inner = H * cfg.expansion
    rows = [
        (("input_conv0", "kernel"), "input_stack.0.weight", "conv", (H, M, 3)),
        (("input_conv0", "bias"), "input_stack.0.bias", "copy", (H,)),
        (("input_norm", "scale"), "input_stack.1.weight", "copy", (H,)),
        (("input_norm", "bias"), "input_stack.1.bias", "copy", (H,)),
        (("input_conv1", "kernel"), "input_stack.3.weight", "conv", (H, H, 3)),
        (("input_conv1", "bias"), "input_stack.3.bias", "copy", (H,)),
    ]
    for i in range(cfg.n_layers):
        t = f"net.encoder_layers.{i}.conformer.net"
        L = f"layers_{i}"
        rows += [
            ((L, "norm", "scale"), f"{t}.0.weight", "copy", (H,)),
            ((L, "norm", "bias"), f"{t}.0.bias", "copy", (H,)),
            ((L, "pw1", "kernel"), f"{t}.2.weight", "conv", (2 * inner, H, 1)),
            ((L, "pw1", "bias"), f"{t}.2.bias", "copy", (2 * inner,)),
            ((L, "dw", "kernel"), f"{t}.4.conv.weight", "conv", (inner, 1, cfg.dw_kernel)),
            ((L, "dw", "bias"), f"{t}.4.conv.bias", "copy", (inner,)),
            ((L, "pw2", "kernel"), f"{t}.6.weight", "conv", (H, inner, 1)),
            ((L, "pw2", "bias"), f"{t}.6.bias", "copy", (H,)),
        ]
    rows += [
        (("norm", "scale"), "norm.weight", "copy", (H,)),
        (("norm", "bias"), "norm.bias", "copy", (H,)),
        (("output_proj", "bias"), "output_proj.bias", "copy", (D,)),
    ]
    return rows


def convert_state_dict(sd: dict[str, np.ndarray], cfg: FCPEConfig, where: str = "FCPE checkpoint"):
    """numpy state dict → (params {"net": ...}, cent_table)."""
    table = _table(cfg)
    D, H = cfg.out_dims, cfg.hidden_dims
    expected = [k for _, k, _, _ in table] + ["output_proj.weight_g", "output_proj.weight_v", "cent_table"]
    check_keys(sd.keys(), expected, where=where, ignore=IGNORED)
    net: dict = {}
    for path, key, kind, shape in table:
        a = np.asarray(sd[key], dtype=np.float32)
        check_shape(key, a, shape, where=where)
        if kind == "conv":
            a = np.ascontiguousarray(a.transpose(2, 1, 0))
        d = net
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = a
    g = np.asarray(sd["output_proj.weight_g"], np.float32)
    v = np.asarray(sd["output_proj.weight_v"], np.float32)
    check_shape("output_proj.weight_g", g, (D, 1), where=where)
    check_shape("output_proj.weight_v", v, (D, H), where=where)
    norm = np.sqrt(np.sum(v.astype(np.float64) ** 2, axis=1, keepdims=True)).astype(np.float32)
    w = v * (g / norm)  # torch._weight_norm(v, g, dim=0)
    net["output_proj"]["kernel"] = np.ascontiguousarray(w.T[None])  # (1, H, D)
    cent = np.asarray(sd["cent_table"], np.float32)
    check_shape("cent_table", cent, (D,), where=where)
    return {"net": net}, cent


def torch_hann_window(cfg: FCPEConfig) -> np.ndarray:
    """The STFT window exactly as torchfcpe builds it: ``torch.hann_window(win_size)`` (float32, periodic).

    torch computes it in float32 with its own vectorised cos; a float64 window differs by up to
    2e-7, which measurably moves the log-mel of near-silent bins (and the F0 of a pure tone by ~0.01
    Hz), so the converter, which needs torch anyway, takes torch's own values.
    """
    import torch

    w = torch.hann_window(cfg.win_size).numpy().astype(np.float32)
    if cfg.win_size != cfg.n_fft:
        left = (cfg.n_fft - cfg.win_size) // 2
        w = np.pad(w, (left, cfg.n_fft - cfg.win_size - left))
    return w


def load_fcpe(path: str | os.PathLike | None = None, **cfg_overrides):
    """Read the FCPE checkpoint (default: the one bundled with the installed torchfcpe 0.0.4).

    Returns ``(cfg, params, consts)``: ``params = {"net": ...}`` for :func:`fcpe_f0`, ``consts`` the
    front-end arrays and the cent table (numpy float32).
    """
    path = Path(path) if path is not None else find_bundled_weights()
    ck = torch_load(path)
    if not isinstance(ck, dict) or "model" not in ck or "config_dict" not in ck:
        raise CheckpointError(f"{path}: expected a torchfcpe checkpoint dict with 'model' and 'config_dict', "
                              f"got {type(ck).__name__} with keys {list(ck)[:5] if isinstance(ck, dict) else '-'}")
    try:
        cfg = FCPEConfig.from_torchfcpe(ck["config_dict"], **cfg_overrides)
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: config_dict lacks a field the FCPE needs ({e})") from e
    except ValueError as e:
        raise CheckpointError(f"{path}: {e}") from e
    sd = {k: to_numpy(v) for k, v in ck["model"].items()}
    params, cent = convert_state_dict(sd, cfg, where=str(path))
    consts = frontend_constants(cfg)
    consts["window"] = torch_hann_window(cfg)
    consts["cent_table"] = cent
    return cfg, params, consts
