"""Vocabulary extension: a Llama(-2) checkpoint → Spirit LM's Base (32512 rows) or Expressive (32768 rows)
layout (REFERENCE.md §9.1), ready to train.

Tokenizer: the missing pieces are appended to ``tokenizer.model`` as SentencePiece USER_DEFINED pieces
(what Spirit LM's own tokenizer uses, so markers decode to their text and the following text keeps its
space), in the order ``[Text] [Speech] [Hu0..500]`` (+ ``[Pi0..63] [St0..99]`` for Expressive). From
Llama-2's 32000 pieces that gives exactly the released ids ([Text]=32000, [Hu0]=32002, [Pi0]=32503,
[St0]=32567). The embedding/logit row count is rounded up to a multiple of 256 (32503 → 32512,
32667 → 32768, as released; the extra rows are padding without a token). A Base Spirit LM checkpoint
extends to Expressive the same way (its 9 padding rows become [Pi0..8]).

Parameters: rows of tokens that already exist are copied bit for bit. Every other row (new tokens and
padding) is initialised from the statistics of the existing *text* rows:

* input embedding row  = μ + σ ⊙ z,        z ~ N(0, I)
* output (lm_head) row = μ' + 0.1 · σ' ⊙ z'

where μ, σ (μ', σ') are the per-dimension mean and standard deviation of the existing input (output)
rows. Why: Spirit LM's paper only says the new token embeddings are learned from scratch; a plain
``N(0, 0.02)`` (the HF init) would give the new input rows a norm unrelated to the trained ones, and
new output rows that are far from the mean output vector can start with logits above every text token
(Hewitt, "Initializing New Word Embeddings for Pretrained Language Models", 2021). Centring the output
rows on the mean output vector with a small spread makes every new token start near the *average* text
logit, so the text distribution moves little before training; full per-dimension spread on the input
rows keeps the new tokens distinguishable and of the trained scale. ``noise_in``/``noise_out`` and
``seed`` are arguments; the result is deterministic for a seed.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from spiritlm_jax.config import LlamaConfig
from spiritlm_jax.converters.torch_io import CheckpointError

LAYOUTS = ("base", "expressive")
ROW_MULTIPLE = 256


class VocabExtensionError(ValueError):
    """The checkpoint or tokenizer cannot be extended to the requested layout."""


def spiritlm_pieces(layout: str) -> list[str]:
    """Spirit LM's added pieces in id order."""
    if layout not in LAYOUTS:
        raise VocabExtensionError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    pieces = ["[Text]", "[Speech]"] + [f"[Hu{n}]" for n in range(501)]
    if layout == "expressive":
        pieces += [f"[Pi{n}]" for n in range(64)] + [f"[St{n}]" for n in range(100)]
    return pieces


def padded_rows(n_tokens: int) -> int:
    return -(-n_tokens // ROW_MULTIPLE) * ROW_MULTIPLE


# ---------------------------------------------------------------------- tokenizer

def extend_tokenizer_proto(model_bytes: bytes, layout: str) -> tuple[bytes, int, int]:
    """Append the missing Spirit LM pieces. Returns (new model bytes, pieces kept, new piece count).

    The source may already hold a prefix of the pieces (a Base tokenizer extended to Expressive); any
    other Spirit LM piece out of place is an error.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(model_bytes)
    except Exception as e:
        raise VocabExtensionError(f"not a SentencePiece model: {e}") from e
    if not proto.pieces:
        raise VocabExtensionError("not a SentencePiece model (no pieces)")
    want = spiritlm_pieces(layout)
    have = [p.piece for p in proto.pieces]
    present = [p for p in want if p in set(have)]
    if present:
        first = have.index(want[0]) if want[0] in have else -1
        if first < 0 or have[first:first + len(present)] != want[:len(present)] or first + len(present) != len(have):
            raise VocabExtensionError("the tokenizer already holds some Spirit LM pieces but not as a contiguous "
                                      "prefix of the layout at its end; it cannot be extended consistently")
    n_keep = len(have)
    T = pb.ModelProto.SentencePiece.Type
    for piece in want[len(present):]:
        sp = proto.pieces.add()
        sp.piece, sp.score, sp.type = piece, 0.0, T.USER_DEFINED
    return proto.SerializeToString(), n_keep, len(proto.pieces)


# ---------------------------------------------------------------------- parameters

def _new_rows(existing: np.ndarray, n: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    x = existing.astype(np.float64)
    mu, sd = x.mean(0), x.std(0)
    return (mu + noise * sd * rng.standard_normal((n, x.shape[1]))).astype(existing.dtype)


def extend_params(params: dict, cfg: LlamaConfig, n_rows: int, *, n_keep: int, n_text: int, seed: int = 0,
                  noise_in: float = 1.0, noise_out: float = 0.1) -> tuple[LlamaConfig, dict]:
    """Grow ``embed/embedding`` and ``lm_head`` (both (V, E)) to ``n_rows``; rows < ``n_keep`` are copied,
    rows ≥ ``n_keep`` are new (statistics from rows < ``n_text``). numpy in, numpy out."""
    V = cfg.vocab_size
    if n_rows < V:
        raise VocabExtensionError(f"the checkpoint already has {V} rows, more than the {n_rows} of the target layout")
    if n_keep > V:
        raise VocabExtensionError(f"the tokenizer has {n_keep} pieces but the model only {V} rows")
    rng = np.random.default_rng(seed)
    p = dict(params)
    emb = np.asarray(p["embed"]["embedding"])
    new_emb = np.concatenate([emb[:n_keep], _new_rows(emb[:n_text], n_rows - n_keep, noise_in, rng)])
    p["embed"] = {**p["embed"], "embedding": new_emb}
    if not cfg.tie_word_embeddings:
        head = np.asarray(p["lm_head"])
        p["lm_head"] = np.concatenate([head[:n_keep], _new_rows(head[:n_text], n_rows - n_keep, noise_out, rng)])
    return cfg.replace(vocab_size=n_rows), p


# ---------------------------------------------------------------------- whole checkpoint

def extend_checkpoint(src: str | Path, out: str | Path, layout: str, *, seed: int = 0, noise_in: float = 1.0,
                      noise_out: float = 0.1, overwrite: bool = False, dtype: str = "float32") -> Path:
    """HF Llama dir or converted spiritlm-jax dir (with ``tokenizer.model``) → a converted spiritlm-jax dir
    in the Spirit LM layout: ``config.json``, ``params/`` (orbax), the extended ``tokenizer.model`` and
    the other tokenizer files. The output is a valid ``model.init`` for training (and loads with
    ``converters.llama.load_converted``)."""
    from spiritlm_jax.converters.llama import (FORMAT, TOKENIZER_FILES, converted_meta, load_converted,
                                               load_hf_params)
    from spiritlm_jax.converters.orbax_io import save_tree_without_copy
    from spiritlm_jax.text import TextTokenizer
    import jax

    src, out = Path(src), Path(out).absolute()
    if layout not in LAYOUTS:
        raise VocabExtensionError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if not (src / "tokenizer.model").is_file():
        raise VocabExtensionError(f"{src} has no tokenizer.model; the vocabulary extension needs the source tokenizer")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    try:
        meta = json.loads((src / "config.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{src}: no config.json") from None
    if meta.get("format") == FORMAT:
        cfg, params = load_converted(src, dtype=dtype, param_dtype=dtype)
        params = jax.tree.map(np.asarray, params)
        layout_name = meta.get("layout", "scan")
    else:
        cfg, params = load_hf_params(src, scan_layers=True, dtype=dtype)
        layout_name = "scan"
    tok_bytes, n_keep, n_tokens = extend_tokenizer_proto((src / "tokenizer.model").read_bytes(), layout)
    n_rows = padded_rows(n_tokens)
    # statistics from the text rows: everything below [Text] (all kept rows for a plain Llama tokenizer)
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(tok_bytes)
    names = [p.piece for p in proto.pieces]
    n_text = min(n_keep, names.index("[Text]"))
    new_cfg, new_params = extend_params(params, cfg, n_rows, n_keep=n_keep, n_text=n_text, seed=seed,
                                        noise_in=noise_in, noise_out=noise_out)
    out.mkdir(parents=True, exist_ok=True)
    save_tree_without_copy(out / "params", new_params)
    (out / "config.json").write_text(json.dumps(converted_meta(
        new_cfg.replace(scan_layers=layout_name == "scan"), stored_dtype=dtype, source=str(src),
        vocab_extension={"layout": layout, "kept_rows": n_keep, "new_rows": n_rows - n_keep, "seed": seed,
                            "init": f"input: mean + {noise_in}*std*N(0,1); output: mean + {noise_out}*std*N(0,1) "
                                    f"(per-dimension statistics of rows 0..{n_text - 1})"}), indent=1))
    for name in TOKENIZER_FILES:
        if name != "tokenizer.model" and (src / name).exists():
            shutil.copy2(src / name, out / name)
    (out / "tokenizer.model").write_bytes(tok_bytes)
    # The result must read back as a Spirit LM vocabulary with the released layout.
    vocab = TextTokenizer.from_dir(out, n_embed=n_rows).vocab
    assert vocab.text_marker == n_text and len(vocab.hubert) == 501
    return out
