"""Converter for the style encoder ``style_encoder_w2v2/`` (HF ``Wav2Vec2ForSequenceClassification``:
``config.json`` + ``pytorch_model.bin``; REFERENCE.md §2.5) → (:class:`StyleEncoderConfig`, params),
and the parity runner for the ``style_*`` golden cases.

The positional conv's weight norm is read from either the legacy ``weight_g``/``weight_v`` names or
the newer ``parametrizations.weight.original0/1`` and folded. Every key must be accounted for: the
only tensors ignored are ``wav2vec2.masked_spec_embed`` (training masking), ``layer_weights``
(weighted layer sum, which the original's custom forward never uses) and ``_float_tensor`` (the
original class's device-marker buffer).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterable

from spiritlm_jax.converters import torch_io
from spiritlm_jax.converters.hubert import encoder_rows, weight_norm_names
from spiritlm_jax.converters.schema import Row, import_state_dict
from spiritlm_jax.converters.torch_io import CheckpointError
from spiritlm_jax.converters.transforms import COPY_F32, LINEAR_F32
from spiritlm_jax.models.hubert import EncoderConfigError
from spiritlm_jax.models.style import POOL_SIZE, StyleEncoderConfig

# masked_spec_embed: training-time masking; layer_weights: weighted layer sum, unused by the original's
# forward; _float_tensor: the original class's device-marker buffer (present when a checkpoint is
# saved from Wav2Vec2StyleEncoder itself; absent from the released file).
STYLE_IGNORED = (r"wav2vec2\.masked_spec_embed", r"layer_weights", r"_float_tensor")


def read_style_config(model_dir: str | os.PathLike, pool_size: int = POOL_SIZE) -> StyleEncoderConfig:
    p = Path(model_dir) / "config.json"
    if not p.exists():
        raise CheckpointError(f"{model_dir}: no config.json (expected an HF Wav2Vec2ForSequenceClassification folder)")
    try:
        c = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: not valid JSON ({e})") from e
    if c.get("model_type", "wav2vec2") != "wav2vec2":
        raise CheckpointError(f"{p}: model_type is {c.get('model_type')!r}, expected 'wav2vec2'")
    try:
        return StyleEncoderConfig.from_hf(c, pool_size=pool_size)
    except EncoderConfigError as e:
        raise CheckpointError(f"{p}: {e}") from e


def head_rows(cfg: StyleEncoderConfig) -> list[Row]:
    """The classification head: projector (E → P) and classifier (P → labels), HF Linear layouts."""
    E, P, N = cfg.encoder.embed_dim, cfg.proj_size, cfg.num_labels
    return [Row.one(("projector", "kernel"), "projector.weight", (P, E), LINEAR_F32),
            Row.one(("projector", "bias"), "projector.bias", (P,), COPY_F32),
            Row.one(("classifier", "kernel"), "classifier.weight", (N, P), LINEAR_F32),
            Row.one(("classifier", "bias"), "classifier.bias", (N,), COPY_F32)]


def style_rows(cfg: StyleEncoderConfig, wn_names: str = "legacy") -> list[Row]:
    """The whole schema: the wav2vec2 body under ``encoder`` (keys prefixed ``wav2vec2.``) + the head."""
    body = [dataclasses.replace(r, path=("encoder",) + r.path, keys=tuple(f"wav2vec2.{k}" for k in r.keys))
            for r in encoder_rows(cfg.encoder, "hf", wn_names)]
    return body + head_rows(cfg)


def convert_style_state_dict(sd: dict, cfg: StyleEncoderConfig, where: str, *, keep_unused: bool = False) -> dict:
    layer_ids = {int(m.group(1)) for k in sd for m in [re.match(r"wav2vec2\.encoder\.layers\.(\d+)\.", k)] if m}
    if layer_ids and max(layer_ids) + 1 != cfg.encoder.num_layers:
        raise CheckpointError(f"{where}: the state dict has {max(layer_ids) + 1} transformer layers but config.json "
                              f"says {cfg.encoder.num_layers}")
    wn = weight_norm_names(sd, "wav2vec2.encoder.pos_conv_embed.conv")
    return import_state_dict(style_rows(cfg, wn), sd, where=where, unused=STYLE_IGNORED, keep_unused=keep_unused)


def convert_style(model_dir: str | os.PathLike, *, pool_size: int = POOL_SIZE,
                  allow_classes: Iterable[str] = (), keep_unused: bool = False) -> tuple[StyleEncoderConfig, dict]:
    where = str(model_dir)
    cfg = read_style_config(model_dir, pool_size)
    sd = dict(torch_io.iter_hf_tensors(model_dir, allow_classes=allow_classes))
    return cfg, convert_style_state_dict(sd, cfg, where, keep_unused=keep_unused)


# ------------------------------------------------------------------------------------------------
# Parity runner (``spiritlm-jax parity GOLDEN --only style_``)
# ------------------------------------------------------------------------------------------------

# Reference run-to-run spread (MANIFEST): last_hidden_state 1.7e-6, projected 1.7e-6, pooled 2.4e-7,
# logits 1.4e-6. An independent float32 implementation adds summation-order differences of the same
# order through the conv stack and 2+ post-LN layers: measured ≤ ~1e-5. 1e-4 is the project-wide
# float32 feature tolerance.
FEATURE_TOL = 1e-4
# input_values: the same numpy float32 operations as HF's feature extractor → bit-identical.
INPUT_TOL = 0.0


def parity_cases(gs, case: str):
    from spiritlm_jax.converters.parity import compare_close, compare_exact, not_implemented
    from spiritlm_jax.style_tokenizer import StyleTokenizer

    tok = gs.cached("style_tokenizer", lambda: StyleTokenizer.from_checkpoint_dir(gs.checkpoints / "speech_tokenizer"))
    z = gs.npz(case)
    name = case[:-4] if case.endswith(".npz") else case
    if name not in ("style_recording", "style_synth_odd"):
        yield not_implemented(case, "*", "unknown style case file")
        return
    yield compare_exact(case, "pool_size", tok.cfg.pool_size, z["pool_size"])
    wav = z["input_wav"]
    out = tok.encode(wav, return_intermediates=True)
    yield compare_close(case, "input_values", out["input_values"][None], z["input_values"], INPUT_TOL)
    yield compare_close(case, "last_hidden_state", out["last_hidden_state"][None], z["last_hidden_state"], FEATURE_TOL)
    yield compare_close(case, "projected", out["projected"][None], z["projected"], FEATURE_TOL)
    yield compare_close(case, "pooled_features", out["pooled"][None], z["pooled_features"], FEATURE_TOL)
    yield compare_close(case, "logits", out["logits"][None], z["logits"], FEATURE_TOL)
    yield compare_exact(case, "style_units", out["units"], z["style_units"])
    yield compare_exact(case, "style_units(encode)", tok.encode(wav), z["style_units"])
