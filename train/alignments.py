"""Word alignments: readers for the formats aligners write, and checks against transcript and audio.

Formats (``read_alignment`` picks one from the file extension, or ``fmt=``):

* **TSV** (``.tsv``; our documented simple format): one word per line, ``word<TAB>start<TAB>end``,
  times in seconds. Blank lines and lines starting with ``#`` are ignored; a first line
  ``word<TAB>start<TAB>end`` is a header. Audacity label files (``start<TAB>end<TAB>label``) are
  recognised by their numeric first column.
* **JSON** (``.json``): a list of ``{"word": str, "start": float, "end": float}`` (``"text"`` or
  ``"label"`` also name the word), or ``{"words": [...]}`` of the same, or WhisperX's output
  ``{"segments": [{"words": [{"word", "start", "end", "score"}, ...]}, ...]}``, or Montreal Forced
  Aligner's JSON ``{"tiers": {"words": {"entries": [[start, end, label], ...]}}}``.
* **Praat TextGrid** (``.TextGrid``; MFA's default output), long ("ooTextFile") and short text
  formats, UTF-8 or UTF-16 with a byte-order mark. The tier named ``words`` (or ``<speaker> - words``,
  as MFA names them) is used; a file with one interval tier uses that tier; ``tier=`` picks another.
* **CTM** (``.ctm``; Kaldi/NIST, WhisperX's ``--output_format``-style word timings):
  ``utterance channel start duration word [confidence]`` per line, ``;;`` comments. A file with
  several utterances needs ``utterance=``.

Silence intervals (labels ``""``, ``sil``, ``sp``, ``<eps>``, ``<sil>``, ``silence``, ``SIL``) are dropped.

Checks (each failure raises :class:`AlignmentError` with a short ``reason`` that the ``prepare`` summary
counts): times must be finite, ``0 <= start <= end``, words in time order and not overlapping (beyond
``overlap_tolerance``), inside the audio (an end past the audio's duration by more than
``duration_tolerance`` is an error; a smaller excess is clipped to the duration), and the aligned
words must be exactly the transcript's words after normalisation (case-folded, punctuation removed;
transcript tokens that are punctuation only are attached to the preceding word). Nothing is ever
re-aligned or guessed: a mismatch skips the file.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import unicodedata
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "AlignmentError",
    "Word",
    "AlignedWord",
    "SILENCE_LABELS",
    "FORMATS",
    "read_alignment",
    "read_tsv",
    "read_json",
    "read_textgrid",
    "read_ctm",
    "normalize_word",
    "check_times",
    "match_transcript",
    "align",
    "words_from",
]

SILENCE_LABELS = frozenset({"", "sil", "sp", "<eps>", "<sil>", "silence", "SIL", "[sil]"})
FORMATS = ("tsv", "json", "textgrid", "ctm")


class AlignmentError(ValueError):
    """An alignment that cannot be used. ``reason`` is a short code counted in the prepare summary."""

    def __init__(self, message: str, reason: str = "bad_alignment"):
        super().__init__(message)
        self.reason = reason


@dataclasses.dataclass(frozen=True)
class Word:
    """One aligned word as the aligner wrote it; times in seconds."""

    word: str
    start: float
    end: float


@dataclasses.dataclass(frozen=True)
class AlignedWord:
    """A transcript word (display form, with its punctuation) and its time range in seconds."""

    text: str
    start: float
    end: float


def _num(s, where: str) -> float:
    try:
        v = float(s)
    except (TypeError, ValueError):
        raise AlignmentError(f"{where}: {s!r} is not a number", "unreadable_alignment") from None
    if not math.isfinite(v):
        raise AlignmentError(f"{where}: time {s!r} is not finite", "bad_times")
    return v


def _keep(label: str) -> bool:
    return label.strip() not in SILENCE_LABELS


def _read_text(path: str | os.PathLike, data: bytes | None = None) -> str:
    if data is not None:
        raw = data
    else:
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise AlignmentError(f"{path}: cannot read the alignment file ({e.strerror or e})",
                                 "unreadable_alignment") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        return raw.decode("utf-16")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise AlignmentError(f"{path}: not UTF-8/UTF-16 text ({e})", "unreadable_alignment") from None


# ------------------------------------------------------------------------------------------------
# Readers
# ------------------------------------------------------------------------------------------------

def read_tsv(path: str | os.PathLike, data: bytes | None = None) -> list[Word]:
    """``word<TAB>start<TAB>end`` lines (or Audacity's ``start<TAB>end<TAB>label``)."""
    words = []
    for ln, line in enumerate(_read_text(path, data).splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        cols = line.rstrip("\r\n").split("\t")
        where = f"{path}:{ln}"
        if len(cols) != 3:
            raise AlignmentError(f"{where}: expected 3 tab-separated columns (word, start, end), got {len(cols)}: "
                                 f"{line!r}", "unreadable_alignment")
        if ln == 1 and [c.strip().lower() for c in cols] == ["word", "start", "end"]:
            continue
        if _is_number(cols[0]) and _is_number(cols[1]) and not _is_number(cols[2]):  # Audacity labels
            start, end, w = cols
        else:
            w, start, end = cols
        words.append(Word(w.strip(), _num(start, where), _num(end, where)))
    return [w for w in words if _keep(w.word)]


def _is_number(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def read_json(path: str | os.PathLike, data: bytes | None = None) -> list[Word]:
    """Our JSON list, ``{"words": [...]}``, WhisperX's segments, or MFA's tiers JSON."""
    try:
        data = json.loads(_read_text(path, data))
    except json.JSONDecodeError as e:
        raise AlignmentError(f"{path}: not valid JSON ({e})", "unreadable_alignment") from None
    where = str(path)
    if isinstance(data, dict) and "tiers" in data:  # Montreal Forced Aligner JSON
        tiers = data["tiers"]
        name = "words" if "words" in tiers else next((k for k in tiers if k.endswith(" - words")), None)
        if name is None:
            raise AlignmentError(f"{where}: no 'words' tier among {sorted(tiers)}", "unreadable_alignment")
        out = []
        for i, e in enumerate(tiers[name].get("entries", [])):
            if not isinstance(e, (list, tuple)) or len(e) != 3:
                raise AlignmentError(f"{where}: entry {i} of tier {name!r} is not [start, end, label]",
                                     "unreadable_alignment")
            out.append(Word(str(e[2]), _num(e[0], where), _num(e[1], where)))
        return [w for w in out if _keep(w.word)]
    if isinstance(data, dict) and "segments" in data:  # WhisperX
        items = [w for seg in data["segments"] for w in (seg.get("words") or [])]
    elif isinstance(data, dict) and "words" in data:
        items = data["words"]
    elif isinstance(data, list):
        items = data
    else:
        raise AlignmentError(f"{where}: expected a list of words, {{'words': [...]}}, WhisperX 'segments' or MFA "
                             f"'tiers'", "unreadable_alignment")
    out = []
    for i, it in enumerate(items):
        if not isinstance(it, dict):
            raise AlignmentError(f"{where}: word {i} is not an object", "unreadable_alignment")
        w = next((it[k] for k in ("word", "text", "label") if k in it), None)
        if w is None:
            raise AlignmentError(f"{where}: word {i} has no 'word' field", "unreadable_alignment")
        if "start" not in it or "end" not in it:
            # WhisperX leaves words it could not align (often digits) without timestamps.
            raise AlignmentError(f"{where}: word {i} ({w!r}) has no start/end time (the aligner could not place "
                                 f"it); fix the transcript or re-align", "unaligned_word")
        out.append(Word(str(w).strip(), _num(it["start"], where), _num(it["end"], where)))
    return [w for w in out if _keep(w.word)]


def _textgrid_values(text: str, where: str) -> list:
    """The value stream of a TextGrid (long or short format): quoted strings, numbers, flags."""
    vals: list = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            buf = []
            while True:
                k = text.find('"', j)
                if k < 0:
                    raise AlignmentError(f"{where}: unterminated string in TextGrid", "unreadable_alignment")
                buf.append(text[j:k])
                if k + 1 < n and text[k + 1] == '"':  # "" escapes a quote
                    buf.append('"')
                    j = k + 2
                    continue
                i = k + 1
                break
            vals.append("".join(buf))
        elif c == "[":  # item [1]: / intervals [3]: (long format indices)
            k = text.find("]", i)
            i = n if k < 0 else k + 1
        elif c == "!":  # comment to end of line
            k = text.find("\n", i)
            i = n if k < 0 else k + 1
        elif c == "<":
            k = text.find(">", i)
            vals.append(text[i:k + 1])
            i = n if k < 0 else k + 1
        elif c.isdigit() or (c in "+-." and i + 1 < n and (text[i + 1].isdigit() or text[i + 1] == ".")):
            m = _NUM_RE.match(text, i)
            vals.append(float(m.group(0)))
            i = m.end()
        elif c.isalpha():  # a key of the long format (xmin, intervals, ...)
            while i < n and (text[i].isalnum() or text[i] == "_"):
                i += 1
        else:
            i += 1
    return vals


_NUM_RE = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def read_textgrid(path: str | os.PathLike, tier: str | None = None, data: bytes | None = None) -> list[Word]:
    """Praat TextGrid (long or short format): the words tier's non-silent intervals."""
    where = str(path)
    vals = _textgrid_values(_read_text(path, data), where)
    if len(vals) < 2 or vals[0] != "ooTextFile" or vals[1] != "TextGrid":
        raise AlignmentError(f"{where}: not a Praat TextGrid text file (no 'ooTextFile'/'TextGrid' header)",
                             "unreadable_alignment")
    try:
        pos = 4  # header, xmin, xmax
        if vals[pos] == "<absent>":
            return []
        pos += 1
        n_tiers = int(vals[pos])
        pos += 1
        tiers = {}
        for _ in range(n_tiers):
            cls, name, _x0, _x1, count = vals[pos:pos + 5]
            pos += 5
            count = int(count)
            if cls == "IntervalTier":
                items = [vals[pos + 3 * k:pos + 3 * k + 3] for k in range(count)]
                pos += 3 * count
                tiers[name] = [Word(str(lab).strip(), float(a), float(b)) for a, b, lab in items]
            elif cls == "TextTier":
                pos += 2 * count
            else:
                raise ValueError(f"unknown tier class {cls!r}")
    except (IndexError, ValueError, TypeError) as e:
        raise AlignmentError(f"{where}: malformed TextGrid ({e})", "unreadable_alignment") from None
    if tier is not None:
        if tier not in tiers:
            raise AlignmentError(f"{where}: no interval tier named {tier!r} (tiers: {sorted(tiers)})",
                                 "unreadable_alignment")
        chosen = tier
    else:
        cands = [t for t in tiers if t == "words" or t.endswith(" - words")]
        if len(cands) == 1:
            chosen = cands[0]
        elif len(tiers) == 1:
            chosen = next(iter(tiers))
        else:
            raise AlignmentError(f"{where}: cannot tell which tier holds the words (interval tiers: {sorted(tiers)}); "
                                 f"name it with tier=/--tier", "unreadable_alignment")
    return [w for w in tiers[chosen] if _keep(w.word)]


def read_ctm(path: str | os.PathLike, utterance: str | None = None, data: bytes | None = None) -> list[Word]:
    """CTM lines ``utt channel start duration word [conf]``; one utterance (or ``utterance=``)."""
    per_utt: dict[str, list[Word]] = {}
    for ln, line in enumerate(_read_text(path, data).splitlines(), 1):
        s = line.strip()
        if not s or s.startswith(";;"):
            continue
        cols = s.split()
        where = f"{path}:{ln}"
        if len(cols) not in (5, 6):
            raise AlignmentError(f"{where}: a CTM line has 5 or 6 fields (utt chan start dur word [conf]), got "
                                 f"{len(cols)}: {line!r}", "unreadable_alignment")
        start, dur = _num(cols[2], where), _num(cols[3], where)
        if dur < 0:
            raise AlignmentError(f"{where}: negative duration {dur}", "bad_times")
        per_utt.setdefault(cols[0], []).append(Word(cols[4], start, start + dur))
    if utterance is not None:
        if utterance not in per_utt:
            raise AlignmentError(f"{path}: no utterance {utterance!r} (has {sorted(per_utt)[:5]}...)",
                                 "unreadable_alignment")
        words = per_utt[utterance]
    elif len(per_utt) > 1:
        raise AlignmentError(f"{path}: {len(per_utt)} utterances in one CTM; say which with utterance=",
                             "unreadable_alignment")
    else:
        words = next(iter(per_utt.values()), [])
    words = sorted(words, key=lambda w: w.start)  # CTM lines need not be in time order
    return [w for w in words if _keep(w.word)]


def read_alignment(path: str | os.PathLike, fmt: str | None = None, *, tier: str | None = None,
                   utterance: str | None = None, data: bytes | None = None) -> list[Word]:
    """Read any supported format; ``fmt`` defaults to the one the extension names. ``data``: the
    file's bytes when already read (e.g. from a remote filesystem); ``path`` then only names it."""
    if fmt is None:
        ext = Path(path).suffix.lower().lstrip(".")
        fmt = {"tsv": "tsv", "json": "json", "textgrid": "textgrid", "ctm": "ctm"}.get(ext)
        if fmt is None:
            raise AlignmentError(f"{path}: unknown alignment extension {ext!r}; use .tsv, .json, .TextGrid or .ctm "
                                 f"(or pass the format)", "unreadable_alignment")
    fmt = fmt.lower()
    if fmt == "tsv":
        return read_tsv(path, data)
    if fmt == "json":
        return read_json(path, data)
    if fmt == "textgrid":
        return read_textgrid(path, tier=tier, data=data)
    if fmt == "ctm":
        return read_ctm(path, utterance=utterance, data=data)
    raise AlignmentError(f"unknown alignment format {fmt!r}; choose one of {FORMATS}", "unreadable_alignment")


# ------------------------------------------------------------------------------------------------
# Checks
# ------------------------------------------------------------------------------------------------

def normalize_word(w: str) -> str:
    """Case-folded letters and digits only (NFKC): ``"Hello,"`` and ``"hello"`` compare equal."""
    w = unicodedata.normalize("NFKC", w).casefold()
    return "".join(ch for ch in w if ch.isalnum())


def check_times(words: Sequence[Word], duration: float | None, *, duration_tolerance: float = 0.05,
                overlap_tolerance: float = 0.01, where: str = "alignment") -> list[Word]:
    """Validate times (see module docstring); returns the words with ends clipped to ``duration``."""
    out = []
    prev_end = 0.0
    for i, w in enumerate(words):
        if not (math.isfinite(w.start) and math.isfinite(w.end)):
            raise AlignmentError(f"{where}: word {i} ({w.word!r}) has non-finite times", "bad_times")
        if w.start < 0 or w.end < w.start:
            raise AlignmentError(f"{where}: word {i} ({w.word!r}) has start {w.start} / end {w.end}; need "
                                 f"0 <= start <= end", "bad_times")
        if w.start < prev_end - overlap_tolerance:
            raise AlignmentError(f"{where}: word {i} ({w.word!r}) starts at {w.start:.3f}s before the previous word "
                                 f"ends ({prev_end:.3f}s): words overlap or are out of order", "bad_times")
        prev_end = max(prev_end, w.end)
        if duration is not None and w.end > duration:
            if w.end > duration + duration_tolerance or w.start >= duration:
                raise AlignmentError(
                    f"{where}: word {i} ({w.word!r}) spans {w.start:.3f}-{w.end:.3f}s but the audio lasts "
                    f"{duration:.3f}s: the alignment belongs to another (or a differently trimmed) recording",
                    "word_outside_audio")
            w = Word(w.word, w.start, duration)
        out.append(w)
    return out


def match_transcript(words: Sequence[Word], transcript: str | None, *, where: str = "alignment") -> list[AlignedWord]:
    """Pair aligned words with the transcript's words (display forms keep their punctuation).

    ``transcript=None`` uses the aligned words themselves. Raises on any difference.
    """
    if transcript is None:
        out = [AlignedWord(w.word, w.start, w.end) for w in words]
        if not out:
            raise AlignmentError(f"{where}: the alignment has no words", "empty_transcript")
        return out
    tokens = transcript.split()
    if not tokens:
        raise AlignmentError(f"{where}: the transcript is empty", "empty_transcript")
    # Group punctuation-only tokens with the preceding word (or the following one at the start).
    groups: list[list[str]] = []
    lead: list[str] = []
    for t in tokens:
        if normalize_word(t):
            groups.append(lead + [t])
            lead = []
        elif groups:
            groups[-1].append(t)
        else:
            lead.append(t)
    if not groups:
        raise AlignmentError(f"{where}: the transcript has no words (only punctuation)", "empty_transcript")
    aligned = [w for w in words if normalize_word(w.word)]
    if len(aligned) != len(groups) or any(normalize_word("".join(g)) != normalize_word(w.word)
                                          for g, w in zip(groups, aligned)):
        k = next((i for i, (g, w) in enumerate(zip(groups, aligned))
                  if normalize_word("".join(g)) != normalize_word(w.word)), min(len(groups), len(aligned)))
        got = aligned[k].word if k < len(aligned) else "<end of alignment>"
        want = " ".join(groups[k]) if k < len(groups) else "<end of transcript>"
        raise AlignmentError(
            f"{where}: the alignment does not match the transcript at word {k}: transcript {want!r}, alignment "
            f"{got!r} ({len(groups)} transcript words, {len(aligned)} aligned words)", "alignment_mismatch")
    return [AlignedWord(" ".join(g), w.start, w.end) for g, w in zip(groups, aligned)]


def align(words: Sequence[Word], transcript: str | None, duration: float | None, *, where: str = "alignment",
          duration_tolerance: float = 0.05, overlap_tolerance: float = 0.01) -> list[AlignedWord]:
    """``check_times`` then ``match_transcript``: the words of one utterance, ready for interleaving."""
    words = check_times(words, duration, duration_tolerance=duration_tolerance,
                        overlap_tolerance=overlap_tolerance, where=where)
    return match_transcript(words, transcript, where=where)


def words_from(lines: Iterable[tuple[str, float, float]]) -> list[Word]:
    """Convenience: ``[(word, start, end), ...]`` → ``[Word, ...]``."""
    return [Word(str(w), float(s), float(e)) for w, s, e in lines]
