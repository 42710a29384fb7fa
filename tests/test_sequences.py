"""Sequence builder: word-interleaving per the recipe, exact unit-string format, packing."""
import grain
import numpy as np
import pytest

from data_helpers import dedup, synthetic_record, text_record
from spiritlm_jax.text import TextTokenizer
from spiritlm_jax.train.sequences import (SequenceBuilder, SequenceConfig, SequenceError, decode_record,
                                          document_features, pack_and_batch, plan_spans, unit_items)
from spiritlm_jax.units import BASE_FORMAT, EXPRESSIVE_FORMAT, string_to_units, units_to_string


@pytest.fixture(scope="module")
def tok(golden_dir):
    return TextTokenizer.from_dir(golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-expressive-7b")


@pytest.mark.parametrize("lo_hi", [((10, 30), (5, 15)), ((1, 1), (2, 3)), ((4, 4), (4, 4))])
def test_plan_spans_bounds_and_coverage(lo_hi):
    ts, ss = lo_hi
    rng = np.random.default_rng(0)
    for n in [1, 2, 7, 50, 333]:
        for _ in range(20):
            spans = plan_spans(n, rng, ts, ss)
            assert spans[0].start == 0 and spans[-1].stop == n
            for a, b in zip(spans, spans[1:]):
                assert a.stop == b.start and a.modality != b.modality
            for sp in spans[:-1]:
                lo, hi = ts if sp.modality == "text" else ss
                assert lo <= sp.stop - sp.start <= hi
            lo, hi = ts if spans[-1].modality == "text" else ss
            assert 1 <= spans[-1].stop - spans[-1].start <= hi  # the last span ends with the document


@pytest.mark.parametrize("expressive", [False, True])
def test_whole_document_string_is_units_to_string(expressive):
    rng = np.random.default_rng(1)
    fmt = EXPRESSIVE_FORMAT if expressive else BASE_FORMAT
    for _ in range(5):
        doc = decode_record(synthetic_record(rng, n_words=30, expressive=expressive))
        got = "".join(f"[{ {'hubert': 'Hu', 'pitch': 'Pi', 'style': 'St'}[k] }{v}]" for k, v in unit_items(doc, fmt))
        ref = units_to_string({k: " ".join(map(str, v)) for k, v in doc.units.items()}, has_pitch=expressive,
                              has_style=expressive)
        assert got == ref


def _speech_units(doc, t0, t1):
    s, e = doc.starts["hubert"], doc.ends["hubert"]
    inside = [int(v) for v, a, b in zip(doc.units["hubert"], s, e) if t0 <= (a + b) / 2 < t1]
    return inside


@pytest.mark.parametrize("expressive", [False, True])
def test_interleaved_switches_at_words_with_exact_units(tok, expressive):
    rng = np.random.default_rng(2)
    cfg = SequenceConfig(expressive=expressive)
    b = SequenceBuilder(tok, cfg)
    for k in range(8):
        doc = decode_record(synthetic_record(rng, n_words=int(rng.integers(5, 120)), expressive=expressive))
        r = b.interleaved(doc, np.random.default_rng(k))
        # spans: contiguous, alternate, cover every word, lengths within bounds (last may be shorter)
        assert r.spans[0].start == 0 and r.spans[-1].stop == len(doc.words)
        for a, c in zip(r.spans, r.spans[1:]):
            assert a.stop == c.start and a.modality != c.modality
        for sp in r.spans[:-1]:
            lo, hi = cfg.text_span if sp.modality == "text" else cfg.speech_span
            assert lo <= sp.stop - sp.start <= hi
        # the string: one marker per span, text = the span's words, speech = the units in its time range
        pieces = []
        for sp, its in zip(r.spans, r.span_units):
            if sp.modality == "text":
                pieces.append("[Text] " + " ".join(doc.words[sp.start:sp.stop]))
                continue
            t0, t1 = doc.word_start[sp.start], doc.word_end[sp.stop - 1]
            u = string_to_units("[Speech]" + "".join(f"[{ {'hubert': 'Hu', 'pitch': 'Pi', 'style': 'St'}[a] }{v}]"
                                                     for a, v in its))
            assert [int(x) for x in u["hubert"].split()] == dedup(_speech_units(doc, t0, t1))
            if expressive:  # each speech span opens with its style then its pitch, as the original's strings
                assert its[0][0] == "style" and its[1][0] == "pitch"
                ps, pe = doc.starts["pitch"], doc.ends["pitch"]
                want = dedup([int(v) for v, a, c in zip(doc.units["pitch"], ps, pe) if a < t1 and c > t0])
                assert [v for a, v in its if a == "pitch"] == want
            pieces.append("[Speech]" + "".join(f"[{ {'hubert': 'Hu', 'pitch': 'Pi', 'style': 'St'}[a] }{v}]"
                                               for a, v in its))
        assert r.text == "".join(pieces)
        # ids built span by span == the reference tokenizer on the whole string
        assert r.ids.tolist() == tok.encode(r.text) + [tok.vocab.eos_id]


def test_text_and_speech_only(tok):
    b = SequenceBuilder(tok, SequenceConfig())
    r = b.render(text_record("Hello there, general. [Hu3] is literal"), np.random.default_rng(0))
    assert r.text == "[Text] Hello there, general. [Hu3] is literal"
    assert r.ids.tolist() == tok.encode(r.text) + [2]
    doc = synthetic_record(np.random.default_rng(3), kind="speech")
    r = b.render(doc, np.random.default_rng(0))
    assert r.text == "[Speech]" + units_to_string({"hubert": doc["hubert"]})
    assert r.ids.tolist() == tok.encode(r.text) + [2]
    b2 = SequenceBuilder(tok, SequenceConfig(mark_single_modality=False, add_eos=False))
    assert b2.render(text_record("Hi"), np.random.default_rng(0)).ids.tolist() == tok.encode("Hi")


def test_aligned_mixture_weights(tok):
    b = SequenceBuilder(tok, SequenceConfig(aligned_mixture={"interleaved": 1, "speech": 1, "text": 2}))
    rec = synthetic_record(np.random.default_rng(4), n_words=60)
    modes = [b.render(rec, np.random.default_rng(i)).text for i in range(400)]
    n_text = sum(m.startswith("[Text]") and "[Speech]" not in m for m in modes)
    n_speech = sum(m.startswith("[Speech]") and "[Text]" not in m for m in modes)
    # binomial(400, .5) and (400, .25): 5 sigma = 50 and 43
    assert abs(n_text - 200) < 50 and abs(n_speech - 100) < 43


def test_short_speech_span_becomes_text(tok):
    rec = synthetic_record(np.random.default_rng(5), n_words=12)
    rec["word_end"] = rec["word_start"] + 10  # 10-sample words: no HuBERT frame midpoint inside
    r = SequenceBuilder(tok, SequenceConfig(speech_span=(1, 1), text_span=(1, 1))).interleaved(
        decode_record(rec), np.random.default_rng(0))
    # spans of 1-word gaps still switch at words; only the pause-spanning ones hold units
    assert r.spans[-1].stop == 12
    assert all(sp.modality == "text" or units for sp, units in zip(r.spans, r.span_units))


def test_bad_config_and_documents(tok, golden_dir):
    with pytest.raises(SequenceError, match="text_span"):
        SequenceConfig(text_span=(5, 2))
    with pytest.raises(SequenceError, match="aligned_mixture keys"):
        SequenceConfig(aligned_mixture={"video": 1})
    with pytest.raises(SequenceError, match="not all 0"):
        SequenceConfig(aligned_mixture={"text": 0})
    with pytest.raises(SequenceError, match="first_modality"):
        SequenceConfig(first_modality="audio")
    base = SequenceBuilder(tok, SequenceConfig(expressive=True))
    with pytest.raises(SequenceError, match="no 'style' units"):
        base.render(synthetic_record(np.random.default_rng(0)), np.random.default_rng(0))
    rec = synthetic_record(np.random.default_rng(0))
    rec["hubert"][3] = 999
    with pytest.raises(SequenceError, match=r"\[Hu999\] is not in the vocabulary"):
        SequenceBuilder(tok, SequenceConfig(aligned_mixture={"speech": 1})).render(rec, np.random.default_rng(0))
    bad = dict(rec, kind=b"video")
    with pytest.raises(SequenceError, match="unknown kind"):
        SequenceBuilder(tok).render(bad, np.random.default_rng(0))


def _packed(docs, seq_len, batch_size, bins=None):
    ds = grain.MapDataset.source([document_features(d) for d in docs]).to_iter_dataset()
    return list(pack_and_batch(ds, seq_len, batch_size, num_packing_bins=bins, drop_remainder=False))


@pytest.mark.parametrize("seq_len,bins", [(16, None), (37, 3), (64, 8)])
def test_packing_loses_and_duplicates_no_token(seq_len, bins):
    rng = np.random.default_rng(6)
    docs = [rng.integers(3, 1000, size=int(rng.integers(1, 90))).astype(np.int32) for _ in range(60)]
    batches = _packed(docs, seq_len, 4, bins)
    pieces = []
    for b in batches:
        assert set(b) == {"tokens", "positions", "segment_ids", "targets", "loss_mask"}
        assert b["tokens"].dtype == np.int32 and b["loss_mask"].dtype == np.float32
        assert b["tokens"].shape[1] == seq_len
        for r in range(b["tokens"].shape[0]):
            seg = b["segment_ids"][r]
            pad = seg == 0
            assert not b["tokens"][r][pad].any() and not b["loss_mask"][r][pad].any()
            assert (np.diff(seg[~pad]) >= 0).all()
            for s in np.unique(seg[~pad]):
                m = seg == s
                assert (b["positions"][r][m] == np.arange(m.sum())).all()  # positions restart per document
                pieces.append((b["tokens"][r][m], b["targets"][r][m], b["loss_mask"][r][m]))
    # the packed pieces are exactly the documents cut at seq_len, each once (first-fit may reorder them)
    from collections import Counter

    want = Counter()
    for d in docs:
        y = np.append(d[1:], 0).astype(np.int32)  # next token within the document, 0 after the last
        m = np.ones(len(d), np.float32)
        m[-1] = 0  # only the document's true last token is masked
        for i in range(0, len(d), seq_len):
            want[(d[i:i + seq_len].tobytes(), y[i:i + seq_len].tobytes(), m[i:i + seq_len].tobytes())] += 1
    got = Counter((t.tobytes(), y.tobytes(), m.tobytes()) for t, y, m in pieces)
    assert got == want
    assert sum(len(p[0]) for p in pieces) == sum(len(d) for d in docs)


def test_packing_errors():
    ds = grain.MapDataset.source([document_features(np.arange(1, 500, dtype=np.int32))]).to_iter_dataset()
    with pytest.raises(SequenceError, match="max_fan_out"):
        list(pack_and_batch(ds, 8, 1, max_fan_out=4))
    with pytest.raises(SequenceError, match="non-empty"):
        document_features(np.zeros(0, np.int32))
    with pytest.raises(SequenceError, match="seq_len >= 2"):
        pack_and_batch(ds, 1, 1)
