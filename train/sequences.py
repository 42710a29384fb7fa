"""Training sequences from prepared documents: text-only, speech-only and word-interleaved; packing.

The recipe (Spirit LM paper, appendix A; REFERENCE.md §12.2): continue training on a mixture of
text-only, speech-only and speech+text sequences, the last interleaved at WORD level — alternating
random spans of ``text_span`` words (default 10–30) written as text and ``speech_span`` words (default
5–15) written as speech units, each switch marked with ``[Text]`` / ``[Speech]``.

String format (exactly what the original tokenizer/prompt builder produce, REFERENCE.md §8.2, §9.2):

* a speech span is ``[Speech]`` + the unit string of the units inside the span's time range, built
  with the original ``units_to_string`` rules — deduplicated HuBERT (Base), plus pitch and style
  interleaved by time (Expressive). Times are ``i / rate`` of each unit's index in the WHOLE utterance
  (so a span that covers the whole utterance gives exactly ``units_to_string`` of it), deduplication
  restarts at each span (a span never starts with a dangling repeat).
* a text span is ``[Text]`` + ``text_prefix`` + the span's transcript words joined by single spaces.
  ``text_prefix`` defaults to one space: the released models write a space after ``[Text]``
  (REFERENCE.md §9.1: model text after a generated ``[Text]`` comes out as ``" i want to see it"``).
* text-only documents are ``[Text]`` + ``text_prefix`` + the text; speech-only ones ``[Speech]`` + the
  full unit string (markers can be switched off with ``mark_single_modality=False``).
* every document starts with BOS (as the tokenizer adds) and, with ``add_eos``, ends with EOS.

Which units belong to a span of words ``a..b`` (times in samples at 16 kHz, stored per unit by
``prepare``): the span covers ``[start(word a), end(word b))``, pauses inside the span included.
A HuBERT unit (40 ms frame ``[start, end)``) belongs to it when its midpoint lies inside, so adjacent
spans partition the HuBERT stream and no unit is in two spans. Pitch (80 ms) and style (1 s) units
belong to it when their interval overlaps it, so every speech span carries its own pitch and style
context, as every string of the original tokenizer starts with a ``[St]`` and a ``[Pi]`` token. A
speech span that would hold no HuBERT unit (words shorter than a frame) is written as text instead.

Token ids are built span by span — units map straight to their ids (``[HuN]`` = ``vocab.hubert.start + N``),
text through the text tokenizer in its after-a-marker context — which equals tokenizing the whole
string with :class:`~spiritlm_jax.text.TextTokenizer` (tested) at a fraction of the cost.

Packing (:func:`pack_and_batch`): each document becomes ``tokens``, ``targets`` (next token within the
document; 0 after its last token) and ``loss_mask`` (1, and 0 on the last token); documents longer
than the sequence length are cut into pieces of at most ``seq_len`` tokens (targets and masks cut
along, so only the true last token of a document is masked); pieces are packed first-fit into rows
with grain's ``FirstFitPackIterDataset`` (``segment_ids`` 1, 2, … per document piece, 0 = padding;
``positions`` restart at 0 per piece), then batched.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from grain.experimental import FirstFitPackIterDataset, FlatMapIterDataset, FlatMapTransform

from spiritlm_jax.units import BASE_FORMAT, EXPRESSIVE_FORMAT, UnitStringFormat

__all__ = [
    "SequenceError",
    "SequenceConfig",
    "Span",
    "Rendered",
    "Document",
    "decode_record",
    "plan_spans",
    "unit_items",
    "SequenceBuilder",
    "document_features",
    "split_document",
    "SplitLongDocuments",
    "pack_and_batch",
    "BATCH_KEYS",
]

MODALITIES = ("text", "speech", "interleaved")
BATCH_KEYS = ("tokens", "positions", "segment_ids", "targets", "loss_mask")


class SequenceError(ValueError):
    """A document or configuration the sequence builder cannot use."""


# ------------------------------------------------------------------------------------------------
# Configuration
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SequenceConfig:
    """How documents become token sequences.

    ``aligned_mixture``: for a document with audio AND word alignment, the probability of writing it
    interleaved, as speech only, or as text only (normalised; the corpus-level mixture of text, speech
    and aligned sources is the loader's ``weights``).
    """

    text_span: tuple[int, int] = (10, 30)
    speech_span: tuple[int, int] = (5, 15)
    aligned_mixture: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: {"interleaved": 1.0, "speech": 0.0, "text": 0.0})
    first_modality: str = "random"  # "random" | "text" | "speech": the modality of an interleaved doc's first span
    expressive: bool = False
    text_prefix: str = " "
    mark_single_modality: bool = True
    add_bos: bool = True
    add_eos: bool = True

    def __post_init__(self):
        for name in ("text_span", "speech_span"):
            lo, hi = getattr(self, name)
            if not (isinstance(lo, (int, np.integer)) and isinstance(hi, (int, np.integer)) and 1 <= lo <= hi):
                raise SequenceError(f"{name} must be (min, max) words with 1 <= min <= max, got {(lo, hi)}")
        bad = set(self.aligned_mixture) - set(MODALITIES)
        if bad or not self.aligned_mixture:
            raise SequenceError(f"aligned_mixture keys must be among {MODALITIES}, got {sorted(self.aligned_mixture)}")
        w = np.array([float(v) for v in self.aligned_mixture.values()])
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise SequenceError(f"aligned_mixture weights must be >= 0 and not all 0, got {dict(self.aligned_mixture)}")
        if self.first_modality not in ("random", "text", "speech"):
            raise SequenceError(f"first_modality must be 'random', 'text' or 'speech', got {self.first_modality!r}")

    @property
    def unit_format(self) -> UnitStringFormat:
        return EXPRESSIVE_FORMAT if self.expressive else BASE_FORMAT


# ------------------------------------------------------------------------------------------------
# Documents (records written by prepare)
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Document:
    """One prepared record, decoded. Unit/word times are sample offsets at 16 kHz; ``*_end`` exclusive."""

    id: str
    kind: str  # "text" | "speech" | "aligned"
    text: str = ""
    num_samples: int = 0
    units: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # stream -> values
    starts: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    ends: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    words: list[str] = dataclasses.field(default_factory=list)
    word_start: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    word_end: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))


def _s(x) -> str:
    return x.decode("utf-8") if isinstance(x, (bytes, np.bytes_)) else str(x)


STREAMS = ("style", "pitch", "hubert")  # the original's item order at equal times


def decode_record(rec: Mapping[str, Any]) -> Document:
    """A record from the prepared dataset (numpy values; strings as bytes) → :class:`Document`."""
    doc = Document(id=_s(rec["id"]), kind=_s(rec["kind"]), text=_s(rec.get("text", b"")),
                   num_samples=int(rec.get("num_samples", 0)))
    for k in STREAMS:
        if k in rec:
            doc.units[k] = np.asarray(rec[k], np.int64)
            doc.starts[k] = np.asarray(rec[f"{k}_start"], np.int64)
            doc.ends[k] = np.asarray(rec[f"{k}_end"], np.int64)
    doc.words = [_s(w) for w in rec.get("words", [])]
    doc.word_start = np.asarray(rec.get("word_start", np.zeros(0)), np.int64)
    doc.word_end = np.asarray(rec.get("word_end", np.zeros(0)), np.int64)
    return doc


# ------------------------------------------------------------------------------------------------
# Interleaving
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Span:
    modality: str  # "text" | "speech"
    start: int  # first word index
    stop: int  # one past the last word index


def plan_spans(n_words: int, rng: np.random.Generator, text_span: tuple[int, int], speech_span: tuple[int, int],
               first: str = "random") -> list[Span]:
    """Alternating text/speech word spans covering ``0..n_words``; each span's length is drawn
    uniformly from its modality's ``(min, max)``; only the last span can be shorter (the document ends)."""
    if n_words <= 0:
        return []
    mod = ("text", "speech")[int(rng.integers(2))] if first == "random" else first
    out, pos = [], 0
    while pos < n_words:
        lo, hi = text_span if mod == "text" else speech_span
        n = min(int(rng.integers(lo, hi + 1)), n_words - pos)
        out.append(Span(mod, pos, pos + n))
        pos += n
        mod = "speech" if mod == "text" else "text"
    return out


def unit_items(doc: Document, fmt: UnitStringFormat, t0: int | None = None,
               t1: int | None = None) -> list[tuple[str, int]]:
    """``(stream, value)`` of the units inside ``[t0, t1)`` (samples; None = the whole document), in
    the original string order: per-stream dedup, then a stable sort by ``index / rate``."""
    streams = [("hubert", fmt.hubert_rate, fmt.hubert_dedup)]
    if fmt.has_pitch:
        streams.insert(0, ("pitch", fmt.pitch_rate, fmt.pitch_dedup))
    if fmt.has_style:
        streams.insert(0, ("style", fmt.style_rate, fmt.style_dedup))
    items: list[tuple[float, str, int]] = []
    for name, rate, dedup in streams:
        if name not in doc.units:
            raise SequenceError(f"document {doc.id!r} has no {name!r} units; it was prepared without the "
                                f"{name} tokenizer (prepare with --expressive for an expressive model)")
        vals = doc.units[name]
        n = len(vals)
        if t0 is None:
            lo, hi = 0, n
        else:
            s, e = doc.starts[name], doc.ends[name]
            if name == "hubert":  # midpoint inside [t0, t1)
                mid2 = s + e
                sel = np.nonzero((mid2 >= 2 * t0) & (mid2 < 2 * t1))[0]
            else:  # overlap with [t0, t1)
                sel = np.nonzero((s < t1) & (e > t0))[0]
            lo, hi = (int(sel[0]), int(sel[-1]) + 1) if len(sel) else (0, 0)
        prev = None
        for i in range(lo, hi):
            v = int(vals[i])
            if not dedup or prev is None or v != prev:
                items.append((i / rate, name, v))  # float64 i / rate, as the original
            prev = v
    items.sort(key=lambda x: x[0])  # stable: style, pitch, hubert at equal times
    return [(name, v) for _, name, v in items]


_TAG = {"hubert": "Hu", "pitch": "Pi", "style": "St"}


def items_to_string(items: Sequence[tuple[str, int]]) -> str:
    return "".join(f"[{_TAG[k]}{v}]" for k, v in items)


@dataclasses.dataclass
class Rendered:
    """A document written out: its string, token ids, and (interleaved) its spans."""

    modality: str  # "text" | "speech" | "interleaved"
    text: str
    ids: np.ndarray
    spans: list[Span] = dataclasses.field(default_factory=list)
    span_units: list[list[tuple[str, int]]] = dataclasses.field(default_factory=list)  # per span ([] for text)


class SequenceBuilder:
    """Document (or raw record) + rng → token sequence, per :class:`SequenceConfig`.

    Use as a grain ``RandomMapTransform``: ``ds.random_map(builder, seed=...)`` gives each element its
    own deterministic rng, so the sequences are reproducible and independent of reading order.
    """

    def __init__(self, tokenizer, config: SequenceConfig = SequenceConfig()):
        self.tok = tokenizer
        self.cfg = config
        self.fmt = config.unit_format
        v = tokenizer.vocab
        if config.expressive and (not len(v.pitch) or not len(v.style)):
            raise SequenceError("expressive sequences need a tokenizer with [PiN] and [StN] tokens; this one has "
                                "none (use the expressive model's tokenizer.model)")
        self._base = {"hubert": v.hubert, "pitch": v.pitch, "style": v.style}
        self._marker = {"text": v.text_marker, "speech": v.speech_marker}
        self._mix_names = list(config.aligned_mixture)
        w = np.array([float(config.aligned_mixture[k]) for k in self._mix_names])
        self._mix_p = w / w.sum()

    # -- pieces ----------------------------------------------------------------------------------
    def _text_ids(self, text: str) -> list[int]:
        # Encoded after a marker, exactly as inside the whole string (no dummy-prefix rule applies).
        ids = self.tok.encode("[Text]" + text, add_bos=False, add_eos=False)
        return ids[1:]

    def _unit_ids(self, items: Sequence[tuple[str, int]], where: str) -> list[int]:
        out = []
        for k, v in items:
            r = self._base[k]
            if not 0 <= v < len(r):
                raise SequenceError(f"{where}: unit [{_TAG[k]}{v}] is not in the vocabulary ({len(r)} "
                                    f"[{_TAG[k]}N] tokens): the corpus was tokenized with another unit vocabulary")
            out.append(r.start + v)
        return out

    def _wrap(self, ids: list[int]) -> np.ndarray:
        if self.cfg.add_bos:
            ids = [self.tok.vocab.bos_id] + ids
        if self.cfg.add_eos:
            ids = ids + [self.tok.vocab.eos_id]
        return np.asarray(ids, np.int32)

    # -- the three forms -------------------------------------------------------------------------
    def text_only(self, text: str) -> Rendered:
        if self.cfg.mark_single_modality:
            s = "[Text]" + self.cfg.text_prefix + text
            ids = [self._marker["text"]] + self._text_ids(self.cfg.text_prefix + text)
        else:
            s = text
            ids = self.tok.encode(text, add_bos=False, add_eos=False)
        return Rendered("text", s, self._wrap(ids))

    def speech_only(self, doc: Document) -> Rendered:
        items = unit_items(doc, self.fmt)
        if not any(k == "hubert" for k, _ in items):
            raise SequenceError(f"document {doc.id!r} has no speech units")
        s = items_to_string(items)
        ids = self._unit_ids(items, doc.id)
        if self.cfg.mark_single_modality:
            s, ids = "[Speech]" + s, [self._marker["speech"]] + ids
        return Rendered("speech", s, self._wrap(ids), [Span("speech", 0, len(doc.words))], [items])

    def interleaved(self, doc: Document, rng: np.random.Generator) -> Rendered:
        if not doc.words:
            raise SequenceError(f"document {doc.id!r} has no aligned words to interleave")
        plan = plan_spans(len(doc.words), rng, self.cfg.text_span, self.cfg.speech_span, self.cfg.first_modality)
        spans: list[Span] = []
        units: list[list[tuple[str, int]]] = []
        for sp in plan:
            its: list[tuple[str, int]] = []
            mod = sp.modality
            if mod == "speech":
                its = unit_items(doc, self.fmt, int(doc.word_start[sp.start]), int(doc.word_end[sp.stop - 1]))
                if not any(k == "hubert" for k, _ in its):
                    mod, its = "text", []  # too short for one frame: write it as text
            if spans and spans[-1].modality == mod:  # merge (only after a speech→text fallback)
                prev = spans.pop()
                units.pop()
                if mod == "speech":  # pragma: no cover - plans alternate; only text spans are merged
                    raise AssertionError("two adjacent speech spans")
                sp = Span(mod, prev.start, sp.stop)
            spans.append(Span(mod, sp.start, sp.stop))
            units.append(its)
        parts: list[str] = []
        ids: list[int] = []
        for sp, its in zip(spans, units):
            if sp.modality == "text":
                t = self.cfg.text_prefix + " ".join(doc.words[sp.start:sp.stop])
                parts.append("[Text]" + t)
                ids += [self._marker["text"]] + self._text_ids(t)
            else:
                parts.append("[Speech]" + items_to_string(its))
                ids += [self._marker["speech"]] + self._unit_ids(its, doc.id)
        return Rendered("interleaved", "".join(parts), self._wrap(ids), spans, units)

    def render(self, doc: Document | Mapping[str, Any], rng: np.random.Generator) -> Rendered:
        if not isinstance(doc, Document):
            doc = decode_record(doc)
        if doc.kind == "text":
            return self.text_only(doc.text)
        if doc.kind == "speech":
            return self.speech_only(doc)
        if doc.kind != "aligned":
            raise SequenceError(f"document {doc.id!r} has unknown kind {doc.kind!r}")
        mode = self._mix_names[int(rng.choice(len(self._mix_names), p=self._mix_p))]
        if mode == "text":
            return self.text_only(" ".join(doc.words))
        if mode == "speech":
            return self.speech_only(doc)
        return self.interleaved(doc, rng)

    def random_map(self, element, rng: np.random.Generator) -> dict[str, np.ndarray]:
        """grain RandomMapTransform entry point: record → per-document features."""
        return document_features(self.render(element, rng).ids)

    __call__ = random_map


# ------------------------------------------------------------------------------------------------
# Packing
# ------------------------------------------------------------------------------------------------

def document_features(ids: np.ndarray) -> dict[str, np.ndarray]:
    """Token ids of one document → ``tokens``, ``targets`` (next token; 0 after the last), ``loss_mask``."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 1 or len(ids) == 0:
        raise SequenceError(f"a document must be a non-empty 1-D id array, got shape {ids.shape}")
    targets = np.zeros_like(ids)
    targets[:-1] = ids[1:]
    mask = np.ones(len(ids), np.float32)
    mask[-1] = 0.0
    return {"tokens": ids, "targets": targets, "loss_mask": mask}


def split_document(features: Mapping[str, np.ndarray], max_len: int) -> list[dict[str, np.ndarray]]:
    """Cut a document's features into consecutive pieces of at most ``max_len`` tokens."""
    n = len(features["tokens"])
    return [{k: np.asarray(v)[i:i + max_len] for k, v in features.items()} for i in range(0, n, max_len)]


class SplitLongDocuments(FlatMapTransform):
    """grain ``FlatMapTransform`` (``max_fan_out`` pieces at most; longer documents are an error)."""

    def __init__(self, max_len: int, max_fan_out: int = 64):
        self.max_len = int(max_len)
        self.max_fan_out = int(max_fan_out)

    def flat_map(self, element):
        pieces = split_document(element, self.max_len)
        if len(pieces) > self.max_fan_out:
            raise SequenceError(f"a document of {len(element['tokens'])} tokens needs {len(pieces)} pieces of "
                                f"{self.max_len}; raise max_fan_out (now {self.max_fan_out}) or cut long audio "
                                f"into shorter files before prepare")
        return pieces


def _finalize(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "tokens": row["tokens"].astype(np.int32),
        "positions": row["tokens_positions"].astype(np.int32),
        "segment_ids": row["tokens_segment_ids"].astype(np.int32),
        "targets": row["targets"].astype(np.int32),
        "loss_mask": row["loss_mask"].astype(np.float32),
    }


def pack_and_batch(ds, seq_len: int, batch_size: int, *, num_packing_bins: int | None = None, seed: int = 0,
                   shuffle_bins: bool = False, max_fan_out: int = 64, drop_remainder: bool = True):
    """grain IterDataset of per-document features → batches per the loader's contract (see loader.py)."""
    if seq_len < 2 or batch_size < 1:
        raise SequenceError(f"need seq_len >= 2 and batch_size >= 1, got {seq_len}, {batch_size}")

    ds = FlatMapIterDataset(ds, SplitLongDocuments(seq_len, max_fan_out))
    ds = FirstFitPackIterDataset(
        ds, length_struct={"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=num_packing_bins or batch_size, seed=seed, shuffle_bins=shuffle_bins)
    ds = ds.map(_finalize)
    return ds.batch(batch_size, drop_remainder=drop_remainder)
