"""Text tokenizer: golden ids from the reference, the transformers-5 LlamaTokenizer as a live oracle,
and Spirit LM's vocabulary layout."""
import json
import random

import numpy as np
import pytest

from spiritlm_jax.text import TextTokenizer, Vocab, VocabError

LM_DIRS = {"base": "spirit-lm-base-7b", "expressive": "spirit-lm-expressive-7b"}


def _dir(golden_dir, variant):
    return golden_dir / "checkpoints" / "spiritlm_model" / LM_DIRS[variant]


@pytest.fixture(scope="module")
def tok(golden_dir):
    return TextTokenizer.from_dir(_dir(golden_dir, "base"))


# ------------------------------------------------------------------ golden ids
@pytest.mark.parametrize("variant", ["base", "expressive"])
def test_golden_prompt_ids(golden_dir, variant):
    t = TextTokenizer.from_dir(_dir(golden_dir, variant))
    w = json.loads((golden_dir / "cases" / "lm_wrapper.json").read_text())[variant]
    assert t.encode(w["fixed_prompt"]) == w["fixed_prompt_ids"]
    for b in w["built_prompts"]:
        assert t.encode(b["prompt"]) == b["input_ids"], b["tag"]
    z = np.load(golden_dir / "cases" / f"lm_{variant}.npz")
    assert t.encode(str(z["prompt"])) == z["input_ids"].tolist()
    n = 0
    for g in w["wrapper_generate"]:
        if "decoded_full" in g:
            assert t.decode(z[g["tag"] + "_all_ids"]) == g["decoded_full"], g["tag"]
            assert t.batch_decode(z[g["tag"] + "_all_ids"][None])[0] == g["decoded_full"]
            n += 1
    assert n >= 3


def test_leading_marker_gets_no_lone_space_piece(tok):
    # Raw SentencePiece prepends "▁" to the whole string, giving a lone "▁" piece before a leading
    # marker; the reference (and we) prepend it only to a text segment at offset 0.
    import sentencepiece as spm

    raw = spm.SentencePieceProcessor(model_file=str(tok_model_path(tok)))
    s = "[Text]The quick"
    assert raw.id_to_piece(raw.encode(s)[0]) == "\u2581"
    ids = tok.encode(s)
    assert ids[:2] == [1, tok.vocab.text_marker]
    assert tok.decode(ids) == s
    # text after a marker keeps its own leading space, on encode and decode
    assert tok.decode(tok.encode("[Speech][Hu3][Text] hi there")) == "[Speech][Hu3][Text] hi there"
    # a leading space is not doubled (raw SentencePiece gives "▁▁")
    assert tok.encode(" hi") == tok.encode("hi")


def tok_model_path(t):
    return t._model_file


def test_literal_special_tokens_are_their_ids(tok):
    assert tok.encode("<s>a</s>") [:2] == [1, 1] and tok.encode("<s>a</s>")[-1] == 2
    assert tok.decode(tok.encode("<s>a</s>")) == "a"
    assert tok.decode([1, 2, 0], skip_special_tokens=False) == "<s></s><unk>"


# ------------------------------------------------------------------ live oracle (reference class)
def test_matches_transformers_llama_tokenizer(golden_dir, tok):
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaTokenizer.from_pretrained(str(_dir(golden_dir, "base")), add_bos_token=True,
                                                     add_eos_token=False)
    rng = random.Random(0)
    atoms = list("abcdefghijklmnopqrstuvwxyzTHE ,.;:!?-\n\t[]()<>|_0123456789'\"") + [
        " ", "  ", "\u2581", "é", "漢", "🙂", "\u00a0", "[Text]", "[Speech]", "[Hu1]", "[Hu500]", "[Pi7]", "[St99]",
        "<s>", "</s>", "<unk>", "<unused_00001>", "the", "tion", "----", "[Hu", "Hu1]", " [Text]", "[Text] ", "\r"]
    words = [" the", "quick ", " brown", "fox ", " speech", "license", " hello", "world "]
    for _ in range(3000):
        s = "".join(rng.choice(atoms if rng.random() < 0.6 else words) for _ in range(rng.randint(0, 12)))
        ids = hf(s)["input_ids"]
        assert tok.encode(s) == ids, repr(s)
        assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    for _ in range(2000):  # arbitrary ids, incl. invalid UTF-8 byte runs and specials
        ids = [rng.choice([rng.randrange(0, 32667), rng.randrange(0, 700), rng.randrange(3, 259),
                           rng.randrange(32000, 32010), 0, 1, 2]) for _ in range(rng.randint(0, 10))]
        for skip in (True, False):
            assert tok.decode(ids, skip_special_tokens=skip) == hf.decode(
                ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False), ids


# ------------------------------------------------------------------ vocabulary layout
def test_vocab_from_golden_files(golden_dir, tok):
    v = tok.vocab
    cfg = json.loads((_dir(golden_dir, "base") / "config.json").read_text())
    assert v.n_embed == cfg["vocab_size"] and v.n_tokens == len(tok)
    assert (v.text_marker, v.speech_marker) == (32000, 32001)
    assert v.text == range(0, 32000)
    assert v.hubert == range(32002, 32503) and v.pitch == range(32503, 32567) and v.style == range(32567, 32667)
    assert v.hubert_id(0) == 32002 and v.pitch_id(63) == 32566 and v.style_id(99) == 32666
    assert len(v.padding) == 0 and v.special_ids == {0, 1, 2}
    for n in (0, 17, 500):
        assert tok.pieces[v.hubert_id(n)] == f"[Hu{n}]"
    with pytest.raises(VocabError, match=r"\[Pi64\]"):
        v.pitch_id(64)


def test_padding_rows_from_the_model_config(golden_dir):
    t = TextTokenizer(_dir(golden_dir, "base") / "tokenizer.model", n_embed=32768)
    assert t.vocab.padding == range(32667, 32768)
    assert t.decode([32000, 32700, 300]) == t.decode([32000, 300])  # padding ids carry no text


def test_default_layouts_match_the_model_card():
    b, e = Vocab.spiritlm_default(expressive=False), Vocab.spiritlm_default(expressive=True)
    assert (b.n_embed, len(b.padding), len(b.pitch)) == (32512, 9, 0)
    assert (e.n_embed, e.padding, len(e.style)) == (32768, range(32667, 32768), 100)


def test_vocab_errors():
    pieces = ["<unk>", "<s>", "</s>", "a", "[Text]", "[Speech]", "[Hu0]", "[Hu1]"]
    v = Vocab.from_pieces(pieces, 10)
    assert v.hubert == range(6, 8) and len(v.pitch) == 0 and v.padding == range(8, 10)
    with pytest.raises(VocabError, match="contiguous"):
        Vocab.from_pieces(pieces[:7] + ["x", "[Hu1]"])
    with pytest.raises(VocabError, match=r"no \[Speech\]"):
        Vocab.from_pieces([p for p in pieces if p != "[Speech]"])
    with pytest.raises(VocabError, match=r"no \[HuN\]"):
        Vocab.from_pieces(pieces[:6])
    with pytest.raises(VocabError, match="embedding rows"):
        Vocab.from_pieces(pieces, 5)


def test_bad_files_and_inputs(tmp_path, tok):
    with pytest.raises(FileNotFoundError, match="tokenizer.model"):
        TextTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(VocabError, match="not a SentencePiece model"):
        TextTokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(TypeError, match="str"):
        tok.encode(b"bytes")
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), np.int64))


@pytest.mark.parametrize("extra", [{"legacy": True}, {"add_prefix_space": False}])
def test_tokenizer_config_flags_follow_the_reference(golden_dir, tmp_path, extra):
    # legacy=True prepends "▁" to every text segment (also after a marker); add_prefix_space=False never.
    import shutil

    transformers = pytest.importorskip("transformers")
    src = _dir(golden_dir, "base")
    for f in ("tokenizer.model", "config.json", "special_tokens_map.json"):
        shutil.copy(src / f, tmp_path / f)
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg.update(extra)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    hf = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), add_bos_token=True, add_eos_token=False)
    ours = TextTokenizer.from_dir(tmp_path)
    rng = random.Random(1)
    atoms = list("abcT ,.[]<>\n") + [" ", "  ", "[Text]", "[Speech]", "[Hu1]", "<s>", "the", " the", "quick "]
    for _ in range(500):
        s = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 10)))
        ids = hf(s)["input_ids"]
        assert ours.encode(s) == ids, repr(s)
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
    assert ours.encode("[Text]The") != TextTokenizer.from_dir(src).encode("[Text]The") or extra.get("legacy") is None


def test_model_reader_agrees_with_sentencepiece(golden_dir):
    """Our wire-format ModelProto reader (no protobuf dependency) sees what sentencepiece itself sees."""
    import sentencepiece as spm

    from spiritlm_jax.text import _SpModel

    f = golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b" / "tokenizer.model"
    m = _SpModel(f.read_bytes())
    sp = spm.SentencePieceProcessor(model_file=str(f))
    assert [p for p, _ in m.pieces] == [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    assert [t == _SpModel.BYTE for _, t in m.pieces] == [sp.is_byte(i) for i in range(sp.get_piece_size())]
    assert [t == _SpModel.CONTROL for _, t in m.pieces] == [sp.is_control(i) for i in range(sp.get_piece_size())]
    assert (m.unk_id, m.bos_id, m.eos_id, m.pad_id) == (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.pad_id())
    # the rewritten model differs only in the dummy prefix
    sp2 = spm.SentencePieceProcessor(model_proto=m.without_dummy_prefix())
    assert sp.encode("hello world", out_type=str)[0].startswith("\u2581")
    assert not sp2.encode("hello world", out_type=str)[0].startswith("\u2581")
    assert sp2.get_piece_size() == sp.get_piece_size()
