"""Vocabulary extension of a Llama checkpoint to Spirit LM's Base / Expressive layouts (train/vocab.py)."""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax.converters.llama import load_converted, load_hf_params
from spiritlm_jax.models.llama import Llama
from spiritlm_jax.text import TextTokenizer, Vocab
from spiritlm_jax.train.vocab import (VocabExtensionError, extend_checkpoint, extend_tokenizer_proto, padded_rows,
                                      spiritlm_pieces)

from llama_helpers import make_hf_model, save_hf


def _golden_tok(golden_dir):
    return golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-expressive-7b" / "tokenizer.model"


def _strip_to_llama2(model_bytes: bytes, n: int = 32000) -> bytes:
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_bytes)
    del proto.pieces[n:]
    return proto.SerializeToString()


@pytest.fixture(scope="module")
def llama2_dir(golden_dir, tmp_path_factory):
    """A tiny Llama-2-like HF checkpoint: 32000 rows and the Llama-2 pieces of Spirit LM's tokenizer."""
    d = tmp_path_factory.mktemp("llama2")
    model = make_hf_model(vocab=32000, hidden=32, layers=1, heads=4, inter=64)
    save_hf(model, d, "safetensors")
    (d / "tokenizer.model").write_bytes(_strip_to_llama2(_golden_tok(golden_dir).read_bytes()))
    return d


def _pieces(b: bytes):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(b)
    return [(p.piece, p.type) for p in proto.pieces]


@pytest.mark.parametrize("layout", ["base", "expressive"])
def test_tokenizer_extension_reproduces_released_tokenizer(golden_dir, layout):
    released = _golden_tok(golden_dir).read_bytes()
    ext, kept, n = extend_tokenizer_proto(_strip_to_llama2(released), layout)
    assert kept == 32000 and n == {"base": 32503, "expressive": 32667}[layout]
    # every piece, id and type equals the released Spirit LM tokenizer's (its first n pieces)
    assert _pieces(ext) == _pieces(released)[:n]
    assert padded_rows(n) == {"base": 32512, "expressive": 32768}[layout]


def test_base_tokenizer_extends_to_expressive(golden_dir):
    released = _golden_tok(golden_dir).read_bytes()
    base, _, _ = extend_tokenizer_proto(_strip_to_llama2(released), "base")
    expr, kept, n = extend_tokenizer_proto(base, "expressive")
    assert kept == 32503 and _pieces(expr) == _pieces(released)[:n]
    # a cut inside the [Hu] block is a valid prefix: it completes to the same tokenizer
    assert _pieces(extend_tokenizer_proto(_strip_to_llama2(released, 32100), "expressive")[0]) == _pieces(released)
    from sentencepiece import sentencepiece_model_pb2 as pb

    odd = pb.ModelProto()
    odd.ParseFromString(_strip_to_llama2(released))
    odd.pieces.add(piece="[Hu0]", score=0.0, type=pb.ModelProto.SentencePiece.Type.USER_DEFINED)
    with pytest.raises(VocabExtensionError, match="contiguous"):
        extend_tokenizer_proto(odd.SerializeToString(), "expressive")  # [Hu0] without the markers before it
    with pytest.raises(VocabExtensionError, match="layout must be"):
        spiritlm_pieces("huge")
    with pytest.raises(VocabExtensionError, match="not a SentencePiece"):
        extend_tokenizer_proto(b"\x00garbage", "base")


@pytest.mark.parametrize("layout,rows", [("base", 32512), ("expressive", 32768)])
def test_extend_hf_checkpoint(llama2_dir, tmp_path, layout, rows):
    out = extend_checkpoint(llama2_dir, tmp_path / "ext", layout, seed=7)
    cfg, params = load_converted(out)
    assert cfg.vocab_size == rows
    _, src = load_hf_params(llama2_dir, dtype="float32")
    emb, head = np.asarray(params["embed"]["embedding"]), np.asarray(params["lm_head"])
    # existing rows copied bit for bit, every other weight untouched
    assert np.array_equal(emb[:32000], src["embed"]["embedding"])
    assert np.array_equal(head[:32000], src["lm_head"])
    assert np.array_equal(np.asarray(params["layers"]["attn"]["q"]), src["layers"]["attn"]["q"])
    # new rows follow the stated init: input ~ mean + std*N(0,1), output ~ mean + 0.1*std*N(0,1)
    old = src["embed"]["embedding"].astype(np.float64)
    new = emb[32000:].astype(np.float64)
    # 512+ samples per dimension: sample mean within 4 standard errors, sample std within 15%
    se = old.std(0) / np.sqrt(len(new))
    assert np.all(np.abs(new.mean(0) - old.mean(0)) < 4 * se + 1e-7)
    assert np.allclose(new.std(0), old.std(0), rtol=0.15)
    hnew = head[32000:].astype(np.float64)
    assert np.allclose(hnew.std(0), 0.1 * src["lm_head"].std(0), rtol=0.15)
    assert len({tuple(r) for r in new}) == len(new)  # rows distinct
    # the tokenizer and model agree on the Spirit LM layout
    vocab = TextTokenizer.from_dir(out, n_embed=cfg.vocab_size).vocab
    assert vocab == Vocab.spiritlm_default(expressive=layout == "expressive")
    meta = json.loads((out / "config.json").read_text())
    assert meta["vocab_extension"]["kept_rows"] == 32000 and meta["vocab_extension"]["seed"] == 7
    # deterministic per seed
    again, _ = load_converted(extend_checkpoint(llama2_dir, tmp_path / "ext2", layout, seed=7))[1], None
    assert np.array_equal(np.asarray(again["embed"]["embedding"]), emb)


def test_extended_model_keeps_text_predictions(llama2_dir, tmp_path):
    # On text input, the logits of the existing tokens are unchanged, and the new tokens start near the
    # average text logit, so they take little probability mass before training.
    out = extend_checkpoint(llama2_dir, tmp_path / "ext", "expressive")
    cfg, params = load_converted(out)
    _, src = load_hf_params(llama2_dir, dtype="float32")
    src_cfg = cfg.replace(vocab_size=32000)
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 32000, (1, 12)))
    new = np.asarray(Llama(cfg).apply({"params": params}, ids)[0])
    old = np.asarray(Llama(src_cfg).apply({"params": jax.tree.map(jnp.asarray, src)}, ids)[0])
    # Same weights; only the wider head matmul blocks its sums differently (measured ≤ 3e-8 here).
    assert np.abs(new[..., :32000] - old).max() <= 1e-6
    p = jax.nn.softmax(new, -1)
    share = float(p[..., 32000:].sum(-1).max())
    assert share < 2 * (768 / 32768)  # ≤ twice the share a uniform-average new token would get


def test_extend_converted_base_to_expressive(llama2_dir, tmp_path):
    base = extend_checkpoint(llama2_dir, tmp_path / "base", "base", seed=1)
    expr = extend_checkpoint(base, tmp_path / "expr", "expressive", seed=2)
    _, pb_ = load_converted(base)
    cfg, pe = load_converted(expr)
    assert cfg.vocab_size == 32768
    # the 32503 tokens of Base are kept; its 9 padding rows become [Pi0..8] (re-initialised)
    assert np.array_equal(np.asarray(pe["embed"]["embedding"])[:32503], np.asarray(pb_["embed"]["embedding"])[:32503])
    assert not np.array_equal(np.asarray(pe["embed"]["embedding"])[32503:32512],
                              np.asarray(pb_["embed"]["embedding"])[32503:32512])


def test_extension_errors(llama2_dir, tmp_path, golden_dir):
    with pytest.raises(VocabExtensionError, match="layout must be"):
        extend_checkpoint(llama2_dir, tmp_path / "x", "large")
    with pytest.raises(FileExistsError, match="overwrite"):
        d = tmp_path / "full"
        d.mkdir()
        (d / "f").write_text("x")
        extend_checkpoint(llama2_dir, d, "base")
    no_tok = tmp_path / "notok"
    no_tok.mkdir()
    (no_tok / "config.json").write_text((llama2_dir / "config.json").read_text())
    with pytest.raises(VocabExtensionError, match="no tokenizer.model"):
        extend_checkpoint(no_tok, tmp_path / "y", "base")
    # an Expressive checkpoint cannot shrink to Base
    expr = extend_checkpoint(llama2_dir, tmp_path / "e", "expressive")
    with pytest.raises(VocabExtensionError, match="not as a contiguous prefix|more than"):
        extend_checkpoint(expr, tmp_path / "b", "base")
