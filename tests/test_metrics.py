"""WER/CER on known pairs (hand-counted), the edit-distance operation counts, normalisation, the STSP
metric's rules (REFERENCE §10.4), and bad inputs."""
import pytest

from spiritlm_jax.infer import metrics as M


@pytest.mark.parametrize("ref,hyp,counts", [
    ("the cat sat", "the cat sat", (0, 0, 0, 3)),
    ("the cat sat", "the cat sit", (1, 0, 0, 2)),
    ("the cat sat", "the sat", (0, 1, 0, 2)),
    ("the cat sat", "the cat sat down", (0, 0, 1, 3)),
    ("a b c d", "b c d", (0, 1, 0, 3)),
    ("", "x y", (0, 0, 2, 0)),
    ("x y", "", (0, 2, 0, 0)),
])
def test_edit_counts_hand_counted(ref, hyp, counts):
    c = M.edit_counts(ref.split(), hyp.split())
    assert (c.substitutions, c.deletions, c.insertions, c.hits) == counts


def test_edit_distance_classic():
    assert M.edit_distance("kitten", "sitting") == 3
    assert M.edit_distance("flaw", "lawn") == 2
    assert M.edit_distance("", "") == 0


def test_wer_corpus_level():
    refs = ["the cat sat", "hello there world"]
    hyps = ["the cat sit on", "hello world"]
    # pair 1: 1 sub + 1 ins; pair 2: 1 del -> 3 errors / 6 reference words
    assert M.wer(refs, hyps) == pytest.approx(3 / 6)
    assert M.wer("the cat", "the cat") == 0.0


def test_cer_known():
    assert M.cer(["abc"], ["axc"]) == pytest.approx(1 / 3)
    assert M.cer(["ab cd"], ["ab cd e"]) == pytest.approx(2 / 5)  # " e" inserted


def test_normalisation_case_and_punctuation():
    assert M.normalize_text("Hello, World! It's 'quoted' -- done.") == "hello world it's quoted done"
    assert M.wer(["HELLO, WORLD"], ["hello world"]) == 0.0
    assert M.wer(["HELLO, WORLD"], ["hello world"], normalize=False) == 1.0


def test_matches_jiwer_when_installed():
    jiwer = pytest.importorskip("jiwer")
    refs = ["a b c d e f", "one two three", "the quick brown fox"]
    hyps = ["a x c e f g", "one three", "quick the brown fax jumps"]
    assert M.wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert M.cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))
    o = jiwer.process_words(refs, hyps)
    c = M.wer_counts(refs, hyps)
    assert c.errors == o.substitutions + o.deletions + o.insertions


def test_bad_inputs():
    with pytest.raises(M.MetricError, match="2 references but 1 hypotheses"):
        M.wer(["a", "b"], ["a"])
    with pytest.raises(M.MetricError, match="undefined"):
        M.wer([""], ["x"])
    with pytest.raises(M.MetricError, match="must be strings"):
        M.wer([1], ["x"])
    with pytest.raises(M.MetricError, match="no examples"):
        M.accuracy([], [])


def test_accuracy():
    assert M.accuracy(["a", "b", "c", "a"], ["a", "b", "a", "b"]) == 0.5


def test_stsp_accuracy_rules():
    refs = [{"id": 1, "sentiment": "positive"}, {"id": "2", "emotion": "sad"}, {"id": 3, "emotion": "amused"},
            {"id": 4}]  # no label: skipped
    preds = [{"id": "1", "pred": "positive"}, {"id": 2, "pred": "negative"}, {"id": 3, "pred": "neutral"},
             {"id": 5, "pred": "neutral"}]
    s = M.stsp_accuracy(refs, preds)
    assert (s.n_scored, s.n_correct) == (3, 2) and s.accuracy == pytest.approx(2 / 3)
    assert s.skipped == ["4"]
    # label="emotion" compares raw emotions
    s2 = M.stsp_accuracy([{"id": 1, "emotion": "sad"}], [{"id": 1, "pred": "sad"}], label="emotion")
    assert s2.accuracy == 1.0


def test_stsp_accuracy_errors():
    with pytest.raises(M.MetricError, match="duplicate"):
        M.stsp_accuracy([{"id": 1, "sentiment": "positive"}] * 2, [{"id": 1, "pred": "x"}] * 2)
    with pytest.raises(M.MetricError, match="equal counts"):
        M.stsp_accuracy([{"id": 1, "sentiment": "positive"}], [])
    with pytest.raises(M.MetricError, match="unknown emotion"):
        M.stsp_accuracy([{"id": 1, "emotion": "bored"}], [{"id": 1, "pred": "x"}])
