"""Tiny random-weight Spirit LM checkpoints in the ORIGINAL on-disk formats, for the demo and tests.

    root = ensure_tiny_checkpoints()            # ~/.cache/spiritlm-jax/demo-v1/checkpoints (built once)
    write_tiny_checkpoints("/tmp/ckpt", seed=0) # the same tree anywhere

The tree has the layout of the original ``checkpoints/`` folder (REFERENCE.md §2.1) and every file is in
the format the original loaders read (§2.2-2.8), so it goes through exactly the code path the released
checkpoints go through: our converters read it like the real thing.

* ``speech_tokenizer/hubert_25hz/mhubert_base_25hz.pt``: the converted (s3prl-style) fairseq HuBERT dict
  (``model_cfg``/``task_cfg``/``model_weight``/``dictionaries_symbols``), 12 layers (the tokenizer reads
  layer 11), width 48, 25 Hz conv stack; ``final_proj``/``label_embs_concat``/``mask_emb`` present as in
  fairseq. ``L11_quantizer_500.pt``: ``{model_cfg, model_weight}`` of the 3-layer MLP, 501 outputs.
* ``vqvae_f0_quantizer/{config.yaml, model.pt}``: OmegaConf-style YAML + ``{"model": state_dict}`` (full
  encoder, codebook and decoder).
* ``style_encoder_w2v2/{config.json, pytorch_model.bin}``: an HF ``Wav2Vec2ForSequenceClassification``
  folder (legacy ``weight_g``/``weight_v`` names for the positional conv, as in the release).
* ``hifigan_spiritlm_{base,expressive_w2v2}/``: ``config.json`` + ``generator.pt`` (``{"generator":
  state_dict}`` with weight-norm pairs) + ``speakers.txt`` (+ ``styles.txt`` for Base), written by
  :func:`spiritlm_jax.converters.hifigan.write_random_original`.
* ``spiritlm_model/spirit-lm-{base,expressive}-7b/``: HF Llama folder (``config.json`` with Llama-2-style
  keys, bf16 ``pytorch_model.bin``, ``generation_config.json``, ``tokenizer_config.json``,
  ``special_tokens_map.json``) and a real SentencePiece ``tokenizer.model``.

The tokenizer is trained at build time with the ``sentencepiece`` package (BPE, byte fallback, Llama's
normaliser options) on the few paragraphs in :data:`TOKENIZER_TEXT`, then padded with UNUSED pieces
``<unused_NNNNN>`` up to id 31999 and followed by the 667 Spirit LM pieces as USER_DEFINED pieces at the
original ids (REFERENCE.md §9.1): 32000 ``[Text]``, 32001 ``[Speech]``, 32002+n ``[Hun]`` (n < 501),
32503+n ``[Pin]`` (n < 64), 32567+n ``[Stn]`` (n < 100). Keeping the original ids (rather than a compact
vocabulary) costs only a 32667×32 embedding and means the demo exercises the same id layout, ban lists
and vocabulary checks as the 7B models. Both LMs use 32667 rows (no padding rows), as the golden set does.

Random-init choices (the weights are meaningless; these only keep the outputs varied and decodable):
HuBERT attention/FFN outputs are damped so frames stay distinct through 11 post-LN layers; the quantizer's
CTC-blank logit gets a large negative bias (no blank-filling artefacts); the VQ-VAE convs use 1/sqrt(fan-in)
scales; HiFiGAN gains keep activations O(1) (see ``write_random_original``). The LM's ``lm_head`` rows of
byte-fallback and UNUSED pieces are scaled by 0.15 (so sampled text is made of the learned pieces), and in
the Expressive LM the ``[Pi]`` rows are scaled by 1.15 and the ``[St]`` rows by 0.8 so that a sampled
speech continuation has roughly the Hu:Pi:St proportions of real Expressive streams (25:12.5:1 per second;
measured with top-k 50 sampling over 8 seeded runs of 120 tokens: 75-98 Hu, 21-44 Pi, 1-5 St; unscaled
rows give only 9-18 Pi and 1.3x gives as many Pi as Hu). Without a ``[Pi]`` token an Expressive speech
chunk cannot be vocoded (``SpeechDecodeError``).

The build takes a few seconds (torch + sentencepiece); the cache is written to a temporary folder and
renamed into place, and a ``COMPLETE`` marker with a fingerprint of every file is checked on reuse, so an
interrupted or damaged build is rebuilt rather than half-used.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

CACHE_VERSION = "demo-v1"
CACHE_ENV = "SPIRITLM_JAX_CACHE"
MARKER = "COMPLETE"

SAMPLE_RATE = 16_000
N_TEXT = 32000  # text ids 0..31999 as in Llama-2
N_HUBERT, N_PITCH, N_STYLE = 501, 64, 100
VOCAB_SIZE = N_TEXT + 2 + N_HUBERT + N_PITCH + N_STYLE  # 32667

# Every file the demo tree holds (relative to the root): the completeness check.
LM_FILES = ("config.json", "generation_config.json", "pytorch_model.bin", "special_tokens_map.json",
            "tokenizer.model", "tokenizer_config.json")
SPEECH_FILES = (
    "hubert_25hz/mhubert_base_25hz.pt", "hubert_25hz/L11_quantizer_500.pt",
    "vqvae_f0_quantizer/config.yaml", "vqvae_f0_quantizer/model.pt",
    "style_encoder_w2v2/config.json", "style_encoder_w2v2/pytorch_model.bin",
    "hifigan_spiritlm_base/config.json", "hifigan_spiritlm_base/generator.pt",
    "hifigan_spiritlm_base/speakers.txt", "hifigan_spiritlm_base/styles.txt",
    "hifigan_spiritlm_expressive_w2v2/config.json", "hifigan_spiritlm_expressive_w2v2/generator.pt",
    "hifigan_spiritlm_expressive_w2v2/speakers.txt",
)
VARIANTS = ("base", "expressive")


def lm_dir_name(variant: str) -> str:
    return f"spirit-lm-{variant}-7b"


def required_files(variant: str | None = None) -> list[str]:
    """Files of the original layout the demo needs (all variants when ``variant`` is None)."""
    out = [f"speech_tokenizer/{f}" for f in SPEECH_FILES]
    if variant == "base":  # the Base pipeline reads neither the pitch/style models nor the expressive vocoder
        out = [f for f in out if not any(s in f for s in ("vqvae_f0", "style_encoder", "expressive_w2v2"))]
    elif variant == "expressive":
        out = [f for f in out if "hifigan_spiritlm_base" not in f]
    for v in (VARIANTS if variant is None else (variant,)):
        out += [f"spiritlm_model/{lm_dir_name(v)}/{f}" for f in LM_FILES]
    return out


# ------------------------------------------------------------------------------------------------
# bundled text for the SentencePiece model (our own prose, a few paragraphs)
# ------------------------------------------------------------------------------------------------
TOKENIZER_TEXT = """\
Spirit LM is a language model that reads and writes both text and speech. Speech is turned into three
streams of discrete units: phonetic units at twenty five frames per second, pitch units at twelve and a
half frames per second, and style units once per second. Text is split into pieces by a tokenizer.
The model sees one sequence in which text and speech are interleaved, and it learns to continue it.

This demo builds a very small copy of every part of the system with random weights. The speech encoder,
the pitch quantizer, the style classifier, the vocoder and the language model are all written to disk in
the same file formats as the released checkpoints, and then converted and loaded by the same code that
reads the real models. Because the weights are random, the speech it makes sounds like noise and the text
it writes is a jumble of word pieces. That is expected: the point is to show that every step runs.

To hear real speech, download the released checkpoints and point the demo at the folder that holds them.
The folder has two parts: one for the speech tokenizer and vocoder, and one for the language models.
The demo then runs the same three tasks: speech to speech, text to speech, and speech to text.

A quiet morning on the river: the water was smooth, the boats were still, and a heron stood in the reeds.
She asked whether the train would leave on time, and he answered that it usually did, except in winter.
Numbers such as 1, 2, 3, 10, 25 and 2024 are split into single digits, as in the original tokenizer.
"""


# ------------------------------------------------------------------------------------------------
# architectures (tiny; the same family as the golden set's, read back from the files by our loaders)
# ------------------------------------------------------------------------------------------------
HUBERT_CONV = "[(40,10,5)] + [(40,3,2)] * 4 + [(40,2,2)] * 3"  # total stride 640 = 25 Hz
HUBERT = dict(dim=48, ffn=96, heads=4, layers=12, conv_pos=16, conv_pos_groups=4, final_dim=16)
STYLE = dict(hidden=32, layers=2, heads=4, inter=64, conv_dim=[32] * 7, conv_kernel=[10, 3, 3, 3, 3, 2, 2],
             conv_stride=[5, 2, 2, 2, 2, 2, 2], pos=16, pos_groups=4, proj=24)
VQVAE_YAML = """\
features: norm_f0_interp,vuv
speaker_norm: false
sampling_rate: 16000
hop_length: 80
f0_extractor: fcpe
encoder_params:
  input_emb_width: 2
  output_emb_width: 32
  levels: 1
  downs_t: &id001
  - 4
  strides_t: &id002
  - 2
  width: 32
  depth: 3
  m_conv: 1.0
  dilation_growth_rate: 3
decoder_params:
  input_emb_width: 2
  output_emb_width: 32
  levels: 1
  downs_t: *id001
  strides_t: *id002
  width: 32
  depth: 3
  m_conv: 1.0
  dilation_growth_rate: 3
  reverse_decoder_dilation: true
vq_params:
  l_bins: 64
  emb_width: 32
  mu: 0.99
  levels: 1
"""
_HIFI_COMMON = {
    "resblock": "1", "upsample_initial_channel": 64, "resblock_kernel_sizes": [3, 7, 11],
    "resblock_dilation_sizes": [[1, 3, 5], [1, 3, 5], [1, 3, 5]], "num_embeddings": 501, "embedding_dim": 16,
    "multispkr": "from_input_file", "num_speakers": 4, "code_hop_size": 640, "sampling_rate": 16000,
    "dur_predictor_params": {"encoder_embed_dim": 16, "var_pred_hidden_dim": 16, "var_pred_kernel_size": 3,
                             "var_pred_dropout": 0.5},
}
HIFIGAN_BASE = {"upsample_rates": [5, 4, 4, 4, 2], "upsample_kernel_sizes": [11, 8, 8, 8, 4], **_HIFI_COMMON,
                "multistyle": "from_input_file", "num_styles": 10, "model_in_dim": 48}
HIFIGAN_EXPRESSIVE = {"upsample_rates": [4, 4, 5, 4, 2], "upsample_kernel_sizes": [8, 8, 11, 8, 4], **_HIFI_COMMON,
                      "num_f0_tokens": 64, "f0_hop_size": 1280, "num_style_tokens": 100, "style_hop_size": 16000,
                      "model_in_dim": 64}
SPEAKERS = ["ex01", "ex02", "ex03", "ex04"]
STYLES = ["read-default", "read-enunciated", "read-happy", "read-laughing", "read-sad", "read-whisper",
          "read-confused", "read-narration", "conv-default", "conv-happy"]
LLAMA = dict(hidden=32, inter=96, layers=2, heads=4)


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - torch is part of the `convert` extra
        raise ImportError("building the demo checkpoints needs torch (pip install 'spiritlm-jax[convert]')") from e
    return torch


def _save(obj, path: Path) -> None:
    torch = _torch()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)


def _tensors(sd: dict, dtype=None) -> dict:
    torch = _torch()
    out = {}
    for k, v in sd.items():
        t = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float32))
        out[k] = t.to(dtype) if dtype is not None else t
    return out


def _dense(rng, out_dim: int, in_dim: int, gain: float = 1.0) -> np.ndarray:
    return (gain * rng.standard_normal((out_dim, in_dim)) / np.sqrt(in_dim)).astype(np.float32)


def _affine(rng, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Random LayerNorm/GroupNorm affine (weight ≈ 1, bias ≈ 0) so a converter that drops them shows."""
    return (1 + 0.1 * rng.standard_normal(n)).astype(np.float32), (0.05 * rng.standard_normal(n)).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# speech tokenizer parts
# ------------------------------------------------------------------------------------------------
def _encoder_state_dict(rng, cfg, dialect: str) -> dict[str, np.ndarray]:
    """Random state dict for a HuBERT/wav2vec2 encoder with the key names and shapes the converter's table
    lists (``encoder_key_table``), plus the weight-norm pair of the positional conv (legacy names)."""
    from spiritlm_jax.converters.hubert import encoder_key_table

    sd: dict[str, np.ndarray] = {}
    for path, key, _, shape in encoder_key_table(cfg, dialect):
        leaf = key.rsplit(".", 1)[-1]
        if any(isinstance(p, str) and ("norm" in p or "_ln" in p or p.endswith("ln")) for p in path):  # affine
            w, b = _affine(rng, shape[0])
            sd[key] = w if leaf == "weight" else b
        elif leaf == "bias":
            sd[key] = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        else:
            fan_in = int(np.prod(shape[1:]))
            gain = 1.0
            if "out_proj" in key or "fc2" in key or "output_dense" in key:
                gain = 0.3  # damped residual branches: frames stay distinct through many post-LN layers
            sd[key] = (gain * rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32)
    pc = "encoder.pos_conv.0" if dialect == "fairseq" else "encoder.pos_conv_embed.conv"
    D, g, k = cfg.embed_dim, cfg.conv_pos_groups, cfg.conv_pos
    sd[f"{pc}.weight_v"] = rng.standard_normal((D, D // g, k)).astype(np.float32)
    sd[f"{pc}.weight_g"] = (0.3 * (1 + 0.1 * rng.standard_normal((1, 1, k)))).astype(np.float32)
    return sd


def write_hubert(st: Path, rng) -> None:
    from spiritlm_jax.models.hubert import SpeechEncoderConfig

    h = HUBERT
    model_cfg = {
        "label_rate": 25.0, "extractor_mode": "default", "encoder_layers": h["layers"],
        "encoder_embed_dim": h["dim"], "encoder_ffn_embed_dim": h["ffn"], "encoder_attention_heads": h["heads"],
        "activation_fn": "gelu", "layer_type": "transformer", "dropout": 0.1, "attention_dropout": 0.1,
        "activation_dropout": 0.0, "encoder_layerdrop": 0.05, "dropout_input": 0.1, "dropout_features": 0.1,
        "final_dim": h["final_dim"], "untie_final_proj": False, "layer_norm_first": False,
        "conv_feature_layers": HUBERT_CONV, "conv_bias": False, "logit_temp": 0.1, "target_glu": False,
        "feature_grad_mult": 0.1, "mask_length": 10, "mask_prob": 0.8, "mask_selection": "static",
        "mask_other": 0, "no_mask_overlap": False, "mask_min_space": 1, "mask_channel_length": 10,
        "mask_channel_prob": 0.0, "mask_channel_selection": "static", "mask_channel_other": 0,
        "no_mask_channel_overlap": False, "mask_channel_min_space": 1, "conv_pos": h["conv_pos"],
        "conv_pos_groups": h["conv_pos_groups"], "conv_pos_batch_norm": False, "latent_temp": (2, 0.5, 0.999995),
        "skip_masked": False, "skip_nomask": False, "checkpoint_activations": False,
        "required_seq_len_multiple": 2, "depthwise_conv_kernel_size": 31, "attn_type": "", "pos_enc_type": "abs",
        "fp16": False, "_name": "hubert",
    }
    task_cfg = {"label_rate": 25.0, "sample_rate": 16000, "normalize": False, "enable_padding": False,
                "max_keep_size": None, "max_sample_size": 250000, "min_sample_size": 32000, "random_crop": True,
                "pad_audio": False, "_name": "hubert_pretraining", "data": "", "labels": ["km"], "label_dir": None,
                "fine_tuning": False, "single_target": False}
    cfg = SpeechEncoderConfig.from_fairseq(model_cfg, task_cfg, output_layer=None, has_projection=True)
    sd = _encoder_state_dict(rng, cfg, "fairseq")
    symbols = ["<s>", "<pad>", "</s>", "<unk>"] + [str(i) for i in range(500)]
    sd["mask_emb"] = rng.uniform(size=h["dim"]).astype(np.float32)
    sd["final_proj.weight"] = _dense(rng, h["final_dim"], h["dim"])
    sd["final_proj.bias"] = np.zeros(h["final_dim"], np.float32)
    sd["label_embs_concat"] = rng.standard_normal((len(symbols), h["final_dim"])).astype(np.float32)
    _save({"model_cfg": model_cfg, "task_cfg": task_cfg, "model_weight": _tensors(sd),
           "dictionaries_symbols": [symbols]}, st / "hubert_25hz" / "mhubert_base_25hz.pt")

    # Linear quantizer: widths from model_cfg exactly as the original computes them (REFERENCE §2.3).
    from spiritlm_jax.models.quantizer import LinearQuantizerConfig

    qmc = {"vocab_size": 500, "dim": h["dim"], "upstream_dim": h["dim"]}
    w = LinearQuantizerConfig.from_model_cfg(qmc).widths
    q = {}
    for i in range(3):
        q[f"{2 * i}.weight"] = _dense(rng, w[i + 1], w[i], gain=2.0)
        q[f"{2 * i}.bias"] = (0.1 * rng.standard_normal(w[i + 1])).astype(np.float32)
    q["4.bias"][500] = -30.0  # the CTC blank never wins: no roll-filled frames in the demo
    _save({"model_cfg": qmc, "model_weight": _tensors(q)}, st / "hubert_25hz" / "L11_quantizer_500.pt")


def write_vqvae(st: Path, rng) -> None:
    import yaml

    from spiritlm_jax.converters.f0_vqvae import _table
    from spiritlm_jax.models.f0_vqvae import F0VQVAEConfig

    d = st / "vqvae_f0_quantizer"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.yaml").write_text(VQVAE_YAML)
    cfg = F0VQVAEConfig.from_yaml_dict(yaml.safe_load(VQVAE_YAML), where="demo config.yaml")
    sd = {}
    for _, key, kind, shape in _table(cfg):
        if kind == "copy":
            sd[key] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
        else:  # conv (out, in, k) / convT (in, out, k)
            fan_in = shape[1] * shape[2] if kind == "conv" else shape[0] * shape[2]
            sd[key] = (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    for l in range(cfg.vq_levels):
        sd[f"vq.level_blocks.{l}.k"] = (0.5 * rng.standard_normal((cfg.l_bins, cfg.emb_width))).astype(np.float32)
    _save({"model": _tensors(sd)}, d / "model.pt")


def _style_config() -> dict:
    s = STYLE
    labels = {str(i): str(i) for i in range(N_STYLE)}
    return {
        "_name_or_path": "", "activation_dropout": 0.0, "adapter_attn_dim": None, "adapter_kernel_size": 3,
        "adapter_stride": 2, "add_adapter": False, "apply_spec_augment": True,
        "architectures": ["Wav2Vec2ForSequenceClassification"], "attention_dropout": 0.1, "bos_token_id": 1,
        "classifier_proj_size": s["proj"], "codevector_dim": 32, "contrastive_logits_temperature": 0.1,
        "conv_bias": False, "conv_dim": s["conv_dim"], "conv_kernel": s["conv_kernel"],
        "conv_stride": s["conv_stride"], "ctc_loss_reduction": "sum", "ctc_zero_infinity": False,
        "diversity_loss_weight": 0.1, "do_stable_layer_norm": False, "eos_token_id": 2,
        "feat_extract_activation": "gelu", "feat_extract_norm": "group", "feat_proj_dropout": 0.1,
        "feat_quantizer_dropout": 0.0, "final_dropout": 0.0, "hidden_act": "gelu", "hidden_dropout": 0.1,
        "hidden_size": s["hidden"], "id2label": labels, "initializer_range": 0.02,
        "intermediate_size": s["inter"], "label2id": {v: int(k) for k, v in labels.items()}, "layer_norm_eps": 1e-05,
        "layerdrop": 0.1, "mask_feature_length": 10, "mask_feature_min_masks": 0, "mask_feature_prob": 0.0,
        "mask_time_length": 10, "mask_time_min_masks": 2, "mask_time_prob": 0.05, "model_type": "wav2vec2",
        "num_adapter_layers": 3, "num_attention_heads": s["heads"], "num_codevector_groups": 2,
        "num_codevectors_per_group": 32, "num_conv_pos_embedding_groups": s["pos_groups"],
        "num_conv_pos_embeddings": s["pos"], "num_feat_extract_layers": len(s["conv_dim"]),
        "num_hidden_layers": s["layers"], "num_negatives": 100, "output_hidden_size": s["hidden"],
        "pad_token_id": 0, "proj_codevector_dim": 32, "tdnn_dilation": [1, 2, 3, 1, 1],
        "tdnn_dim": [512, 512, 512, 512, 1500], "tdnn_kernel": [5, 3, 3, 1, 1], "use_weighted_layer_sum": False,
        "vocab_size": 32, "xvector_output_dim": 512,
    }


def write_style(st: Path, rng) -> None:
    from spiritlm_jax.converters.style import read_style_config

    d = st / "style_encoder_w2v2"
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(_style_config(), indent=2, sort_keys=True))
    cfg = read_style_config(d)
    body = _encoder_state_dict(rng, cfg.encoder, "hf")
    sd = {f"wav2vec2.{k}": v for k, v in body.items()}
    sd["wav2vec2.masked_spec_embed"] = rng.uniform(size=cfg.encoder.embed_dim).astype(np.float32)
    sd["projector.weight"] = _dense(rng, cfg.proj_size, cfg.encoder.embed_dim)
    sd["projector.bias"] = (0.05 * rng.standard_normal(cfg.proj_size)).astype(np.float32)
    sd["classifier.weight"] = _dense(rng, cfg.num_labels, cfg.proj_size, gain=3.0)
    sd["classifier.bias"] = np.zeros(cfg.num_labels, np.float32)
    _save(_tensors(sd), d / "pytorch_model.bin")


def write_vocoders(st: Path, seed: int) -> None:
    from spiritlm_jax.converters.hifigan import write_random_original

    write_random_original(st / "hifigan_spiritlm_base", HIFIGAN_BASE, seed=seed + 11, speakers=SPEAKERS, styles=STYLES)
    write_random_original(st / "hifigan_spiritlm_expressive_w2v2", HIFIGAN_EXPRESSIVE, seed=seed + 12,
                          speakers=SPEAKERS)


# ------------------------------------------------------------------------------------------------
# text tokenizer: a real SentencePiece model with the Spirit LM id layout
# ------------------------------------------------------------------------------------------------
_PIECE_NORMAL, _PIECE_USER_DEFINED, _PIECE_UNUSED = 1, 4, 5


from spiritlm_jax.text import encode_varint as _varint  # noqa: E402


def _piece_record(piece: str, score: float, typ: int) -> bytes:
    """One ``ModelProto.pieces`` entry (field 1) in protobuf wire format: piece=1, score=2, type=3."""
    import struct

    p = piece.encode("utf-8")
    body = b"\x0a" + _varint(len(p)) + p + b"\x15" + struct.pack("<f", score) + b"\x18" + _varint(typ)
    return b"\x0a" + _varint(len(body)) + body


def _records(buf: bytes):
    """Top-level (field, raw bytes of the whole record) of a serialized message."""
    from spiritlm_jax.text import _SpModel

    i, n = 0, len(buf)
    while i < n:
        start = i
        key, i = _SpModel._varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _SpModel._varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            size, i = _SpModel._varint(buf, i)
            i += size
        else:
            raise ValueError(f"unexpected wire type {wire}")
        yield key >> 3, buf[start:i]


def spirit_pieces() -> list[str]:
    return (["[Text]", "[Speech]"] + [f"[Hu{n}]" for n in range(N_HUBERT)] + [f"[Pi{n}]" for n in range(N_PITCH)]
            + [f"[St{n}]" for n in range(N_STYLE)])


def build_tokenizer_model(text: str = TOKENIZER_TEXT, vocab_size: int = 560) -> bytes:
    """Train a Llama-style BPE SentencePiece model on ``text`` and lay out the Spirit LM vocabulary.

    The trained pieces keep ids 0..k-1 (``<unk>``, ``<s>``, ``</s>``, 256 byte pieces, merges); ids
    k..31999 are UNUSED pieces ``<unused_NNNNN>``; then the 667 USER_DEFINED Spirit LM pieces. The new
    records are inserted right after the trained pieces so the file stays a canonically ordered ModelProto.
    """
    import sentencepiece as spm

    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
        hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=True,
        allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, num_threads=1,
        minloglevel=2, max_sentencepiece_length=16, train_extremely_large_corpus=False)
    buf = model.getvalue()
    recs = list(_records(buf))
    n_trained = sum(1 for f, _ in recs if f == 1)
    if n_trained >= N_TEXT:  # pragma: no cover - impossible with the bundled text
        raise ValueError(f"trained {n_trained} pieces, more than the {N_TEXT} text ids")
    extra = b"".join(_piece_record(f"<unused_{i:05d}>", 0.0, _PIECE_UNUSED) for i in range(n_trained, N_TEXT))
    extra += b"".join(_piece_record(p, 0.0, _PIECE_USER_DEFINED) for p in spirit_pieces())
    last_piece = max(i for i, (f, _) in enumerate(recs) if f == 1)
    out = b"".join(r for _, r in recs[:last_piece + 1]) + extra + b"".join(r for _, r in recs[last_piece + 1:])
    return out


def n_trained_pieces(model_bytes: bytes) -> int:
    from spiritlm_jax.text import _SpModel

    return sum(1 for _, t in _SpModel(model_bytes).pieces if t != _PIECE_UNUSED and t != _PIECE_USER_DEFINED)


# ------------------------------------------------------------------------------------------------
# language models
# ------------------------------------------------------------------------------------------------
def _llama_config() -> dict:
    L = LLAMA
    return {
        "architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
        "hidden_size": L["hidden"], "initializer_range": 0.02, "intermediate_size": L["inter"],
        "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": L["heads"],
        "num_hidden_layers": L["layers"], "num_key_value_heads": L["heads"], "pretraining_tp": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": False,
        "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": VOCAB_SIZE,
    }


def write_lm(d: Path, variant: str, tokenizer_model: bytes, n_trained: int, rng) -> None:
    torch = _torch()
    L = LLAMA
    E, F = L["hidden"], L["inter"]
    sd = {"model.embed_tokens.weight": rng.standard_normal((VOCAB_SIZE, E)).astype(np.float32)}
    for i in range(L["layers"]):
        p = f"model.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[f"{p}.self_attn.{n}.weight"] = _dense(rng, E, E)
        sd[f"{p}.mlp.gate_proj.weight"] = _dense(rng, F, E)
        sd[f"{p}.mlp.up_proj.weight"] = _dense(rng, F, E)
        sd[f"{p}.mlp.down_proj.weight"] = _dense(rng, E, F, gain=0.5)
        sd[f"{p}.input_layernorm.weight"] = _affine(rng, E)[0]
        sd[f"{p}.post_attention_layernorm.weight"] = _affine(rng, E)[0]
    sd["model.norm.weight"] = _affine(rng, E)[0]
    head = _dense(rng, VOCAB_SIZE, E, gain=4.0)
    head[3:259] *= 0.15  # byte-fallback pieces
    head[n_trained:N_TEXT] *= 0.15  # UNUSED padding pieces
    if variant == "expressive":
        p0 = N_TEXT + 2 + N_HUBERT
        head[p0:p0 + N_PITCH] *= 1.15
        head[p0 + N_PITCH:] *= 0.8
    else:  # Base never uses pitch/style tokens
        head[N_TEXT + 2 + N_HUBERT:] *= 0.15
    sd["lm_head.weight"] = head
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(_llama_config(), indent=2))
    (d / "generation_config.json").write_text(json.dumps({"_from_model_config": True, "bos_token_id": 1,
                                                          "eos_token_id": 2}, indent=2))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                           "unk_token": "<unk>"}, indent=2))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "clean_up_tokenization_spaces": False,
        "eos_token": "</s>", "model_max_length": 4096, "pad_token": None, "padding_side": "right",
        "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer", "unk_token": "<unk>"}, indent=2))
    (d / "tokenizer.model").write_bytes(tokenizer_model)
    torch.save(_tensors(sd, dtype=torch.bfloat16), d / "pytorch_model.bin")


# ------------------------------------------------------------------------------------------------
# the whole tree, and the cache
# ------------------------------------------------------------------------------------------------
def write_tiny_checkpoints(root: str | os.PathLike, seed: int = 0) -> Path:
    """Write the complete original-layout ``checkpoints/`` tree (both LMs, every speech part) to ``root``."""
    root = Path(root)
    st = root / "speech_tokenizer"
    st.mkdir(parents=True, exist_ok=True)
    rngs = [np.random.default_rng([seed, i]) for i in range(6)]
    write_hubert(st, rngs[0])
    write_vqvae(st, rngs[1])
    write_style(st, rngs[2])
    write_vocoders(st, seed)
    tok = build_tokenizer_model()
    n_trained = n_trained_pieces(tok)
    for j, v in enumerate(VARIANTS):
        write_lm(root / "spiritlm_model" / lm_dir_name(v), v, tok, n_trained, rngs[3 + j])
    missing = [f for f in required_files() if not (root / f).is_file()]
    if missing:  # pragma: no cover - a writer above forgot a file
        raise RuntimeError(f"demo checkpoint build is incomplete: {missing}")
    return root


def default_cache_dir() -> Path:
    base = os.environ.get(CACHE_ENV)
    if base:
        return Path(base).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "spiritlm-jax"


def _fingerprint(root: Path) -> dict[str, str]:
    out = {}
    for f in required_files():
        h = hashlib.sha256()
        with open(root / f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
        out[f] = h.hexdigest()
    return out


def cache_is_complete(ckpt: Path) -> bool:
    marker = ckpt / MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())["files"]
        return all((ckpt / f).is_file() for f in required_files()) and recorded == _fingerprint(ckpt)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def ensure_tiny_checkpoints(cache: str | os.PathLike | None = None, seed: int = 0, log=print) -> tuple[Path, bool]:
    """The cached demo tree ``<cache>/demo-v1[-seedN]/checkpoints`` (built if missing or incomplete).
    Returns ``(root, built_now)``."""
    base = Path(cache).expanduser() if cache is not None else default_cache_dir()
    name = CACHE_VERSION if seed == 0 else f"{CACHE_VERSION}-seed{seed}"
    final = base / name
    ckpt = final / "checkpoints"
    if cache_is_complete(ckpt):
        return ckpt, False
    base.mkdir(parents=True, exist_ok=True)
    log(f"building the tiny random-weight checkpoints (original formats) in {final} ...")
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=base))
    try:
        write_tiny_checkpoints(tmp / "checkpoints", seed=seed)
        (tmp / "checkpoints" / MARKER).write_text(json.dumps(
            {"version": CACHE_VERSION, "seed": seed, "files": _fingerprint(tmp / "checkpoints")}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:  # another process finished first: use its complete tree
            if not cache_is_complete(ckpt):
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ckpt, True


__all__ = ["write_tiny_checkpoints", "ensure_tiny_checkpoints", "build_tokenizer_model", "required_files",
           "default_cache_dir", "TOKENIZER_TEXT", "VOCAB_SIZE"]
