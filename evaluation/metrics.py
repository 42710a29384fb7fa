"""Evaluation metrics: word/character error rate (own Levenshtein, no dependency), accuracy, and the
STSP accuracy of the original's ``eval_stsp.py`` (REFERENCE §10.4).

WER = (substitutions + deletions + insertions) / number of reference words, summed over the corpus
(the corpus-level ratio, as jiwer's ``wer(list, list)`` and the usual ASR papers compute it, not the
mean of per-utterance rates). CER is the same on characters (spaces included, after normalisation).

Text normalisation for WER/CER (``normalize_text``) is the usual LibriSpeech one: lower-case,
Unicode NFKC, apostrophes kept inside words, every other punctuation mark turned into a space,
whitespace collapsed. Pass ``normalize=False`` to score raw strings.
"""
from __future__ import annotations

import dataclasses
import re
import unicodedata
from typing import Iterable, Mapping, Sequence


class MetricError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class EditCounts:
    substitutions: int
    deletions: int
    insertions: int
    hits: int

    @property
    def errors(self) -> int:
        return self.substitutions + self.deletions + self.insertions

    @property
    def ref_len(self) -> int:
        return self.substitutions + self.deletions + self.hits

    def __add__(self, o: "EditCounts") -> "EditCounts":
        return EditCounts(self.substitutions + o.substitutions, self.deletions + o.deletions,
                          self.insertions + o.insertions, self.hits + o.hits)


def edit_counts(ref: Sequence, hyp: Sequence) -> EditCounts:
    """Minimum-edit alignment of two sequences (unit costs), returning the operation counts.

    Among alignments with the minimum total, ties are broken towards substitutions, then deletions,
    then insertions (the same preference as jiwer/rapidfuzz), so counts are deterministic.
    """
    n, m = len(ref), len(hyp)
    # cost[j] = (total, subs, dels, ins) for ref[:i] vs hyp[:j]; tuples compare by total first.
    prev = [(j, 0, 0, j) for j in range(m + 1)]
    for i in range(1, n + 1):
        cur = [(i, 0, i, 0)] + [None] * m
        r = ref[i - 1]
        for j in range(1, m + 1):
            d = prev[j - 1]
            if r == hyp[j - 1]:
                diag = d
            else:
                diag = (d[0] + 1, d[1] + 1, d[2], d[3])
            up = prev[j]
            dele = (up[0] + 1, up[1], up[2] + 1, up[3])
            left = cur[j - 1]
            ins = (left[0] + 1, left[1], left[2], left[3] + 1)
            cur[j] = min((diag, 0), (dele, 1), (ins, 2), key=lambda t: (t[0][0], t[1]))[0]
        prev = cur
    total, s, dl, ins = prev[m]
    return EditCounts(s, dl, ins, n - s - dl)


def edit_distance(ref: Sequence, hyp: Sequence) -> int:
    return edit_counts(ref, hyp).errors


_PUNCT = re.compile(r"[^\w\s']|_")


def normalize_text(s: str) -> str:
    s = unicodedata.normalize("NFKC", s).lower().replace("’", "'")
    s = _PUNCT.sub(" ", s)
    s = re.sub(r"(?<!\w)'|'(?!\w)", " ", s)  # quotes, not apostrophes inside words
    return " ".join(s.split())


def _pairs(refs, hyps) -> list[tuple[str, str]]:
    if isinstance(refs, str) or isinstance(hyps, str):
        refs, hyps = [refs], [hyps]
    refs, hyps = list(refs), list(hyps)
    if len(refs) != len(hyps):
        raise MetricError(f"{len(refs)} references but {len(hyps)} hypotheses: give one hypothesis per reference")
    for i, (r, h) in enumerate(zip(refs, hyps)):
        if not isinstance(r, str) or not isinstance(h, str):
            raise MetricError(f"pair {i}: references and hypotheses must be strings, got "
                              f"{type(r).__name__} / {type(h).__name__}")
    return list(zip(refs, hyps))


def wer_counts(refs, hyps, *, normalize: bool = True) -> EditCounts:
    tot = EditCounts(0, 0, 0, 0)
    for r, h in _pairs(refs, hyps):
        if normalize:
            r, h = normalize_text(r), normalize_text(h)
        tot = tot + edit_counts(r.split(), h.split())
    return tot


def cer_counts(refs, hyps, *, normalize: bool = True) -> EditCounts:
    tot = EditCounts(0, 0, 0, 0)
    for r, h in _pairs(refs, hyps):
        if normalize:
            r, h = normalize_text(r), normalize_text(h)
        tot = tot + edit_counts(list(r), list(h))
    return tot


def _rate(c: EditCounts, what: str) -> float:
    if c.ref_len == 0:
        raise MetricError(f"the references hold no {what} (all empty after normalisation): the error rate is "
                          f"undefined; drop empty references from the data")
    return c.errors / c.ref_len


def wer(refs, hyps, *, normalize: bool = True) -> float:
    """Corpus word error rate (a fraction; multiply by 100 for %)."""
    return _rate(wer_counts(refs, hyps, normalize=normalize), "words")


def cer(refs, hyps, *, normalize: bool = True) -> float:
    """Corpus character error rate (a fraction)."""
    return _rate(cer_counts(refs, hyps, normalize=normalize), "characters")


def accuracy(refs: Sequence, preds: Sequence) -> float:
    refs, preds = list(refs), list(preds)
    if len(refs) != len(preds):
        raise MetricError(f"{len(refs)} labels but {len(preds)} predictions")
    if not refs:
        raise MetricError("no examples to score")
    return sum(r == p for r, p in zip(refs, preds)) / len(refs)


# ------------------------------------------------------------------------------------------ STSP
EMOTION_TO_SENTIMENT = {"happy": "positive", "amused": "positive", "angry": "negative", "sad": "negative",
                        "default": "neutral", "neutral": "neutral"}
# The speech classifier's labels (Expresso styles) -> sentiment, as the original maps them (§10.3).
SPEECH_CLASSIFIER_TO_SENTIMENT = {"happy": "positive", "angry": "negative", "sad": "negative", "default": "neutral"}
SENTIMENTS = ("positive", "negative", "neutral")


@dataclasses.dataclass
class StspScore:
    accuracy: float
    n_scored: int
    n_correct: int
    skipped: list  # ids of reference records without a prediction or a label


def stsp_accuracy(references: Iterable[Mapping], predictions: Iterable[Mapping], label: str = "sentiment",
                  *, require_same_count: bool = True) -> StspScore:
    """The original's metric: references and predictions are records with ``id``; predictions carry
    ``pred``. Ids are compared as strings; duplicate prediction ids are an error; a reference whose id
    has no prediction, or that has no label, is skipped (reported, not counted wrong)."""
    refs = list(references)
    preds = list(predictions)
    if require_same_count and len(refs) != len(preds):
        raise MetricError(f"{len(preds)} predictions for {len(refs)} references (the original asserts equal counts)")
    by_id: dict[str, str] = {}
    for p in preds:
        if "id" not in p or "pred" not in p:
            raise MetricError(f"a prediction record needs 'id' and 'pred', got keys {sorted(p)}")
        k = str(p["id"])
        if k in by_id:
            raise MetricError(f"duplicate prediction id {k}")
        by_id[k] = p["pred"]
    n = correct = 0
    skipped = []
    for r in refs:
        k = str(r.get("id"))
        if label in r:
            gold = r[label]
        elif label == "sentiment" and "emotion" in r:
            if r["emotion"] not in EMOTION_TO_SENTIMENT:
                raise MetricError(f"record {k}: unknown emotion {r['emotion']!r}; known {sorted(EMOTION_TO_SENTIMENT)}")
            gold = EMOTION_TO_SENTIMENT[r["emotion"]]
        else:
            skipped.append(k)
            continue
        if k not in by_id:
            skipped.append(k)
            continue
        n += 1
        correct += int(by_id[k] == gold)
    if n == 0:
        raise MetricError("no reference record could be scored (ids do not match, or labels are missing)")
    return StspScore(correct / n, n, correct, skipped)


__all__ = ["MetricError", "EditCounts", "edit_counts", "edit_distance", "normalize_text", "wer", "cer", "wer_counts",
           "cer_counts", "accuracy", "stsp_accuracy", "StspScore", "EMOTION_TO_SENTIMENT",
           "SPEECH_CLASSIFIER_TO_SENTIMENT", "SENTIMENTS"]
