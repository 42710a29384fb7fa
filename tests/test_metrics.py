"""WER/CER on known pairs (hand-counted), the edit-distance operation counts, normalisation, the STSP
metric's rules (REFERENCE §10.4), and bad inputs."""
import pytest

from spiritlm_jax.evaluation import metrics


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
    c = metrics.edit_counts(ref.split(), hyp.split())
    assert (c.substitutions, c.deletions, c.insertions, c.hits) == counts


def test_edit_distance_classic():
    assert metrics.edit_distance("kitten", "sitting") == 3
    assert metrics.edit_distance("flaw", "lawn") == 2
    assert metrics.edit_distance("", "") == 0


def test_wer_corpus_level():
    refs = ["the cat sat", "hello there world"]
    hyps = ["the cat sit on", "hello world"]
    # pair 1: 1 sub + 1 ins; pair 2: 1 del -> 3 errors / 6 reference words
    assert metrics.wer(refs, hyps) == pytest.approx(3 / 6)
    assert metrics.wer("the cat", "the cat") == 0.0


def test_cer_known():
    assert metrics.cer(["abc"], ["axc"]) == pytest.approx(1 / 3)
    assert metrics.cer(["ab cd"], ["ab cd e"]) == pytest.approx(2 / 5)  # " e" inserted


def test_normalisation_case_and_punctuation():
    assert metrics.normalize_text("Hello, World! It's 'quoted' -- done.") == "hello world it's quoted done"
    assert metrics.wer(["HELLO, WORLD"], ["hello world"]) == 0.0
    assert metrics.wer(["HELLO, WORLD"], ["hello world"], normalize=False) == 1.0


def test_matches_jiwer_when_installed():
    jiwer = pytest.importorskip("jiwer")
    refs = ["a b c d e f", "one two three", "the quick brown fox"]
    hyps = ["a x c e f g", "one three", "quick the brown fax jumps"]
    assert metrics.wer(refs, hyps) == pytest.approx(jiwer.wer(refs, hyps))
    assert metrics.cer(refs, hyps) == pytest.approx(jiwer.cer(refs, hyps))
    o = jiwer.process_words(refs, hyps)
    c = metrics.wer_counts(refs, hyps)
    assert c.errors == o.substitutions + o.deletions + o.insertions


def test_bad_inputs():
    with pytest.raises(metrics.MetricError, match="2 references but 1 hypotheses"):
        metrics.wer(["a", "b"], ["a"])
    with pytest.raises(metrics.MetricError, match="undefined"):
        metrics.wer([""], ["x"])
    with pytest.raises(metrics.MetricError, match="must be strings"):
        metrics.wer([1], ["x"])
    with pytest.raises(metrics.MetricError, match="no examples"):
        metrics.accuracy([], [])


def test_accuracy():
    assert metrics.accuracy(["a", "b", "c", "a"], ["a", "b", "a", "b"]) == 0.5


def test_stsp_accuracy_rules():
    refs = [{"id": 1, "sentiment": "positive"}, {"id": "2", "emotion": "sad"}, {"id": 3, "emotion": "amused"},
            {"id": 4}]  # no label: skipped
    preds = [{"id": "1", "pred": "positive"}, {"id": 2, "pred": "negative"}, {"id": 3, "pred": "neutral"},
             {"id": 5, "pred": "neutral"}]
    s = metrics.stsp_accuracy(refs, preds)
    assert (s.n_scored, s.n_correct) == (3, 2) and s.accuracy == pytest.approx(2 / 3)
    assert s.skipped == ["4"]
    # label="emotion" compares raw emotions
    s2 = metrics.stsp_accuracy([{"id": 1, "emotion": "sad"}], [{"id": 1, "pred": "sad"}], label="emotion")
    assert s2.accuracy == 1.0


def test_stsp_accuracy_errors():
    with pytest.raises(metrics.MetricError, match="duplicate"):
        metrics.stsp_accuracy([{"id": 1, "sentiment": "positive"}] * 2, [{"id": 1, "pred": "x"}] * 2)
    with pytest.raises(metrics.MetricError, match="equal counts"):
        metrics.stsp_accuracy([{"id": 1, "sentiment": "positive"}], [])
    with pytest.raises(metrics.MetricError, match="unknown emotion"):
        metrics.stsp_accuracy([{"id": 1, "emotion": "bored"}], [{"id": 1, "pred": "x"}])
