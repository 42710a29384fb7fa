"""``vqvae_f0_quantizer/{config.yaml, model.pt}`` → JAX params for :mod:`spiritlm_jax.models.f0_vqvae`,
and the golden-set parity runner for every ``f0_*`` case (FCPE and pYAAPT pitch tokenization).

``model.pt`` is ``torch.save({"model": state_dict})``; the original reads it with
``weights_only=False`` and loads it strictly. We read it with ``weights_only=True`` (a file that needs
more is refused with the class name and the opt-in) and fail on any missing or unexpected key.

Key table (per level l; D = downs_t[l]; R = depth):

    encoder.level_blocks.l.model.{i}.0                    → encoder/level{l}_down{i}       Conv1d k=2s
    encoder.level_blocks.l.model.{i}.1.model.{j}.model.1  → encoder/level{l}_res{i}/block_{j}_conv3
    encoder.level_blocks.l.model.{i}.1.model.{j}.model.3  → encoder/level{l}_res{i}/block_{j}_conv1
    encoder.level_blocks.l.model.{D}                      → encoder/level{l}_out           Conv1d k=3
    vq.level_blocks.l.k                                   → codebook[l]                    (l_bins, emb)
    decoder.level_blocks.l.model.0                        → decoder/level{l}_in
    decoder.level_blocks.l.model.{1+i}.0.model.{j}.model.{1,3} → decoder/level{l}_res{i}/block_{j}_conv{3,1}
    decoder.level_blocks.l.model.{1+i}.1                  → decoder/level{l}_up{i}         ConvTranspose1d
    decoder.out                                           → decoder/out

Conv1d weights (out, in, k) → (k, in, out); ConvTranspose1d weights (in, out, k) → (k, in, out).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

import numpy as np

from spiritlm_jax.converters.schema import Row, import_state_dict
from spiritlm_jax.converters.torch_io import CheckpointError, to_numpy, torch_load
from spiritlm_jax.converters.transforms import CONV1D, CONV_T1D, COPY_F32
from spiritlm_jax.models.f0_vqvae import ConvStackConfig, F0VQVAEConfig, VQVAEConfigError


def read_config(path: str | os.PathLike) -> F0VQVAEConfig:
    import yaml

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"VQ-VAE config not found: {path} (it must sit beside model.pt as config.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise CheckpointError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from e
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a mapping with encoder_params/decoder_params/vq_params/features")
    try:
        return F0VQVAEConfig.from_yaml_dict(raw, where=str(path))
    except VQVAEConfigError as e:
        raise CheckpointError(str(e)) from None


def vqvae_rows(cfg: F0VQVAEConfig) -> list[Row]:
    """The schema: (param path, torch key, shape, transform) for every tensor (module docstring)."""
    rows: list[Row] = []
    kinds = {"conv": CONV1D, "convT": CONV_T1D, "copy": COPY_F32}

    def add(path, key, kind, shape):
        rows.append(Row.one(path, key, shape, kinds[kind]))

    def res_rows(prefix_t, prefix_j, c: ConvStackConfig, width):
        for j in range(c.depth):
            add(prefix_j + (f"block_{j}_conv3", "kernel"), f"{prefix_t}.model.{j}.model.1.weight", "conv", (c.n_state, width, 3))
            add(prefix_j + (f"block_{j}_conv3", "bias"), f"{prefix_t}.model.{j}.model.1.bias", "copy", (c.n_state,))
            add(prefix_j + (f"block_{j}_conv1", "kernel"), f"{prefix_t}.model.{j}.model.3.weight", "conv", (width, c.n_state, 1))
            add(prefix_j + (f"block_{j}_conv1", "bias"), f"{prefix_t}.model.{j}.model.3.bias", "copy", (width,))

    e = cfg.encoder
    for l in range(e.levels):
        D, s = e.downs_t[l], e.strides_t[l]
        for i in range(D):
            cin = (e.input_emb_width if l == 0 else e.output_emb_width) if i == 0 else e.width
            t = f"encoder.level_blocks.{l}.model.{i}"
            add(("encoder", f"level{l}_down{i}", "kernel"), f"{t}.0.weight", "conv", (e.width, cin, 2 * s))
            add(("encoder", f"level{l}_down{i}", "bias"), f"{t}.0.bias", "copy", (e.width,))
            res_rows(f"{t}.1", ("encoder", f"level{l}_res{i}"), e, e.width)
        t = f"encoder.level_blocks.{l}.model.{D}"
        add(("encoder", f"level{l}_out", "kernel"), f"{t}.weight", "conv", (e.output_emb_width, e.width, 3))
        add(("encoder", f"level{l}_out", "bias"), f"{t}.bias", "copy", (e.output_emb_width,))
    d = cfg.decoder
    for l in range(d.levels):
        D, s = d.downs_t[l], d.strides_t[l]
        t = f"decoder.level_blocks.{l}.model"
        add(("decoder", f"level{l}_in", "kernel"), f"{t}.0.weight", "conv", (d.width, d.output_emb_width, 3))
        add(("decoder", f"level{l}_in", "bias"), f"{t}.0.bias", "copy", (d.width,))
        for i in range(D):
            cout = d.output_emb_width if i == D - 1 else d.width
            res_rows(f"{t}.{1 + i}.0", ("decoder", f"level{l}_res{i}"), d, d.width)
            add(("decoder", f"level{l}_up{i}", "kernel"), f"{t}.{1 + i}.1.weight", "convT", (d.width, cout, 2 * s))
            add(("decoder", f"level{l}_up{i}", "bias"), f"{t}.{1 + i}.1.bias", "copy", (cout,))
    add(("decoder", "out", "kernel"), "decoder.out.weight", "conv", (d.input_emb_width, d.output_emb_width, 3))
    add(("decoder", "out", "bias"), "decoder.out.bias", "copy", (d.input_emb_width,))
    for l in range(cfg.vq_levels):
        add(("codebook", f"#{l}"), f"vq.level_blocks.{l}.k", "copy", (cfg.l_bins, cfg.emb_width))
    return rows


def _table(cfg: F0VQVAEConfig):
    """(param path, torch key, kind, torch shape) of the conv layers (for writers of random checkpoints)."""
    return [(r.path, r.keys[0], r.transform.name, r.shapes[0]) for r in vqvae_rows(cfg) if r.path[0] != "codebook"]


def convert_state_dict(sd: dict[str, np.ndarray], cfg: F0VQVAEConfig, where: str = "VQ-VAE checkpoint"):
    return import_state_dict(vqvae_rows(cfg), sd, where=where)


def load_f0_vqvae(path: str | os.PathLike, allow_classes: Iterable[str] = ()):
    """``path``: the ``vqvae_f0_quantizer`` folder or its ``model.pt`` → ``(cfg, params)``."""
    path = Path(path)
    model_pt = path / "model.pt" if path.is_dir() else path
    cfg = read_config(model_pt.parent / "config.yaml")
    ck = torch_load(model_pt, allow_classes=allow_classes)
    if not isinstance(ck, dict) or "model" not in ck:
        raise CheckpointError(f"{model_pt}: expected a dict with key 'model' (the VQ-VAE state dict), got "
                              f"{type(ck).__name__}{' with keys ' + str(list(ck)[:5]) if isinstance(ck, dict) else ''}")
    sd = {k: to_numpy(v) for k, v in ck["model"].items()}
    return cfg, convert_state_dict(sd, cfg, where=str(model_pt))


# ------------------------------------------------------------------------------------------------
# Golden parity
# ------------------------------------------------------------------------------------------------

def parity_cases(gs, case: str):
    from spiritlm_jax.converters.parity import compare_close, compare_exact, not_implemented
    from spiritlm_jax.pitch_tokenizer import PitchTokenizer

    z = gs.npz(case)
    backbone = "pyaapt" if "pyaapt" in case else "fcpe"
    tok = gs.cached(f"pitch_tokenizer:{backbone}", lambda: PitchTokenizer.from_checkpoints(
        gs.checkpoints / "speech_tokenizer" / "vqvae_f0_quantizer", backbone=backbone))
    wav = z["input_wav"]
    if wav.size == 0:
        wav = gs.inputs()["recording_wav"]
    if str(z["error"]):
        # the reference failed on this input; we define a result instead only for fully unvoiced
        # audio (documented in spiritlm_jax.pitch_tokenizer), so there is nothing to compare
        yield not_implemented(case, "*", f"the reference raised ({str(z['error'])[:80]}); no reference output")
        return
    d = tok.debug(wav)
    # F0 in Hz: torchfcpe's own float32 F0 deviates from a float64 evaluation of the same model by up
    # to 1.44e-5 of the value (worst measured, tests/test_fcpe.py: a tone sweep at 650 Hz; 6.7e-7 on
    # the recording, whose 1-vs-2-thread spread in MANIFEST.md is 8.7e-7); two independent float32
    # implementations may differ by twice that → 3e-5 × max F0. pYAAPT is float64 numpy DSP run by
    # the same package version: exact.
    f0_tol = 0.0 if backbone == "pyaapt" else 3e-5 * float(np.max(np.abs(z["f0_raw"])))
    yield compare_close(case, "f0_raw", d["f0"], z["f0_raw"], f0_tol)
    yield compare_exact(case, "vuv_raw", d["vuv"].astype(z["vuv_raw"].dtype), z["vuv_raw"])
    yield compare_close(case, "f0_dense", d["f0"], z["f0_dense"], f0_tol)
    # the normalised contour carries the F0 error plus the mean's (same order) → same tolerance
    vin = np.asarray(z["vqvae_input"])
    yield compare_close(case, "vqvae_input", d["vqvae_input"].T[None], vin, f0_tol)
    # latent: float32 conv stack; the reference's own 1-vs-2-thread spread is 1.6e-5 → 1e-4
    yield compare_close(case, "vqvae_latent", d["latent"].T[None], z["vqvae_latent"], 1e-4)
    yield compare_exact(case, "pitch_codes", d["codes"].astype(np.int64), z["pitch_codes"])
    # decoder output from identical codes: float32 rounding only (reference spread 6.7e-8) → 1e-5
    yield compare_close(case, "vqvae_reconstruction", d["reconstruction"].T, z["vqvae_reconstruction"], 1e-5)
