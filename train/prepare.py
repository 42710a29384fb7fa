"""Corpus preparation: text, audio and aligned audio → a TFDS dataset in ArrayRecord format, on Apache Beam.

Three kinds of input become three splits of one dataset (``spiritlm_corpus/<name>/1.0.0``):

* ``text``: plain-text documents (``.txt`` files — one document per file, per paragraph or per line —
  or ``.jsonl`` files with a ``"text"`` field per line);
* ``speech``: audio files, tokenized to units (speech-only sequences);
* ``aligned``: audio + transcript + word alignment (JSON/TSV/TextGrid/CTM, see
  :mod:`spiritlm_jax.train.alignments`), for word-interleaved sequences.

Speech is tokenized exactly as the original ``SpiritLMTokenizer.encode_units`` (REFERENCE.md §3.3):
100 s chunks, chunks under 1280 samples dropped, each chunk through HuBERT (+ pitch and style for an
expressive corpus) independently — with our batched, jitted tokenizers (many chunks per call). Every
unit is stored with its sample range ``[start, end)`` at 16 kHz inside its chunk (HuBERT frame j of a
chunk at offset c: ``[c + 640 j, c + 640 (j+1))``; pitch code k: 1280 samples; style unit s: 16000
samples, the last one clipped to the chunk), so any word span maps to its units
(:mod:`spiritlm_jax.train.sequences`). Units are stored raw (not deduplicated): the string rules are
applied when sequences are built.

Record features: ``id``, ``kind``, ``text`` (text document, or the aligned transcript's words),
``num_samples``; ``hubert``/``hubert_start``/``hubert_end`` (and ``pitch_*``, ``style_*`` when
expressive; int32); ``words`` (transcript words, display form), ``word_start``/``word_end`` (int64
samples).

The Beam pipeline (one branch per split): read the split's manifest (JSONL) → batch files
(``BatchElements``) → a DoFn that loads the tokenizers once per worker (``setup``), reads and checks
each input (skipping bad ones with a counted reason), tokenizes the batch in one call, and emits
examples. Each branch also combines per-file statistics into ``stats-<split>.json``; Beam metrics
counters (``spiritlm_prepare`` namespace) carry the same counts to the runner's UI. Runs on the
DirectRunner here and on Dataflow/Flink/Spark unchanged (docs/data.md).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from spiritlm_jax.audio import MAX_WAV_CHUNK, MIN_WAV_CHUNK, SAMPLE_RATE, AudioError, chunk_audio, load_audio
from spiritlm_jax.train import alignments as al

__all__ = [
    "PrepareError",
    "AUDIO_EXTENSIONS",
    "ALIGNMENT_EXTENSIONS",
    "UnitExtractor",
    "discover",
    "read_manifest",
    "process_text_item",
    "process_speech_items",
    "merge_stats",
    "format_summary",
    "build_dataset",
    "DATASET_NAME",
]

DATASET_NAME = "spiritlm_corpus"
VERSION = "1.0.0"
SPLITS = ("text", "speech", "aligned", "sft", "dpo")  # sft / dpo: train/sft.py records
AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg", ".mp3", ".opus", ".aiff", ".aif", ".sph")
ALIGNMENT_EXTENSIONS = (".TextGrid", ".textgrid", ".ctm", ".json", ".tsv")
TRANSCRIPT_EXTENSIONS = (".txt", ".lab")
MAX_EXAMPLES_PER_REASON = 20


class PrepareError(ValueError):
    """The corpus description is unusable (no inputs, duplicate ids, bad manifest line, ...)."""


# ------------------------------------------------------------------------------------------------
# File access (local paths, or any filesystem Beam knows: gs://, s3://, hdfs://)
# ------------------------------------------------------------------------------------------------

def _is_url(p: str) -> bool:
    return "://" in str(p)


def read_bytes(path: str) -> bytes:
    if _is_url(path):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.open(str(path)) as f:
            return f.read()
    return Path(path).read_bytes()


def _write_text(path: str, text: str) -> None:
    if _is_url(path):
        from apache_beam.io.filesystems import FileSystems

        with FileSystems.create(str(path)) as f:
            f.write(text.encode("utf-8"))
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(text)


# ------------------------------------------------------------------------------------------------
# Speech units with timestamps
# ------------------------------------------------------------------------------------------------

class UnitExtractor:
    """The original ``SpiritLMTokenizer.encode_units`` on many waveforms at once, with unit times.

    ``speech_tokenizer``: the ``speech_tokenizer`` checkpoint folder (``hubert_25hz/`` and, for
    ``expressive``, ``vqvae_f0_quantizer/`` and ``style_encoder_w2v2/``).
    """

    def __init__(self, speech_tokenizer: str | os.PathLike, expressive: bool = False, *, pitch_backbone: str = "fcpe",
                 fcpe_path: str | None = None, max_batch_samples: int = 1_600_000):
        from spiritlm_jax.hubert_tokenizer import HubertTokenizer

        d = Path(speech_tokenizer)
        self.expressive = bool(expressive)
        self.hubert = HubertTokenizer.from_checkpoint_dir(d, max_batch_samples=max_batch_samples)
        self.hops = {"hubert": self.hubert.hop}
        if self.expressive:
            from spiritlm_jax.pitch_tokenizer import HOP, PitchTokenizer
            from spiritlm_jax.style_tokenizer import StyleTokenizer

            self.pitch = PitchTokenizer.from_checkpoints(d / "vqvae_f0_quantizer", backbone=pitch_backbone,
                                                         fcpe_path=fcpe_path)
            self.style = StyleTokenizer.from_checkpoint_dir(d, max_batch_samples=max_batch_samples)
            self.hops["pitch"] = self.pitch.stride * HOP
            self.hops["style"] = self.style.cfg.encoder.hop * self.style.cfg.pool_size

    @property
    def streams(self) -> tuple[str, ...]:
        return ("hubert", "pitch", "style") if self.expressive else ("hubert",)

    def __call__(self, wavs: Sequence[np.ndarray]) -> list[dict[str, np.ndarray]]:
        """16 kHz mono waveforms → per waveform ``{stream: values, stream_start: ..., stream_end: ...}``.

        A waveform shorter than 1280 samples has no chunk and raises :class:`AudioError`.
        """
        per = [chunk_audio(w, MAX_WAV_CHUNK, MIN_WAV_CHUNK) for w in wavs]
        for i, cs in enumerate(per):
            if not cs:
                raise AudioError(f"waveform {i} has {len(wavs[i])} samples, under the {MIN_WAV_CHUNK} the original "
                                 f"tokenizer needs (80 ms): nothing to tokenize")
        flat = [c for cs in per for c in cs]
        outs = {"hubert": self.hubert.encode_batch(flat)}
        if self.expressive:
            outs["pitch"] = self.pitch.encode_batch(flat)
            outs["style"] = self.style.encode_batch(flat)
        rf, hop = self.hubert.cfg.receptive_field, self.hubert.hop
        results, k = [], 0
        for cs in per:
            rec: dict[str, list] = {}
            for name in self.streams:
                vals, starts, ends = [], [], []
                h = self.hops[name]
                for j, c in enumerate(cs):
                    u = np.asarray(outs[name][k + j])
                    if name == "hubert" and len(u) != (len(c) - rf) // hop + 1:  # our timestamps assume this
                        raise RuntimeError(f"HuBERT gave {len(u)} units for {len(c)} samples, expected "
                                           f"{(len(c) - rf) // hop + 1}")
                    off = j * MAX_WAV_CHUNK
                    s = off + h * np.arange(len(u), dtype=np.int64)
                    vals.append(u.astype(np.int32))
                    starts.append(s)
                    ends.append(np.minimum(s + h, off + len(c)))
                rec[name] = np.concatenate(vals)
                rec[f"{name}_start"] = np.concatenate(starts).astype(np.int32)
                rec[f"{name}_end"] = np.concatenate(ends).astype(np.int32)
            k += len(cs)
            results.append(rec)
        return results


# ------------------------------------------------------------------------------------------------
# Inputs: discovery and manifests
# ------------------------------------------------------------------------------------------------

def _files(root: Path, exts: Sequence[str]) -> list[Path]:
    if root.is_file():
        return [root]
    if not root.is_dir():
        raise PrepareError(f"{root}: no such file or directory")
    lo = {e.lower() for e in exts}
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in lo)


def _sibling(path: Path, exts: Sequence[str], other_root: Path | None = None, base: Path | None = None) -> Path | None:
    cands = [path.with_suffix(e) for e in exts]
    if other_root is not None and base is not None:
        rel = path.relative_to(base) if path.is_relative_to(base) else Path(path.name)
        cands = [(other_root / rel).with_suffix(e) for e in exts] + cands
    return next((c for c in cands if c.is_file()), None)


def discover(text: Sequence[str] = (), audio: Sequence[str] = (), aligned: Sequence[str] = (),
             alignment_dir: str | None = None, manifests: Sequence[str] = (), text_unit: str = "file",
             tier: str | None = None, sft: Sequence[str] = ()) -> tuple[dict[str, list[dict]], list[dict]]:
    """Inputs → (items per split, skipped items). An item is a JSON-able dict the pipeline processes.

    * ``text``: .txt/.jsonl files or folders of them;
    * ``audio``: audio files or folders (speech-only);
    * ``aligned``: audio files or folders whose files have an alignment next to them (same stem, one of
      .TextGrid/.ctm/.json/.tsv) or under ``alignment_dir`` at the same relative path (MFA's output
      layout); a transcript next to the audio (.txt or .lab, MFA's input layout) is optional — without it
      the aligned words are the transcript;
    * ``manifests``: JSONL files, one input per line (see :func:`read_manifest`).
    """
    if text_unit not in ("file", "paragraph", "line"):
        raise PrepareError(f"text_unit must be 'file', 'paragraph' or 'line', got {text_unit!r}")
    items: dict[str, list[dict]] = {k: [] for k in SPLITS}
    skipped: list[dict] = []
    for root in text:
        r = Path(root)
        for f in _files(r, (".txt", ".jsonl")):
            items["text"].append({"kind": "text", "id": _rel_id(f, r), "path": str(f), "unit": text_unit})
    for root in audio:
        r = Path(root)
        for f in _files(r, AUDIO_EXTENSIONS):
            items["speech"].append({"kind": "speech", "id": _rel_id(f, r), "audio": str(f)})
    adir = Path(alignment_dir) if alignment_dir else None
    for root in aligned:
        r = Path(root)
        base = r if r.is_dir() else r.parent
        for f in _files(r, AUDIO_EXTENSIONS):
            a = _sibling(f, ALIGNMENT_EXTENSIONS, adir, base)
            iid = _rel_id(f, r)
            if a is None:
                skipped.append({"id": iid, "reason": "no_alignment",
                                "message": f"{f}: no alignment file (same name, {'/'.join(ALIGNMENT_EXTENSIONS)})"})
                continue
            t = _sibling(f, TRANSCRIPT_EXTENSIONS)
            it = {"kind": "aligned", "id": iid, "audio": str(f), "alignment": str(a)}
            if t is not None:
                it["transcript_path"] = str(t)
            if tier:
                it["tier"] = tier
            items["aligned"].append(it)
    for m in manifests:
        for it in read_manifest(m, text_unit=text_unit, tier=tier):
            items[it["kind"]].append(it)
    for m in sft:  # supervised / preference records (train/sft.py)
        from .sft import read_sft_manifest

        its, bad = read_sft_manifest(m)
        for it in its:
            items[it["kind"]].append(it)
        skipped += [dict(d, split="sft") for d in bad]
    seen: dict[str, str] = {}
    for split, its in items.items():
        for it in its:
            key = f"{split}:{it['id']}"
            if key in seen:
                raise PrepareError(f"two inputs have the id {it['id']!r} in the {split} split ({seen[key]} and "
                                   f"{it.get('audio') or it.get('path')}); give them distinct ids")
            seen[key] = str(it.get("audio") or it.get("path"))
    return items, skipped


def _rel_id(f: Path, root: Path) -> str:
    if root.is_dir():
        return str(f.relative_to(root).with_suffix(""))
    return f.stem


def read_manifest(path: str, text_unit: str = "file", tier: str | None = None) -> list[dict]:
    """A JSONL manifest: each line one input, paths relative to the manifest's folder (or URLs).

    ``{"text": "..."}`` or ``{"text_path": "a.txt"}`` — a text document;
    ``{"audio": "a.wav"}`` — speech only;
    ``{"audio": "a.wav", "alignment": "a.TextGrid", "transcript": "...", "format": "textgrid",
    "tier": "words", "utterance": "utt1"}`` — aligned (``transcript``/``transcript_path``, ``format``,
    ``tier``, ``utterance`` optional). ``"id"`` is optional (default: the line number, or the file stem).
    """
    base = str(path).rsplit("/", 1)[0] if _is_url(path) else str(Path(path).parent)

    def res(p: str) -> str:
        if _is_url(p) or os.path.isabs(p):
            return p
        return f"{base}/{p}"

    out = []
    try:
        lines = read_bytes(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: cannot read the manifest ({e})") from None
    for ln, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{ln}: not a JSON object ({e})") from None
        if not isinstance(d, dict):
            raise PrepareError(f"{path}:{ln}: expected a JSON object")
        iid = str(d.get("id", ""))
        if "audio" in d:
            it = {"id": iid or Path(str(d["audio"])).stem, "audio": res(d["audio"])}
            if "alignment" in d:
                it.update(kind="aligned", alignment=res(d["alignment"]))
                for k in ("format", "tier", "utterance", "transcript"):
                    if d.get(k) is not None:
                        it[k] = d[k]
                if d.get("transcript_path"):
                    it["transcript_path"] = res(d["transcript_path"])
                if tier and "tier" not in it:
                    it["tier"] = tier
            else:
                it["kind"] = "speech"
        elif "text" in d:
            it = {"kind": "text", "id": iid or f"{Path(str(path)).stem}:{ln}", "inline": str(d["text"]), "unit": "file"}
        elif "text_path" in d:
            it = {"kind": "text", "id": iid or Path(str(d["text_path"])).stem, "path": res(d["text_path"]),
                  "unit": text_unit}
        else:
            raise PrepareError(f"{path}:{ln}: a manifest line needs 'audio', 'text' or 'text_path' (got {sorted(d)})")
        out.append(it)
    return out


# ------------------------------------------------------------------------------------------------
# Per-item processing (pure functions; the Beam DoFns call these)
# ------------------------------------------------------------------------------------------------

def _empty_stats() -> dict:
    return {"files": 0, "ok": 0, "documents": 0, "seconds": 0.0, "words": 0, "hubert_units": 0, "pitch_units": 0,
            "style_units": 0, "skipped": {}, "skipped_examples": {}}


def _skip_stats(item_id: str, reason: str, message: str) -> dict:
    s = _empty_stats()
    s["files"] = 1
    s["skipped"] = {reason: 1}
    s["skipped_examples"] = {reason: [f"{item_id}: {message}"]}
    return s


def merge_stats(parts: Iterable[dict]) -> dict:
    out = _empty_stats()
    for p in parts:
        for k in ("files", "ok", "documents", "seconds", "words", "hubert_units", "pitch_units", "style_units"):
            out[k] += p.get(k, 0)
        for r, n in p.get("skipped", {}).items():
            out["skipped"][r] = out["skipped"].get(r, 0) + n
        for r, ex in p.get("skipped_examples", {}).items():
            lst = out["skipped_examples"].setdefault(r, [])
            lst.extend(ex[:max(0, MAX_EXAMPLES_PER_REASON - len(lst))])
    return out


def _empty_example(item_id: str, kind: str, streams: Sequence[str]) -> dict:
    ex = {"id": item_id, "kind": kind, "text": "", "num_samples": 0, "words": [],
          "word_start": np.zeros(0, np.int64), "word_end": np.zeros(0, np.int64)}
    ex.update({f: "" for f in SFT_FIELDS})
    for s in streams:
        for suf in ("", "_start", "_end"):
            ex[s + suf] = np.zeros(0, np.int32)
    return ex


def _split_text(text: str, unit: str) -> list[str]:
    if unit == "file":
        docs = [text.strip()]
    elif unit == "paragraph":
        docs = [p.strip() for p in re.split(r"\n\s*\n", text)]
    else:
        docs = [p.strip() for p in text.splitlines()]
    return [d for d in docs if d]


def process_text_item(item: dict, streams: Sequence[str]) -> tuple[list[tuple[str, dict]], dict]:
    """A text input → ([(key, example)], stats)."""
    iid = item["id"]
    try:
        if "inline" in item:
            docs = _split_text(item["inline"], "file")
        else:
            raw = read_bytes(item["path"]).decode("utf-8")
            if item["path"].endswith(".jsonl"):
                docs = []
                for ln, line in enumerate(raw.splitlines(), 1):
                    if line.strip():
                        d = json.loads(line)
                        if not isinstance(d, dict) or not isinstance(d.get("text"), str):
                            raise ValueError(f"line {ln} has no string 'text' field")
                        docs.append(d["text"].strip())
                docs = [d for d in docs if d]
            else:
                docs = _split_text(raw, item.get("unit", "file"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return [], _skip_stats(iid, "unreadable_text", str(e))
    if not docs:
        return [], _skip_stats(iid, "empty_text", "no text")
    out = []
    for i, d in enumerate(docs):
        ex = _empty_example(iid if len(docs) == 1 else f"{iid}#{i}", "text", streams)
        ex["text"] = d
        out.append((ex["id"], ex))
    s = _empty_stats()
    s.update(files=1, ok=1, documents=len(out), words=sum(len(d.split()) for d in docs))
    return out, s


SFT_FIELDS = ("prompt", "response", "chosen", "rejected")  # rendered strings of sft / dpo records


def load_audio_file(path: str):
    """16 kHz mono waveform of a local path or URL; an unreadable file is a ``_Skip``."""
    try:
        return load_audio(read_bytes(path) if _is_url(path) else path)
    except (OSError, AudioError) as e:
        raise _Skip("unreadable_audio", f"{path}: {e}") from None
    except Exception as e:  # decoders raise assorted errors on corrupt files
        raise _Skip("unreadable_audio", f"{path}: {type(e).__name__}: {e}") from None


def _load_item(item: dict, duration_tolerance: float):
    """Read one speech/aligned input → (wav, words|None); raises (reason, message) as _Skip."""
    iid = item["id"]
    try:
        wav = load_audio(read_bytes(item["audio"]) if _is_url(item["audio"]) else item["audio"])
    except (OSError, AudioError) as e:
        raise _Skip("unreadable_audio", f"{item['audio']}: {e}") from None
    except Exception as e:  # decoders raise assorted errors on corrupt files
        raise _Skip("unreadable_audio", f"{item['audio']}: {type(e).__name__}: {e}") from None
    if len(wav) < MIN_WAV_CHUNK:
        raise _Skip("audio_too_short", f"{item['audio']}: {len(wav)} samples, under {MIN_WAV_CHUNK} (80 ms)")
    if item["kind"] != "aligned":
        return wav, None
    try:
        transcript = item.get("transcript")
        if transcript is None and item.get("transcript_path"):
            try:
                transcript = read_bytes(item["transcript_path"]).decode("utf-8")
            except (OSError, UnicodeDecodeError) as e:
                raise al.AlignmentError(f"{item['transcript_path']}: cannot read the transcript ({e})",
                                        "unreadable_transcript") from None
        try:
            raw = read_bytes(item["alignment"])
        except OSError as e:
            raise al.AlignmentError(f"{item['alignment']}: cannot read ({e})", "unreadable_alignment") from None
        words = al.read_alignment(item["alignment"], item.get("format"), tier=item.get("tier"),
                                  utterance=item.get("utterance"), data=raw)
        words = al.align(words, transcript, len(wav) / SAMPLE_RATE, where=iid, duration_tolerance=duration_tolerance)
    except al.AlignmentError as e:
        raise _Skip(e.reason, str(e)) from None
    return wav, words


class _Skip(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def process_speech_items(items: Sequence[dict], extractor: UnitExtractor, *,
                         duration_tolerance: float = 0.05) -> tuple[list[tuple[str, dict]], list[dict]]:
    """Speech/aligned inputs → ([(key, example)], [stats per item]); bad inputs are skipped with a reason."""
    loaded, stats = [], []
    for it in items:
        try:
            wav, words = _load_item(it, duration_tolerance)
        except _Skip as e:
            stats.append(_skip_stats(it["id"], e.reason, str(e)))
            continue
        loaded.append((it, wav, words))
    if not loaded:
        return [], stats
    try:
        units = extractor([w for _, w, _ in loaded])
    except Exception:  # isolate the item that breaks a batch; the others still go through
        units = []
        keep = []
        for entry in loaded:
            try:
                units.append(extractor([entry[1]])[0])
                keep.append(entry)
            except Exception as e:  # noqa: BLE001 - reported per item
                stats.append(_skip_stats(entry[0]["id"], "tokenizer_error", f"{type(e).__name__}: {e}"))
        loaded = keep
    out = []
    for (it, wav, words), u in zip(loaded, units):
        ex = _empty_example(it["id"], it["kind"], extractor.streams)
        ex["num_samples"] = len(wav)
        ex.update(u)
        if words is not None:
            ex["words"] = [w.text for w in words]
            ex["text"] = " ".join(ex["words"])
            ex["word_start"] = np.array([round(w.start * SAMPLE_RATE) for w in words], np.int64)
            ex["word_end"] = np.array([round(w.end * SAMPLE_RATE) for w in words], np.int64)
        out.append((it["id"], ex))
        s = _empty_stats()
        s.update(files=1, ok=1, documents=1, seconds=len(wav) / SAMPLE_RATE, words=len(ex["words"]),
                 hubert_units=len(u["hubert"]), pitch_units=len(u.get("pitch", ())), style_units=len(u.get("style", ())))
        stats.append(s)
    return out, stats


# ------------------------------------------------------------------------------------------------
# Summary
# ------------------------------------------------------------------------------------------------

def format_summary(per_split: dict[str, dict]) -> str:
    tot = merge_stats(per_split.values())
    lines = ["", "Prepared corpus summary", "-----------------------"]
    for split, s in per_split.items():
        lines.append(f"{split:8s} files {s['files']:>8d}  ok {s['ok']:>8d}  documents {s['documents']:>8d}  "
                     f"speech {s['seconds'] / 3600:9.3f} h  words {s['words']:>10d}  units {s['hubert_units']:>11d}")
    lines.append(f"total    files {tot['files']:>8d}  ok {tot['ok']:>8d}  documents {tot['documents']:>8d}  "
                 f"speech {tot['seconds'] / 3600:9.3f} h  words {tot['words']:>10d}  units {tot['hubert_units']:>11d}"
                 + (f" (+ {tot['pitch_units']} pitch, {tot['style_units']} style)" if tot["pitch_units"] else ""))
    if tot["skipped"]:
        lines.append(f"skipped {sum(tot['skipped'].values())} file(s):")
        for r, n in sorted(tot["skipped"].items(), key=lambda x: -x[1]):
            lines.append(f"  {r}: {n}")
            for ex in tot["skipped_examples"].get(r, [])[:3]:
                lines.append(f"      e.g. {ex[:200]}")
    else:
        lines.append("skipped: none")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# Beam + TFDS
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    """What the workers need (picklable, small)."""

    speech_tokenizer: str | None = None
    expressive: bool = False
    pitch_backbone: str = "fcpe"
    fcpe_path: str | None = None
    batch_files: int = 16
    max_batch_samples: int = 1_600_000
    duration_tolerance: float = 0.05
    work_dir: str = ""  # manifests and stats-<split>.json
    progress: bool = True

    @property
    def streams(self) -> tuple[str, ...]:
        return ("hubert", "pitch", "style") if self.expressive else ("hubert",)


def _features(expressive: bool):
    import tensorflow_datasets as tfds

    f = {
        "id": tfds.features.Text(),
        "kind": tfds.features.Text(),
        "text": tfds.features.Text(),
        "num_samples": tfds.features.Scalar(dtype=np.int64),
        "words": tfds.features.Sequence(tfds.features.Text()),
        "word_start": tfds.features.Tensor(shape=(None,), dtype=np.int64),
        "word_end": tfds.features.Tensor(shape=(None,), dtype=np.int64),
    }
    for name in SFT_FIELDS:
        f[name] = tfds.features.Text()
    for s in ("hubert", "pitch", "style") if expressive else ("hubert",):
        for suf in ("", "_start", "_end"):
            f[s + suf] = tfds.features.Tensor(shape=(None,), dtype=np.int32)
    return tfds.features.FeaturesDict(f)


_BUILDER_CLASS: list = []


def _make_builder_class():
    """The TFDS builder class, defined once per process (TFDS registers classes by name)."""
    if _BUILDER_CLASS:
        return _BUILDER_CLASS[0]
    import tensorflow_datasets as tfds
    from etils import epath

    class SpiritlmCorpus(tfds.core.GeneratorBasedBuilder):
        """Spirit LM training corpus: text, speech units and word-aligned speech (see prepare.py)."""

        VERSION = tfds.core.Version(VERSION)
        # Our package is mapped by an editable-install finder that TFDS's own lookup trips on.
        code_path = epath.Path(__file__)
        RELEASE_NOTES = {str(VERSION): "text / speech / aligned splits; units with per-unit sample ranges"}

        def __init__(self, *, options: PrepareOptions, splits: Sequence[str], totals: dict[str, int], **kw):
            self._opts = options
            self._splits = tuple(splits)
            self._totals = dict(totals)
            super().__init__(**kw)

        def _info(self):
            o = self._opts
            meta = {"expressive": o.expressive, "streams": list(o.streams), "sample_rate": SAMPLE_RATE,
                    "max_wav_chunk": MAX_WAV_CHUNK, "min_wav_chunk": MIN_WAV_CHUNK,
                    "unit_rates_for_strings": {"hubert": 24.99, "pitch": 12.5, "style": 1}}
            return tfds.core.DatasetInfo(builder=self, description=__doc__.split("\n\n")[0],
                                         features=_features(o.expressive),
                                         metadata=tfds.core.MetadataDict(meta))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(s) for s in self._splits}

        def _generate_examples(self, split):
            return _beam_classes()["SplitPipeline"](split, self._opts, self._totals.get(split, 0))

    _BUILDER_CLASS.append(SpiritlmCorpus)
    return SpiritlmCorpus


_BEAM: dict = {}


def _beam_classes():
    if _BEAM:
        return _BEAM
    import apache_beam as beam
    from apache_beam.metrics import Metrics

    ns = "spiritlm_prepare"

    def _count(stats: dict):
        Metrics.counter(ns, "files").inc(stats["files"])
        Metrics.counter(ns, "documents").inc(stats["documents"])
        Metrics.counter(ns, "speech_ms").inc(int(stats["seconds"] * 1000))
        Metrics.counter(ns, "words").inc(stats["words"])
        Metrics.counter(ns, "hubert_units").inc(stats["hubert_units"])
        for r, n in stats["skipped"].items():
            Metrics.counter(ns, f"skipped_{r}").inc(n)

    class _Progress:
        bars: dict = {}

        @classmethod
        def update(cls, split: str, total: int, n: int, enabled: bool):
            if not enabled:
                return
            bar = cls.bars.get(split)
            if bar is None:
                from tqdm.auto import tqdm

                bar = cls.bars[split] = tqdm(total=total or None, desc=f"prepare {split}", unit="file")
            bar.update(n)
            if total and bar.n >= total:
                bar.close()
                cls.bars.pop(split, None)

    class TextDoFn(beam.DoFn):
        def __init__(self, opts: PrepareOptions, split: str, total: int):
            self.opts, self.split, self.total = opts, split, total

        def process(self, item):
            exs, stats = process_text_item(item, self.opts.streams)
            _count(stats)
            _Progress.update(self.split, self.total, 1, self.opts.progress)
            yield from exs
            yield beam.pvalue.TaggedOutput("stats", stats)

    class SpeechDoFn(beam.DoFn):
        def __init__(self, opts: PrepareOptions, split: str, total: int):
            self.opts, self.split, self.total = opts, split, total
            self.extractor = None

        def setup(self):
            o = self.opts
            if o.speech_tokenizer is None:
                raise PrepareError("speech inputs need the speech tokenizer checkpoints (--speech-tokenizer DIR)")
            self.extractor = UnitExtractor(o.speech_tokenizer, o.expressive, pitch_backbone=o.pitch_backbone,
                                           fcpe_path=o.fcpe_path, max_batch_samples=o.max_batch_samples)

        def process(self, batch):
            exs, stats = process_speech_items(batch, self.extractor, duration_tolerance=self.opts.duration_tolerance)
            for s in stats:
                _count(s)
            _Progress.update(self.split, self.total, len(batch), self.opts.progress)
            yield from exs
            for s in stats:
                yield beam.pvalue.TaggedOutput("stats", s)

    def _write_stats(stats: dict, path: str):
        _write_text(path, json.dumps(stats, indent=1))
        return path

    class SplitPipeline(beam.PTransform):
        def __init__(self, split: str, opts: PrepareOptions, total: int):
            super().__init__(label=f"prepare_{split}")
            self.split, self.opts, self.total = split, opts, total

        def expand(self, pbegin):
            o = self.opts
            items = (pbegin | "read_manifest" >> beam.io.ReadFromText(f"{o.work_dir}/manifest-{self.split}.jsonl")
                     | "parse" >> beam.Map(json.loads))
            if self.split == "text":
                res = items | "text" >> beam.ParDo(TextDoFn(o, self.split, self.total)).with_outputs("stats",
                                                                                                     main="examples")
            elif self.split in ("sft", "dpo"):
                res = (items | "batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=o.batch_files)
                       | "records" >> beam.ParDo(SftDoFn(o, self.split, self.total)).with_outputs(
                           "stats", main="examples"))
            else:
                res = (items | "batch" >> beam.BatchElements(min_batch_size=1, max_batch_size=o.batch_files)
                       | "tokenize" >> beam.ParDo(SpeechDoFn(o, self.split, self.total)).with_outputs(
                           "stats", main="examples"))
            _ = (res.stats | "merge_stats" >> beam.CombineGlobally(merge_stats)
                 | "write_stats" >> beam.Map(_write_stats, f"{o.work_dir}/stats-{self.split}.json"))
            return res.examples

    class SftDoFn(beam.DoFn):
        """SFT / DPO records: the speech tokenizers load only if some record has audio."""

        def __init__(self, opts: PrepareOptions, split: str, total: int):
            self.opts, self.split, self.total = opts, split, total
            self.extractor = None

        def process(self, batch):
            from .sft import audio_items, process_sft_items

            o = self.opts
            if self.extractor is None and any(audio_items(it["record"]) for it in batch):
                if o.speech_tokenizer is None:
                    raise PrepareError("records with audio need the speech tokenizer checkpoints (--speech-tokenizer DIR)")
                self.extractor = UnitExtractor(o.speech_tokenizer, o.expressive, pitch_backbone=o.pitch_backbone,
                                               fcpe_path=o.fcpe_path, max_batch_samples=o.max_batch_samples)
            exs, stats = process_sft_items(batch, self.extractor, o.expressive)
            for s in stats:
                _count(s)
            _Progress.update(self.split, self.total, len(batch), o.progress)
            yield from exs
            for s in stats:
                yield beam.pvalue.TaggedOutput("stats", s)

    _BEAM.update(SplitPipeline=SplitPipeline, TextDoFn=TextDoFn, SpeechDoFn=SpeechDoFn, SftDoFn=SftDoFn)
    return _BEAM


def _all_skipped_message(split: str, work: str, items: dict, discovery_skips: Sequence[dict]) -> str:
    """A split whose every input was skipped: TFDS refuses to write it; say why, with the skip summary."""
    per_split = {}
    for s in items:
        try:
            per_split[s] = json.loads(read_bytes(f"{work}/stats-{s}.json").decode("utf-8"))
        except OSError:
            continue
    if discovery_skips:
        extra = merge_stats(_skip_stats(d["id"], d["reason"], d["message"]) for d in discovery_skips)
        per_split["aligned"] = merge_stats([per_split.get("aligned") or _empty_stats(), extra])
    summary = format_summary(per_split) if per_split else "(no statistics were written)"
    return (f"every one of the {len(items.get(split, []))} input(s) of the {split!r} split was skipped, so there is "
            f"nothing to write (TFDS refuses an empty split) and no dataset was created. Fix or remove those "
            f"inputs; the reasons:\n{summary}")

def _has_audio(item: dict) -> bool:
    from .sft import audio_items

    return bool(audio_items(item["record"]))


def build_dataset(items: dict[str, list[dict]], data_dir: str, name: str, options: PrepareOptions, *,
                  beam_args: Sequence[str] = (), discovery_skips: Sequence[dict] = (), overwrite: bool = False):
    """Write the manifests, run the Beam pipeline through TFDS, merge the statistics.

    Returns ``(dataset_dir, per_split_stats)``. ``beam_args`` are Beam pipeline flags
    (``--runner=DataflowRunner --project=... --region=... --temp_location=gs://...``); without a
    ``--runner`` the DirectRunner runs in this process.
    """
    import tensorflow_datasets as tfds
    from apache_beam.options.pipeline_options import PipelineOptions

    splits = [s for s in SPLITS if items.get(s)]
    if not splits:
        raise PrepareError("no inputs to prepare (give --text, --audio, --aligned or --manifest)")
    if not re.fullmatch(r"[a-z0-9_]+", name):
        raise PrepareError(f"the corpus name {name!r} must be lower-case letters, digits and '_' (a TFDS config name)")
    if options.speech_tokenizer is None and (items.get("speech") or items.get("aligned") or any(
            _has_audio(it) for s in ("sft", "dpo") for it in items.get(s, []))):
        raise PrepareError("speech inputs need the speech tokenizer checkpoints (--speech-tokenizer DIR)")
    work = options.work_dir or f"{data_dir}/{DATASET_NAME}/{name}/_prepare"
    options = dataclasses.replace(options, work_dir=work)
    for s in splits:
        _write_text(f"{work}/manifest-{s}.jsonl", "".join(json.dumps(it) + "\n" for it in items[s]))
        stale = f"{work}/stats-{s}.json"
        if not _is_url(stale) and Path(stale).exists():
            Path(stale).unlink()
    cls = _make_builder_class()
    config = tfds.core.BuilderConfig(name=name, version=VERSION,
                                     description=f"expressive={options.expressive}")
    builder = cls(options=options, splits=splits, totals={s: len(items[s]) for s in splits},
                  config=config, data_dir=data_dir, file_format="array_record")
    flags = list(beam_args)
    runner = None
    if not any(a.startswith("--runner") for a in flags):
        import apache_beam as beam

        runner = beam.runners.DirectRunner()
    dl = tfds.download.DownloadConfig(beam_runner=runner, beam_options=PipelineOptions(flags),
                                      download_mode=(tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
                                                     else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS))
    if overwrite and Path(str(builder.data_dir)).exists() and not _is_url(str(builder.data_dir)):
        import shutil

        shutil.rmtree(str(builder.data_dir))
    try:
        builder.download_and_prepare(download_config=dl)
    except Exception as e:  # Beam wraps the worker's error in its own types; TFDS's text names the split
        empty = re.search(r"generated examples is 0 for split (\w+)", str(e))
        if empty is None:
            raise
        raise PrepareError(_all_skipped_message(empty.group(1), work, items, discovery_skips)) from None
    per_split = {}
    for s in splits:
        try:
            per_split[s] = json.loads(read_bytes(f"{work}/stats-{s}.json").decode("utf-8"))
        except OSError:  # a pre-existing dataset was reused: no new statistics
            per_split[s] = None
    if discovery_skips:
        extra = merge_stats(_skip_stats(d["id"], d["reason"], d["message"]) for d in discovery_skips)
        split = next((s for s in ("sft", "dpo") if s in per_split and any(d.get("split") == s for d in discovery_skips)),
                     "aligned")
        per_split[split] = merge_stats([per_split.get(split) or _empty_stats(), extra])
    return str(builder.data_dir), per_split
