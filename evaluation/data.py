"""Readers for the evaluation benchmarks' standard file layouts (docs/eval.md describes each one).

Nothing is downloaded: every reader takes a path the user points to. Audio paths are returned as
absolute paths (relative ones are resolved against the file or folder that names them); the audio is
loaded only when a task tokenizes it.

* pairs (sWUGGY, sBLIMP, BLiMP text, spoken StoryCloze as whole utterances): ``read_pairs``
* StoryCloze with separate context and endings (T, S, T→S, S→T): ``read_storycloze``
* ASR / TTS utterances (LibriSpeech tree, or JSONL): ``read_utterances``
* labelled utterances (intent classification): ``read_labelled``
* STSP manifests and few-shot files (the original's layout, REFERENCE §10.1): ``read_jsonl``
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

AUDIO_EXTS = (".wav", ".flac", ".ogg", ".mp3")


class DataError(ValueError):
    pass


@dataclasses.dataclass
class PairItem:
    """One minimal pair: ``good`` should score higher than ``bad``. Contents are text (modality
    "text") or audio paths (modality "speech")."""

    id: str
    good: Any
    bad: Any
    modality: str
    meta: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class ClozeItem:
    """A story with its two candidate endings, in text and/or speech (audio paths)."""

    id: str
    context_text: str | None = None
    correct_text: str | None = None
    wrong_text: str | None = None
    context_audio: str | None = None
    correct_audio: str | None = None
    wrong_audio: str | None = None


@dataclasses.dataclass
class Utterance:
    id: str
    audio: str | None
    text: str | None
    label: str | None = None


def _resolve(base: Path, p: str) -> str:
    q = Path(os.path.expanduser(p))
    return str(q if q.is_absolute() else (base / q).resolve())


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{p}:{n}: each line must be a JSON object")
        out.append(rec)
    if not out:
        raise DataError(f"{p}: no records")
    return out


def _find_audio(folder: Path, name: str) -> str:
    cand = folder / name
    if cand.suffix.lower() in AUDIO_EXTS and cand.is_file():
        return str(cand.resolve())
    for ext in AUDIO_EXTS:
        c = folder / f"{name}{ext}"
        if c.is_file():
            return str(c.resolve())
    raise DataError(f"audio for {name!r} not found in {folder} (tried {', '.join(AUDIO_EXTS)})")


# ------------------------------------------------------------------------------------------ pairs
def read_pairs(path: str | os.PathLike) -> list[PairItem]:
    """Minimal pairs from one of:

    * a ZeroSpeech 2021 folder (``lexical/dev`` = sWUGGY, ``syntactic/dev`` = sBLIMP): ``gold.csv``
      with at least the columns ``id``, ``filename``, ``correct`` (1/0 or True/False), audio files
      ``<filename>.wav`` beside it; rows sharing an ``id`` form a pair (one correct row; each
      incorrect row gives one pair);
    * a spoken-StoryCloze folder of ``<id>_correct.wav`` / ``<id>_incorrect.wav`` (whole stories);
    * a JSONL file: ``{"id", "good", "bad", "modality": "text"|"speech"}`` (speech: audio paths,
      relative to the file) or BLiMP's own records ``{"pairID", "sentence_good", "sentence_bad"}``.
    """
    p = Path(path)
    if p.is_dir():
        if (p / "gold.csv").is_file():
            return _read_zerospeech(p)
        corr = sorted(p.glob("*_correct.*"))
        if corr:
            return _read_spoken_cloze_dir(p, corr)
        raise DataError(f"{p}: a pairs folder needs gold.csv (ZeroSpeech layout) or <id>_correct/<id>_incorrect "
                        f"audio files (spoken StoryCloze layout)")
    recs = read_jsonl(p)
    out = []
    for n, r in enumerate(recs):
        if "sentence_good" in r and "sentence_bad" in r:
            out.append(PairItem(str(r.get("pairID", n)), r["sentence_good"], r["sentence_bad"], "text",
                                {k: r[k] for k in ("UID", "linguistics_term") if k in r}))
            continue
        if "good" not in r or "bad" not in r:
            raise DataError(f"{p}: record {n} needs 'good' and 'bad' (or BLiMP's sentence_good/sentence_bad)")
        mod = str(r.get("modality", "text")).lower()
        if mod not in ("text", "speech"):
            raise DataError(f"{p}: record {n}: modality must be 'text' or 'speech', got {mod!r}")
        g, b = r["good"], r["bad"]
        if mod == "speech":
            g, b = _resolve(p.parent, g), _resolve(p.parent, b)
        out.append(PairItem(str(r.get("id", n)), g, b, mod))
    return out


def _truthy(v: str) -> bool:
    s = str(v).strip().lower()
    if s in ("1", "true", "yes"):
        return True
    if s in ("0", "false", "no", "-1"):
        return False
    raise DataError(f"cannot read {v!r} as correct/incorrect (use 1/0 or True/False)")


def _read_zerospeech(folder: Path) -> list[PairItem]:
    with open(folder / "gold.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"id", "filename", "correct"}
    if not rows or not need <= set(rows[0]):
        raise DataError(f"{folder / 'gold.csv'}: needs the columns {sorted(need)}, has "
                        f"{sorted(rows[0]) if rows else 'no rows'}")
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(r["id"], []).append(r)
    out = []
    for gid, rs in groups.items():
        good = [r for r in rs if _truthy(r["correct"])]
        bad = [r for r in rs if not _truthy(r["correct"])]
        if len(good) != 1 or not bad:
            raise DataError(f"{folder / 'gold.csv'}: id {gid} has {len(good)} correct and {len(bad)} incorrect rows; "
                            f"a pair needs exactly one correct and at least one incorrect")
        ga = _find_audio(folder, good[0]["filename"])
        for k, b in enumerate(bad):
            meta = {c: good[0][c] for c in ("word", "type", "subtype") if c in good[0]}
            out.append(PairItem(gid if len(bad) == 1 else f"{gid}.{k}", ga, _find_audio(folder, b["filename"]),
                                "speech", meta))
    return out


def _read_spoken_cloze_dir(folder: Path, correct_files: list[Path]) -> list[PairItem]:
    out = []
    for c in correct_files:
        sid = c.name.split("_correct.")[0]
        out.append(PairItem(sid, str(c.resolve()), _find_audio(folder, f"{sid}_incorrect"), "speech"))
    return out


# ------------------------------------------------------------------------------------------ StoryCloze
ROC_COLUMNS = ("InputSentence1", "InputSentence2", "InputSentence3", "InputSentence4",
               "RandomFifthSentenceQuiz1", "RandomFifthSentenceQuiz2", "AnswerRightEnding")


def read_storycloze(path: str | os.PathLike) -> list[ClozeItem]:
    """StoryCloze with separate context and endings, from one of:

    * the ROCStories cloze-test CSV (``InputStoryid, InputSentence1..4, RandomFifthSentenceQuiz1/2,
      AnswerRightEnding``; text only);
    * a JSONL manifest ``{"id", "context_text", "correct_text", "wrong_text", "context_audio",
      "correct_audio", "wrong_audio"}`` (any subset with what the chosen direction needs; audio
      paths relative to the file).
    """
    p = Path(path)
    if p.suffix.lower() == ".csv":
        with open(p, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or not set(ROC_COLUMNS) <= set(rows[0]):
            raise DataError(f"{p}: a StoryCloze CSV needs the columns {list(ROC_COLUMNS)}")
        out = []
        for n, r in enumerate(rows):
            ans = str(r["AnswerRightEnding"]).strip()
            if ans not in ("1", "2"):
                raise DataError(f"{p}: row {n}: AnswerRightEnding must be 1 or 2, got {ans!r}")
            e1, e2 = r["RandomFifthSentenceQuiz1"], r["RandomFifthSentenceQuiz2"]
            good, bad = (e1, e2) if ans == "1" else (e2, e1)
            ctx = " ".join(r[f"InputSentence{i}"].strip() for i in range(1, 5))
            out.append(ClozeItem(str(r.get("InputStoryid", n)), ctx, good.strip(), bad.strip()))
        return out
    out = []
    for n, r in enumerate(read_jsonl(p)):
        kw = {k: r.get(k) for k in ("context_text", "correct_text", "wrong_text")}
        for k in ("context_audio", "correct_audio", "wrong_audio"):
            kw[k] = _resolve(p.parent, r[k]) if r.get(k) else None
        out.append(ClozeItem(str(r.get("id", n)), **kw))
    return out


# ------------------------------------------------------------------------------------------ utterances
def read_utterances(path: str | os.PathLike, *, label_key: str | None = None) -> list[Utterance]:
    """Utterances with audio and transcript, from a LibriSpeech folder (``<spk>/<chapter>/
    <spk>-<chapter>.trans.txt`` listing ``<utt-id> <TRANSCRIPT>``, audio ``<utt-id>.flac`` beside it),
    or a JSONL file ``{"id", "audio", "text"[, "label"]}`` (audio relative to the file)."""
    p = Path(path)
    if p.is_dir():
        trans = sorted(p.rglob("*.trans.txt"))
        if not trans:
            raise DataError(f"{p}: no LibriSpeech *.trans.txt files below this folder")
        out = []
        for t in trans:
            for line in t.read_text(encoding="utf-8").splitlines():
                if not line.strip():
                    continue
                uid, _, text = line.partition(" ")
                out.append(Utterance(uid, _find_audio(t.parent, uid), text.strip()))
        return out
    out = []
    for n, r in enumerate(read_jsonl(p)):
        audio = _resolve(p.parent, r["audio"]) if r.get("audio") else None
        if audio is None and r.get("text") is None:
            raise DataError(f"{p}: record {n} has neither 'audio' nor 'text'")
        lab = r.get(label_key) if label_key else None
        if label_key and lab is None:
            raise DataError(f"{p}: record {n} has no {label_key!r}")
        out.append(Utterance(str(r.get("id", n)), audio, r.get("text"), None if lab is None else str(lab)))
    return out


def read_labelled(path: str | os.PathLike, label_key: str = "label") -> list[Utterance]:
    """Intent classification: JSONL ``{"id", "audio" and/or "text", "label"}``."""
    return read_utterances(path, label_key=label_key)


__all__ = ["DataError", "PairItem", "ClozeItem", "Utterance", "read_pairs", "read_storycloze", "read_utterances",
           "read_labelled", "read_jsonl"]


# ------------------------------------------------------------------------------------------ MMLU
@dataclasses.dataclass
class MCQItem:
    """One multiple-choice question (MMLU): 4 choices, ``answer`` is the index of the right one."""

    id: str
    subject: str
    question: str
    choices: tuple[str, ...]
    answer: int


def _read_mmlu_csv(path: Path, subject: str) -> list[MCQItem]:
    out = []
    with open(path, newline="", encoding="utf-8") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row:
                continue
            if len(row) != 6 or row[5].strip() not in ("A", "B", "C", "D"):
                raise DataError(f"{path}: row {i + 1} is not 'question,A,B,C,D,answer' with answer in A-D: {row[:1]}…")
            out.append(MCQItem(f"{subject}/{i}", subject, row[0], tuple(row[1:5]), "ABCD".index(row[5].strip())))
    return out


def read_mmlu(folder: str | os.PathLike, split: str = "test") -> dict[str, list[MCQItem]]:
    """The standard MMLU release layout (Hendrycks et al.): ``<folder>/<split>/<subject>_<split>.csv``
    with header-less rows ``question,A,B,C,D,answer``; the 5-shot exemplars are ``dev/<subject>_dev.csv``.
    Returns {subject: items}."""
    d = Path(folder) / split
    if not d.is_dir():
        raise DataError(f"{d} not found: MMLU expects <data>/{split}/<subject>_{split}.csv (the original release layout)")
    out = {}
    for f in sorted(d.glob(f"*_{split}.csv")):
        subject = f.name[: -len(f"_{split}.csv")]
        out[subject] = _read_mmlu_csv(f, subject)
    if not out:
        raise DataError(f"{d} holds no *_{split}.csv file")
    return out
