"""torchfcpe 0.0.4's bundled FCPE checkpoint (``torchfcpe/assets/fcpe_c_v001.pt``) → JAX params.

The file is a torch zip holding ``{"global_step", "model" (state dict), "config_dict"}``; it loads
with ``torch.load(weights_only=True)`` (no class needs allowing). Only the file is read: the torchfcpe
package is never imported (it imports torchaudio, which must stay out of the environment), so
:func:`find_bundled_weights` locates the file through the installed package's metadata.

Transforms (``converters/transforms.py``): Conv1d weights (out, in/groups, k) → (k, in/groups, out); the
weight-normed output Linear is folded ``w = g · v / ‖v‖₂`` row-wise (torch's ``_weight_norm`` with dim 0,
in float64) and laid out as a k=1 conv kernel.
Unused by the conv-only network and deliberately dropped: each layer's ``norm`` (attention is
disabled) and ``gaussian_blurred_cent_mask`` (training only). ``cent_table`` is kept as stored.
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from spiritlm_jax.converters.schema import Row, import_state_dict
from spiritlm_jax.converters.torch_io import CheckpointError, to_numpy, torch_load
from spiritlm_jax.converters.transforms import CONV1D, COPY_F32, LINEAR_AS_CONV, weight_norm
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


def fcpe_rows(cfg: FCPEConfig) -> list[Row]:
    """The schema: (our param path under ``net``, torch key, shape, transform), plus the cent table."""
    H, M, D = cfg.hidden_dims, cfg.n_mels, cfg.out_dims
    inner = H * cfg.expansion
    rows = [
        Row.one(("net", "input_conv0", "kernel"), "input_stack.0.weight", (H, M, 3), CONV1D),
        Row.one(("net", "input_conv0", "bias"), "input_stack.0.bias", (H,), COPY_F32),
        Row.one(("net", "input_norm", "scale"), "input_stack.1.weight", (H,), COPY_F32),
        Row.one(("net", "input_norm", "bias"), "input_stack.1.bias", (H,), COPY_F32),
        Row.one(("net", "input_conv1", "kernel"), "input_stack.3.weight", (H, H, 3), CONV1D),
        Row.one(("net", "input_conv1", "bias"), "input_stack.3.bias", (H,), COPY_F32),
    ]
    for i in range(cfg.n_layers):
        t = f"net.encoder_layers.{i}.conformer.net"
        L = f"layers_{i}"
        rows += [
            Row.one(("net", L, "norm", "scale"), f"{t}.0.weight", (H,), COPY_F32),
            Row.one(("net", L, "norm", "bias"), f"{t}.0.bias", (H,), COPY_F32),
            Row.one(("net", L, "pw1", "kernel"), f"{t}.2.weight", (2 * inner, H, 1), CONV1D),
            Row.one(("net", L, "pw1", "bias"), f"{t}.2.bias", (2 * inner,), COPY_F32),
            Row.one(("net", L, "dw", "kernel"), f"{t}.4.conv.weight", (inner, 1, cfg.dw_kernel), CONV1D),
            Row.one(("net", L, "dw", "bias"), f"{t}.4.conv.bias", (inner,), COPY_F32),
            Row.one(("net", L, "pw2", "kernel"), f"{t}.6.weight", (H, inner, 1), CONV1D),
            Row.one(("net", L, "pw2", "bias"), f"{t}.6.bias", (H,), COPY_F32),
        ]
    rows += [
        Row.one(("net", "norm", "scale"), "norm.weight", (H,), COPY_F32),
        Row.one(("net", "norm", "bias"), "norm.bias", (H,), COPY_F32),
        # the weight-normed output Linear (torch._weight_norm(v, g, dim=0)), as a k=1 conv kernel (1, H, D)
        Row(("net", "output_proj", "kernel"), ("output_proj.weight_g", "output_proj.weight_v"), ((D, 1), (D, H)),
            weight_norm(LINEAR_AS_CONV, dim=0)),
        Row.one(("net", "output_proj", "bias"), "output_proj.bias", (D,), COPY_F32),
        Row.one(("cent_table",), "cent_table", (D,), COPY_F32),
    ]
    return rows


def convert_state_dict(sd: dict[str, np.ndarray], cfg: FCPEConfig, where: str = "FCPE checkpoint", *,
                       keep_unused: bool = False):
    """numpy state dict → (params {"net": ...}, cent_table) (plus ``original_only`` with ``keep_unused``)."""
    tree = import_state_dict(fcpe_rows(cfg), sd, where=where, unused=IGNORED, keep_unused=keep_unused)
    cent = tree.pop("cent_table")
    return tree, cent


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
