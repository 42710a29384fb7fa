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
from typing import Any, Callable, Iterable, Mapping

import numpy as np

from spiritlm_jax.converters import torch_io
from spiritlm_jax.converters.torch_io import CheckpointError, check_keys, check_shape
from spiritlm_jax.models.hubert import EncoderConfigError, SpeechEncoderConfig

# The Spirit LM tokenizer reads transformer layer 11 (1-based) of the 12 (REFERENCE.md §4).
SPIRITLM_HUBERT_LAYER = 11

# Keys the reference never uses at inference.
FAIRSEQ_IGNORED = (r"label_embs_concat", r"final_proj\.(weight|bias)", r"mask_emb")


def _t(a: np.ndarray) -> np.ndarray:  # torch Linear (out, in) → (in, out)
    return np.ascontiguousarray(a.T)


def _conv(a: np.ndarray) -> np.ndarray:  # torch Conv1d (out, in/groups, k) → (k, in/groups, out)
    return np.ascontiguousarray(np.transpose(a, (2, 1, 0)))


def fold_weight_norm(g: np.ndarray, v: np.ndarray, dim: int) -> np.ndarray:
    """torch weight_norm: w = g · v / ‖v‖ with the norm over every axis except ``dim``.
    Computed in float64 and rounded once to float32."""
    v64 = v.astype(np.float64)
    axes = tuple(i for i in range(v.ndim) if i != dim)
    norm = np.sqrt(np.sum(v64 * v64, axis=axes, keepdims=True))
    return (g.astype(np.float64) * v64 / norm).astype(np.float32)


def encoder_key_table(cfg: SpeechEncoderConfig, dialect: str) -> list[tuple[tuple[str, ...], str, Callable, tuple[int, ...]]]:
    """(our param path, checkpoint key, transform, expected checkpoint shape) for every tensor except
    the positional conv's weight-norm pair (handled by :func:`_pos_conv`). ``dialect``: "fairseq" or
    "hf" (HF Wav2Vec2Model names, without the ``wav2vec2.`` prefix)."""
    fs = dialect == "fairseq"
    rows = []
    cin = 1
    for i, (dim, k, s) in enumerate(cfg.conv_layers):
        base = f"feature_extractor.conv_layers.{i}"
        conv_key = f"{base}.0" if fs else f"{base}.conv"
        rows.append((("feature_extractor", f"conv_{i}"), f"{conv_key}.weight", _conv, (dim, cin, k)))
        if cfg.conv_bias:
            rows.append((("feature_extractor", f"conv_{i}_bias"), f"{conv_key}.bias", np.asarray, (dim,)))
        if (cfg.extractor_mode == "default" and i == 0) or cfg.extractor_mode == "layer_norm":
            if fs:
                nk = f"{base}.2" if cfg.extractor_mode == "default" else f"{base}.2.1"
            else:
                nk = f"{base}.layer_norm"
            rows.append((("feature_extractor", f"norm_{i}", "scale"), f"{nk}.weight", np.asarray, (dim,)))
            rows.append((("feature_extractor", f"norm_{i}", "bias"), f"{nk}.bias", np.asarray, (dim,)))
        cin = dim
    C, D, F = cfg.conv_dim, cfg.embed_dim, cfg.ffn_dim
    fl = "layer_norm" if fs else "feature_projection.layer_norm"
    rows.append((("feature_ln", "scale"), f"{fl}.weight", np.asarray, (C,)))
    rows.append((("feature_ln", "bias"), f"{fl}.bias", np.asarray, (C,)))
    if cfg.has_projection:
        pj = "post_extract_proj" if fs else "feature_projection.projection"
        rows.append((("proj", "kernel"), f"{pj}.weight", _t, (D, C)))
        rows.append((("proj", "bias"), f"{pj}.bias", np.asarray, (D,)))
    pc = "encoder.pos_conv.0" if fs else "encoder.pos_conv_embed.conv"
    rows.append((("pos_conv_bias",), f"{pc}.bias", np.asarray, (D,)))
    if cfg.encoder_ln != "none":
        rows.append((("encoder_ln", "scale"), "encoder.layer_norm.weight", np.asarray, (D,)))
        rows.append((("encoder_ln", "bias"), "encoder.layer_norm.bias", np.asarray, (D,)))
    for n in range(cfg.layers_run):
        lb = f"encoder.layers.{n}"
        att = f"{lb}.self_attn" if fs else f"{lb}.attention"
        for ours, theirs in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("out", "out_proj")):
            rows.append((("layers", f"attn_{ours}_kernel", n), f"{att}.{theirs}.weight", _t, (D, D)))
            rows.append((("layers", f"attn_{ours}_bias", n), f"{att}.{theirs}.bias", np.asarray, (D,)))
        aln = f"{lb}.self_attn_layer_norm" if fs else f"{lb}.layer_norm"
        fc1 = f"{lb}.fc1" if fs else f"{lb}.feed_forward.intermediate_dense"
        fc2 = f"{lb}.fc2" if fs else f"{lb}.feed_forward.output_dense"
        rows += [
            (("layers", "attn_ln_scale", n), f"{aln}.weight", np.asarray, (D,)),
            (("layers", "attn_ln_bias", n), f"{aln}.bias", np.asarray, (D,)),
            (("layers", "fc1_kernel", n), f"{fc1}.weight", _t, (F, D)),
            (("layers", "fc1_bias", n), f"{fc1}.bias", np.asarray, (F,)),
            (("layers", "fc2_kernel", n), f"{fc2}.weight", _t, (D, F)),
            (("layers", "fc2_bias", n), f"{fc2}.bias", np.asarray, (D,)),
            (("layers", "final_ln_scale", n), f"{lb}.final_layer_norm.weight", np.asarray, (D,)),
            (("layers", "final_ln_bias", n), f"{lb}.final_layer_norm.bias", np.asarray, (D,)),
        ]
    return rows


def _pos_conv_keys(sd: Mapping[str, Any], prefix: str) -> tuple[str, str]:
    """The weight-norm (g, v) key names: legacy ``weight_g/weight_v`` or parametrizations."""
    legacy = (f"{prefix}.weight_g", f"{prefix}.weight_v")
    param = (f"{prefix}.parametrizations.weight.original0", f"{prefix}.parametrizations.weight.original1")
    if legacy[0] in sd or legacy[1] in sd:
        return legacy
    if param[0] in sd or param[1] in sd:
        return param
    return legacy  # reported as missing by check_keys


def build_encoder_params(sd: Mapping[str, np.ndarray], cfg: SpeechEncoderConfig, dialect: str, *, where: str,
                         ignore: Iterable[str] = ()) -> dict:
    """State dict (numpy) → nested param dict; checks every key and shape."""
    rows = encoder_key_table(cfg, dialect)
    pc = "encoder.pos_conv.0" if dialect == "fairseq" else "encoder.pos_conv_embed.conv"
    gk, vk = _pos_conv_keys(sd, pc)
    expected = [r[1] for r in rows] + [gk, vk]
    layer_re = re.compile(r"encoder\.layers\.(\d+)\.")
    layer_ids = {int(m.group(1)) for k in sd for m in [layer_re.match(k)] if m}
    if layer_ids and max(layer_ids) + 1 != cfg.num_layers:
        raise CheckpointError(
            f"{where}: the state dict has {max(layer_ids) + 1} transformer layers but the config says {cfg.num_layers}"
        )
    ign = [re.compile(p) for p in ignore]
    if cfg.encoder_ln == "none":  # pre-norm with a target layer: the encoder LayerNorm is never applied
        ign.append(re.compile(r"encoder\.layer_norm\.(weight|bias)"))

    def unused_layer(k: str) -> bool:  # layers past the output layer are never run
        m = layer_re.match(k)
        return bool(m) and int(m.group(1)) >= cfg.layers_run

    check_keys([k for k in sd if not unused_layer(k)], expected, where=where, ignore=ign)

    params: dict = {}
    stacks: dict[str, list] = {}
    for path, key, fn, shape in rows:
        arr = np.asarray(sd[key])
        check_shape(key, arr, shape, where=where)
        val = np.asarray(fn(arr), dtype=np.float32)
        if path[0] == "layers":
            stacks.setdefault(path[1], []).append(val)
            continue
        d = params
        for p in path[:-1]:
            d = d.setdefault(p, {})
        d[path[-1]] = val
    params["layers"] = {k: np.stack(v) for k, v in stacks.items()}

    D, g, k = cfg.embed_dim, cfg.conv_pos_groups, cfg.conv_pos
    gw, vw = np.asarray(sd[gk]), np.asarray(sd[vk])
    check_shape(vk, vw, (D, D // g, k), where=where)
    check_shape(gk, gw, (1, 1, k), where=where)
    params["pos_conv_kernel"] = _conv(fold_weight_norm(gw, vw, dim=2))
    return params


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
    where = str(path)
    ck = load_hubert_checkpoint(path, allow_classes=allow_classes)
    try:
        cfg = SpeechEncoderConfig.from_fairseq(ck["model_cfg"], ck.get("task_cfg") or {}, output_layer=output_layer,
                                               has_projection=any(k.startswith("post_extract_proj.") for k in ck["model_weight"]))
    except EncoderConfigError as e:
        raise CheckpointError(f"{where}: {e}") from e
    sd = torch_io.state_dict_to_numpy(ck["model_weight"])
    params = build_encoder_params(sd, cfg, "fairseq", where=where, ignore=FAIRSEQ_IGNORED)
    cfg = truncate_to_output_layer(cfg)
    return cfg, params


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
            yield compare_exact(case, "loaded_wav", wav, inputs["recording_wav"])
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
    from spiritlm_jax.converters.parity_e2e import hubert_chunking_tokenizer_quantities

    yield from hubert_chunking_tokenizer_quantities(gs, case, z)

    # (4) HubertTokenizer(max_chunk=32000): per-chunk dense features concatenated
    dense = tok.encode_dense(rec, max_chunk=32000, min_chunk=400)
    yield compare_close(case, "hubert_maxchunk32000_dense", dense[None], z["hubert_maxchunk32000_dense"], FEATURE_TOL)
    yield compare_exact(case, "hubert_maxchunk32000_units", tok.encode(rec, max_chunk=32000, min_chunk=400),
                        z["hubert_maxchunk32000_units"])
