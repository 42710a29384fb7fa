"""Converter for the HuBERT checkpoint ``hubert_25hz/mhubert_base_25hz.pt`` (fairseq HuBERT in the
"converted" s3prl format: ``{model_cfg, task_cfg, model_weight, dictionaries_symbols}``;
REFERENCE.md §2.2) → (:class:`SpeechEncoderConfig`, plain param dict for :class:`SpeechEncoder`).

The reference loads with ``strict=False`` (missing keys silently ignored); here every key must be
accounted for: the only keys dropped are the training-only ones the reference deletes or never
uses (``label_embs_concat``, ``final_proj.*``, ``mask_emb``) and the layers past the output layer.

Also holds the parity runner for the ``hubert_*`` golden cases.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np

from spiritlm_jax.converters import torch_io
from spiritlm_jax.converters.schema import Row, import_state_dict
from spiritlm_jax.converters.torch_io import CheckpointError
from spiritlm_jax.converters.transforms import CONV1D, COPY_F32, LINEAR_F32, weight_norm
from spiritlm_jax.models.hubert import EncoderConfigError, SpeechEncoderConfig

# The Spirit LM tokenizer reads transformer layer 11 (1-based) of the 12 (REFERENCE.md §4).
SPIRITLM_HUBERT_LAYER = 11

# Keys the reference never uses at inference.
FAIRSEQ_IGNORED = (r"label_embs_concat", r"final_proj\.(weight|bias)", r"mask_emb")


def encoder_rows(cfg: SpeechEncoderConfig, dialect: str, wn_names: str = "legacy") -> list[Row]:
    """The schema of the encoder: (our param path, checkpoint key(s), shape(s), transform) for every
    tensor. ``dialect``: "fairseq" or "hf" (HF Wav2Vec2Model names, without the ``wav2vec2.`` prefix);
    ``wn_names``: how the positional conv's weight-norm pair is stored ("legacy": ``weight_g``/``weight_v``,
    "parametrizations": ``parametrizations.weight.original0/1``)."""
    fs = dialect == "fairseq"
    rows: list[Row] = []
    cin = 1
    for i, (dim, k, s) in enumerate(cfg.conv_layers):
        base = f"feature_extractor.conv_layers.{i}"
        conv_key = f"{base}.0" if fs else f"{base}.conv"
        rows.append(Row.one(("feature_extractor", f"conv_{i}"), f"{conv_key}.weight", (dim, cin, k), CONV1D))
        if cfg.conv_bias:
            rows.append(Row.one(("feature_extractor", f"conv_{i}_bias"), f"{conv_key}.bias", (dim,), COPY_F32))
        if (cfg.extractor_mode == "default" and i == 0) or cfg.extractor_mode == "layer_norm":
            if fs:
                nk = f"{base}.2" if cfg.extractor_mode == "default" else f"{base}.2.1"
            else:
                nk = f"{base}.layer_norm"
            rows.append(Row.one(("feature_extractor", f"norm_{i}", "scale"), f"{nk}.weight", (dim,), COPY_F32))
            rows.append(Row.one(("feature_extractor", f"norm_{i}", "bias"), f"{nk}.bias", (dim,), COPY_F32))
        cin = dim
    C, D, F = cfg.conv_dim, cfg.embed_dim, cfg.ffn_dim
    fl = "layer_norm" if fs else "feature_projection.layer_norm"
    rows.append(Row.one(("feature_ln", "scale"), f"{fl}.weight", (C,), COPY_F32))
    rows.append(Row.one(("feature_ln", "bias"), f"{fl}.bias", (C,), COPY_F32))
    if cfg.has_projection:
        pj = "post_extract_proj" if fs else "feature_projection.projection"
        rows.append(Row.one(("proj", "kernel"), f"{pj}.weight", (D, C), LINEAR_F32))
        rows.append(Row.one(("proj", "bias"), f"{pj}.bias", (D,), COPY_F32))
    pc = "encoder.pos_conv.0" if fs else "encoder.pos_conv_embed.conv"
    g_key, v_key = ((f"{pc}.weight_g", f"{pc}.weight_v") if wn_names == "legacy" else
                    (f"{pc}.parametrizations.weight.original0", f"{pc}.parametrizations.weight.original1"))
    # weight norm over the kernel axis (dim=2), as fairseq/HF build the positional conv
    rows.append(Row(("pos_conv_kernel",), (g_key, v_key), ((1, 1, cfg.conv_pos), (D, D // cfg.conv_pos_groups, cfg.conv_pos)),
                    weight_norm(CONV1D, dim=2)))
    rows.append(Row.one(("pos_conv_bias",), f"{pc}.bias", (D,), COPY_F32))
    if cfg.encoder_ln != "none":
        rows.append(Row.one(("encoder_ln", "scale"), "encoder.layer_norm.weight", (D,), COPY_F32))
        rows.append(Row.one(("encoder_ln", "bias"), "encoder.layer_norm.bias", (D,), COPY_F32))
    for n in range(cfg.layers_run):
        lb = f"encoder.layers.{n}"
        att = f"{lb}.self_attn" if fs else f"{lb}.attention"
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
            rows.append(Row.one(("layers", f"attn_{ours}_kernel", n), f"{att}.{theirs}.weight", (D, D), LINEAR_F32))
            rows.append(Row.one(("layers", f"attn_{ours}_bias", n), f"{att}.{theirs}.bias", (D,), COPY_F32))
        aln = f"{lb}.self_attn_layer_norm" if fs else f"{lb}.layer_norm"
        fc1 = f"{lb}.fc1" if fs else f"{lb}.feed_forward.intermediate_dense"
        fc2 = f"{lb}.fc2" if fs else f"{lb}.feed_forward.output_dense"
        rows += [
            Row.one(("layers", "attn_ln_scale", n), f"{aln}.weight", (D,), COPY_F32),
            Row.one(("layers", "attn_ln_bias", n), f"{aln}.bias", (D,), COPY_F32),
            Row.one(("layers", "fc1_kernel", n), f"{fc1}.weight", (F, D), LINEAR_F32),
            Row.one(("layers", "fc1_bias", n), f"{fc1}.bias", (F,), COPY_F32),
            Row.one(("layers", "fc2_kernel", n), f"{fc2}.weight", (D, F), LINEAR_F32),
            Row.one(("layers", "fc2_bias", n), f"{fc2}.bias", (D,), COPY_F32),
            Row.one(("layers", "final_ln_scale", n), f"{lb}.final_layer_norm.weight", (D,), COPY_F32),
            Row.one(("layers", "final_ln_bias", n), f"{lb}.final_layer_norm.bias", (D,), COPY_F32),
        ]
    return rows


def encoder_key_table(cfg: SpeechEncoderConfig, dialect: str) -> list[tuple[tuple, str, Any, tuple[int, ...]]]:
    """The single-tensor rows of :func:`encoder_rows` as (path, key, transform, shape) tuples (for writers of
    random checkpoints); the positional conv's weight-norm pair is not among them."""
    return [(r.path, r.keys[0], r.transform, r.shapes[0]) for r in encoder_rows(cfg, dialect) if len(r.keys) == 1]


def weight_norm_names(sd: Mapping[str, Any], prefix: str) -> str:
    """How the positional conv's weight-norm pair is named in this state dict (legacy by default)."""
    if f"{prefix}.parametrizations.weight.original0" in sd or f"{prefix}.parametrizations.weight.original1" in sd:
        return "parametrizations"
    return "legacy"


def build_encoder_params(sd: Mapping[str, np.ndarray], cfg: SpeechEncoderConfig, dialect: str, *, where: str,
                         ignore: Iterable[str] = (), keep_unused: bool = False) -> dict:
    """State dict (numpy) → nested param dict through :func:`encoder_rows`; checks every key and shape.
    Layers past ``cfg.layers_run`` are never run and are dropped."""
    pc = "encoder.pos_conv.0" if dialect == "fairseq" else "encoder.pos_conv_embed.conv"
    layer_re = re.compile(r"encoder\.layers\.(\d+)\.")
    layer_ids = {int(m.group(1)) for k in sd for m in [layer_re.match(k)] if m}
    if layer_ids and max(layer_ids) + 1 != cfg.num_layers:
        raise CheckpointError(
            f"{where}: the state dict has {max(layer_ids) + 1} transformer layers but the config says {cfg.num_layers}"
        )
    unused = list(ignore)
    if cfg.encoder_ln == "none":  # pre-norm with a target layer: the encoder LayerNorm is never applied
        unused.append(r"encoder\.layer_norm\.(weight|bias)")
    if cfg.layers_run < cfg.num_layers:  # layers past the output layer are never run
        unused.append(r"encoder\.layers\.(" + "|".join(str(i) for i in range(cfg.layers_run, cfg.num_layers)) + r")\..*")
    rows = encoder_rows(cfg, dialect, weight_norm_names(sd, pc))
    return import_state_dict(rows, sd, where=where, unused=unused, keep_unused=keep_unused)


def truncate_to_output_layer(cfg: SpeechEncoderConfig) -> SpeechEncoderConfig:
    """Params keep only the layers that run: the config then describes exactly those."""
    return cfg.replace(num_layers=cfg.layers_run, output_layer=None)


# Classes the fairseq cfg dicts may contain besides torch's safe set (none are needed for the
# released converted checkpoint: its cfgs are plain dicts/lists/tuples/str/float/int/bool/None).
HUBERT_ALLOW_CLASSES: tuple[str, ...] = ()


def load_hubert_checkpoint(path: str | os.PathLike, *, allow_classes: Iterable[str] = ()) -> dict:
    ck = torch_io.torch_load(path, allow_classes=tuple(HUBERT_ALLOW_CLASSES) + tuple(allow_classes))
    if not isinstance(ck, Mapping):
        raise CheckpointError(f"{path}: expected a dict with model_cfg/task_cfg/model_weight, got {type(ck).__name__}")
    missing = [k for k in ("model_cfg", "model_weight", "dictionaries_symbols") if k not in ck]
    if missing:
        raise CheckpointError(
            f"{path}: not a converted HuBERT checkpoint: missing top-level key(s) {missing} (found {sorted(ck)}). "
            f"A raw fairseq checkpoint ('cfg'/'model' keys) must first be converted as in the original release."
        )
    return ck


def convert_hubert(path: str | os.PathLike, output_layer: int | None = SPIRITLM_HUBERT_LAYER, *,
                   allow_classes: Iterable[str] = ()) -> tuple[SpeechEncoderConfig, dict]:
    """``mhubert_base_25hz.pt`` → (config, params). Params hold only the first ``output_layer`` layers."""
    ck = load_hubert_checkpoint(path, allow_classes=allow_classes)
    return convert_hubert_checkpoint(ck, str(path), output_layer)


def hubert_config(ck: Mapping[str, Any], where: str, output_layer: int | None) -> SpeechEncoderConfig:
    try:
        return SpeechEncoderConfig.from_fairseq(ck["model_cfg"], ck.get("task_cfg") or {}, output_layer=output_layer,
                                                has_projection=any(k.startswith("post_extract_proj.") for k in ck["model_weight"]))
    except EncoderConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e


def convert_hubert_checkpoint(ck: Mapping[str, Any], where: str, output_layer: int | None = SPIRITLM_HUBERT_LAYER, *,
                              keep_unused: bool = False) -> tuple[SpeechEncoderConfig, dict]:
    """A loaded converted-format HuBERT dict → (config, params); ``output_layer=None`` keeps every layer
    and ``keep_unused`` the training-only tensors (under ``original_only``), for a lossless copy."""
    cfg = hubert_config(ck, where, output_layer)
    sd = torch_io.state_dict_to_numpy(ck["model_weight"])
    params = build_encoder_params(sd, cfg, "fairseq", where=where, ignore=FAIRSEQ_IGNORED, keep_unused=keep_unused)
    return truncate_to_output_layer(cfg), params


# ------------------------------------------------------------------------------------------------
# Parity runner (``spiritlm-jax parity GOLDEN --only hubert_``)
# ------------------------------------------------------------------------------------------------

# Features: |ours − reference| ≤ 1e-4 in float32. The reference's own run-to-run spread is 2.6e-6
# (MANIFEST: hubert_recording dense_features, 1 vs 2 threads); an independent float32
# implementation differs by summation order through 11 post-LN layers, measured ≤ ~1e-5 here.
FEATURE_TOL = 1e-4
# Conv features are bit-exact across the reference's runs; ours differ by conv summation order only.
CONV_TOL = 1e-4
# Quantizer logits: 501-way MLP on the features; reference spread 6.8e-6.
LOGITS_TOL = 1e-4


def parity_cases(gs, case: str):
    from spiritlm_jax.converters.parity import compare_close, compare_exact, not_implemented
    from spiritlm_jax.hubert_tokenizer import HubertTokenizer

    z = gs.npz(case)
    layer = int(z["hubert_layer"]) if "hubert_layer" in z else SPIRITLM_HUBERT_LAYER
    key = "hubert_tokenizer" if layer == SPIRITLM_HUBERT_LAYER else f"hubert_tokenizer_L{layer}"
    tok = gs.cached(key, lambda: HubertTokenizer.from_checkpoint_dir(gs.checkpoints / "speech_tokenizer",
                                                                     hubert_layer=layer))
    inputs = gs.inputs()
    name = case[:-4] if case.endswith(".npz") else case

    if name in ("hubert_recording", "hubert_synth_odd"):
        if name == "hubert_recording":
            # the reference was called with the file path: load it the same way
            wav = tok.load(Path(gs.root) / "audio" / "7143-88743-0029.flac") \
                if (Path(gs.root) / "audio" / "7143-88743-0029.flac").exists() else inputs["recording_wav"]
            ref = z["input_wav"] if z["input_wav"].size else inputs["recording_wav"]  # empty: see MANIFEST
            yield compare_exact(case, "loaded_wav", wav, ref)
        else:
            wav = z["input_wav"]
        out = tok.encode_dense(wav, return_intermediates=True)
        yield compare_close(case, "conv_features", np.transpose(out["conv_features"], (1, 0))[None], z["conv_features"], CONV_TOL)
        yield compare_close(case, "dense_features", out["features"][None], z["dense_features"], FEATURE_TOL)
        logits = tok.quantizer_logits(out["features"])
        yield compare_close(case, "quantizer_logits", logits[None], z["quantizer_logits"], LOGITS_TOL)
        yield compare_exact(case, "quantizer_raw_argmax", np.argmax(logits, -1)[None], z["quantizer_raw_argmax"])
        yield compare_exact(case, "blank_id", tok.blank_id, z["blank_id"])
        yield compare_exact(case, "units", tok.encode(wav), z["units"])
        return

    if name == "hubert_chunking":
        yield from _chunking_cases(gs, case, tok, z, inputs)
        return
    yield not_implemented(case, "*", "unknown hubert case file")


def _chunking_cases(gs, case, tok, z, inputs):
    from spiritlm_jax.converters.parity import compare_close, compare_exact, not_implemented
    from spiritlm_jax.hubert_tokenizer import TokenizerInputError

    rec = inputs["recording_wav"]
    # (1) HubertTokenizer(min_chunk=400, max_chunk=1.6M) on recording[:n]
    units, errs = [], []
    for n in z["lengths"]:
        try:
            u = tok.encode(rec[: int(n)], min_chunk=400)
            units.append(" ".join(str(int(i)) for i in u))
            errs.append("")
        except TokenizerInputError as e:
            units.append("")
            errs.append(str(e))
    yield compare_exact(case, "units_by_length", np.array(units), z["units_by_length"])
    # The error texts are PyTorch's; we compare WHICH lengths fail (our messages are our own).
    yield compare_exact(case, "error_by_length(which fail)", np.array([e != "" for e in errs]),
                        np.array([str(e) != "" for e in z["error_by_length"]]))

    # (2), (3) SpiritLMTokenizer.encode_units: the min/max wav-chunk rules, base and expressive, through the
    # full speech tokenizer (spiritlm_jax.speech); where the original raised, strict mode must raise too.
    yield from _chunking_tokenizer_quantities(gs, case, z)

    # (4) HubertTokenizer(max_chunk=32000): per-chunk dense features concatenated
    dense = tok.encode_dense(rec, max_chunk=32000, min_chunk=400)
    yield compare_close(case, "hubert_maxchunk32000_dense", dense[None], z["hubert_maxchunk32000_dense"], FEATURE_TOL)
    yield compare_exact(case, "hubert_maxchunk32000_units", tok.encode(rec, max_chunk=32000, min_chunk=400),
                        z["hubert_maxchunk32000_units"])


def _chunking_tokenizer_quantities(gs, case: str, z: dict):
    """The SpiritLMTokenizer parts of hubert_chunking.npz: min/max chunk behaviour of encode_units.

    ``tok_<base|expr>_off<o>_len<n>_<key>``: encode_units(recording[o:o+n]); where the original raised
    (``..._error``: FCPE on a chunk without a voiced frame), we run with ``strict_original=True`` and must
    raise too. ``maxchunk29000_*``: a tokenizer with max_wav_chunk=29000, min_wav_chunk=1280.
    """
    from spiritlm_jax.audio import AudioError
    from spiritlm_jax.converters.parity import compare_exact
    from spiritlm_jax.converters.parity_e2e import _speech_tok
    from spiritlm_jax.speech import SpeechTokenizer

    rec = gs.inputs()["recording_wav"]
    names = {"base": "base", "expr": "expressive"}
    combos = sorted({k.rsplit("_", 1)[0] for k in z if k.startswith("tok_")})
    for combo in combos:
        _, short, off, ln = combo.split("_")
        o, n = int(off[3:]), int(ln[3:])
        tok = _speech_tok(gs, names[short])
        err_ref = str(z.get(f"{combo}_error", ""))
        try:
            got, err = tok.encode_units(rec[o:o + n], strict_original=True), ""
        except AudioError as e:  # documented refusals: UnvoicedAudioError, TokenizerInputError, AudioError
            got, err = {}, type(e).__name__
        yield compare_exact(case, f"{combo}: raises iff the original raised (original: {err_ref.split(':')[0] or 'none'}; "
                                  f"ours: {err or 'none'})", np.array(bool(err)), np.array(bool(err_ref)))
        for key in ("hubert", "pitch", "style"):
            if f"{combo}_{key}" in z:
                yield compare_exact(case, f"{combo}_{key}", got.get(key, ""), z[f"{combo}_{key}"])
    for short in ("base", "expr"):
        ks = [k for k in z if k.startswith(f"maxchunk29000_{short}_")]
        if not ks:
            continue
        full = _speech_tok(gs, names[short])
        tok = SpeechTokenizer(full.hubert, None, full.pitch, full.style, max_wav_chunk=29000, min_wav_chunk=1280)
        u = tok.encode_units(rec)
        for k in sorted(ks):
            yield compare_exact(case, k, u.get(k.rsplit("_", 1)[1], ""), z[k])
