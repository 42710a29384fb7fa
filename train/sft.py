"""Supervised (``recipe=sft``) and preference (``recipe=dpo``) data: records → token sequences whose loss
falls on the response only.

Records (one JSON object per manifest line; ``spiritlm-jax prepare --sft MANIFEST.jsonl``):

* ``{"prompt": [items], "response": [items]}`` — supervised; an item is ``{"text": "..."}`` or
  ``{"audio": "a.wav", "start": s, "end": s}`` (``start``/``end`` in seconds, optional);
* ``{"task": "asr", "audio": ..., "text": ...}`` and ``{"task": "tts", "text": ..., "audio": ...}`` —
  shorthands in EXACTLY the zero-shot prompt formats of our few-shot eval tasks (one definition,
  :func:`spiritlm_jax.evaluation.tasks.asr_prompt` / ``tts_prompt``), so a model is evaluated in the
  format it was tuned on: ASR ``[Speech]<units>[Text]`` → ``<transcript>\\n``, TTS
  ``[Text]<text>[Speech]`` → ``<units>\\n``;
* ``{"prompt": [items], "chosen": [items], "rejected": [items]}`` — a preference pair (DPO), any
  modality mix.

Every item is written as its marker and its content (``[Text]hello``, ``[Speech][Hu3][Hu7]…``: the
original prompt builder's form); speech items become unit strings at prepare time (HuBERT, plus pitch and
style with ``--expressive``, by the original ``units_to_string`` rules), so the prepared dataset stores
``prompt`` / ``response`` / ``chosen`` / ``rejected`` as strings.

Tokens (:func:`supervised_ids`): ``BOS + encode(prompt)`` then the response encoded in the after-a-marker
context (every response starts with a marker or follows one, so this equals tokenizing the whole string),
then EOS. ``loss_mask`` is 1 exactly where the TARGET is a response token (or the EOS). Packing keeps
those masks and the document boundaries (:func:`~spiritlm_jax.train.sequences.pack_and_batch`:
``segment_ids``, restarting ``positions``). A record longer than ``data.seq_len`` is skipped and
counted (a cut response would teach a truncated answer); DPO pairs are padded one per row.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from spiritlm_jax.prompting import SPEECH_PROMPT_PREFIX as SPEECH, TEXT_PROMPT_PREFIX as TEXT

log = logging.getLogger("spiritlm_jax.train")

SFT_KINDS = ("sft", "dpo")


class SftError(ValueError):
    """A supervised / preference record that cannot be used (names the record and the fix)."""


# ------------------------------------------------------------------------------------------------
# Records
# ------------------------------------------------------------------------------------------------

def _items(value, where: str, field: str) -> list[dict]:
    if isinstance(value, (dict, str)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise SftError(f"{where}: '{field}' must be a non-empty list of items ({{\"text\": ...}} or "
                       f"{{\"audio\": path, \"start\": s, \"end\": s}}), got {value!r}")
    out = []
    for it in value:
        if isinstance(it, str):
            it = {"text": it}
        if not isinstance(it, dict) or ("text" in it) == ("audio" in it):
            raise SftError(f"{where}: each '{field}' item needs exactly one of 'text' or 'audio', got {it!r}")
        if "text" in it:
            if not isinstance(it["text"], str) or not it["text"].strip():
                raise SftError(f"{where}: empty text item in '{field}'")
            out.append({"text": it["text"]})
        else:
            a = {"audio": str(it["audio"])}
            for k in ("start", "end"):
                if it.get(k) is not None:
                    a[k] = float(it[k])
            if "start" in a and "end" in a and not a["end"] > a["start"] >= 0:
                raise SftError(f"{where}: audio item {it['audio']!r} needs 0 <= start < end, got {a['start']}, {a['end']}")
            out.append(a)
    return out


def parse_record(d: Mapping[str, Any], where: str) -> dict:
    """One manifest object → ``{"kind": "sft"|"dpo", "prompt": [...], "response"|"chosen"+"rejected": [...]}``
    with items normalised (shorthands expanded to ``{"task": ...}`` form kept for rendering)."""
    if not isinstance(d, dict):
        raise SftError(f"{where}: expected a JSON object")
    task = d.get("task")
    if task is not None:
        if task not in ("asr", "tts"):
            raise SftError(f"{where}: task must be 'asr' or 'tts' (or give prompt/response), got {task!r}")
        if not isinstance(d.get("text"), str) or not d["text"].strip():
            raise SftError(f"{where}: a {task} record needs a non-empty 'text' (the transcript)")
        if "audio" not in d:
            raise SftError(f"{where}: a {task} record needs 'audio'")
        audio = _items([{k: d[k] for k in ("audio", "start", "end") if k in d}], where, "audio")[0]
        return {"kind": "sft", "task": task, "audio": audio, "text": d["text"].strip()}
    if "prompt" not in d:
        raise SftError(f"{where}: a record needs 'prompt' with 'response' (SFT) or 'chosen'+'rejected' (DPO), or "
                       f"'task' (asr/tts); got keys {sorted(d)}")
    rec = {"prompt": _items(d["prompt"], where, "prompt")}
    if "chosen" in d or "rejected" in d:
        rec.update(kind="dpo", chosen=_items(d.get("chosen"), where, "chosen"),
                   rejected=_items(d.get("rejected"), where, "rejected"))
        if rec["chosen"] == rec["rejected"]:
            raise SftError(f"{where}: 'chosen' equals 'rejected': the pair prefers nothing; drop it or fix it")
        return rec
    if "response" not in d:
        raise SftError(f"{where}: a prompt needs a 'response' (SFT) or 'chosen' and 'rejected' (DPO)")
    rec.update(kind="sft", response=_items(d["response"], where, "response"))
    return rec


def audio_items(rec: dict) -> list[dict]:
    """The audio items of a record, in rendering order."""
    if "task" in rec:
        return [rec["audio"]]
    return [it for f in ("prompt", "response", "chosen", "rejected") for it in rec.get(f, []) if "audio" in it]


def render(rec: dict, unit_strings: Sequence[str]) -> dict[str, str]:
    """Strings of a record, given the unit string of each of its audio items (``audio_items`` order)."""
    from spiritlm_jax.evaluation.tasks import asr_prompt, tts_prompt

    units = iter(unit_strings)
    if rec.get("task") == "asr":
        return {"prompt": asr_prompt([], next(units)), "response": rec["text"] + "\n"}
    if rec.get("task") == "tts":
        return {"prompt": tts_prompt([], rec["text"]), "response": next(units) + "\n"}

    def join(items):
        return "".join(TEXT + it["text"] if "text" in it else SPEECH + next(units) for it in items)

    out = {"prompt": join(rec["prompt"])}
    for f in ("response", "chosen", "rejected"):
        if f in rec:
            out[f] = join(rec[f])
    return out


# ------------------------------------------------------------------------------------------------
# Tokens
# ------------------------------------------------------------------------------------------------

def supervised_ids(tokenizer, prompt: str, response: str, *, add_eos: bool = True) -> tuple[np.ndarray, int]:
    """(ids, n_prompt): BOS + prompt tokens, then the response's tokens (+ EOS)."""
    p = tokenizer.encode(prompt, add_bos=True, add_eos=False)
    r = tokenizer.encode(TEXT + response, add_bos=False, add_eos=False)[1:]  # after-a-marker context
    if not r:
        raise SftError(f"empty response after tokenization (prompt {prompt[:60]!r}…)")
    ids = p + r + ([tokenizer.vocab.eos_id] if add_eos else [])
    return np.asarray(ids, np.int32), len(p)


def supervised_features(ids: np.ndarray, n_prompt: int) -> dict[str, np.ndarray]:
    """``tokens``, ``targets`` (next token; 0 after the last), ``loss_mask`` (1 where the target is a
    response token)."""
    ids = np.asarray(ids, np.int32)
    targets = np.zeros_like(ids)
    targets[:-1] = ids[1:]
    mask = np.zeros(len(ids), np.float32)
    mask[n_prompt - 1:len(ids) - 1] = 1.0  # position i predicts ids[i + 1]
    return {"tokens": ids, "targets": targets, "loss_mask": mask}


def pair_row(ids: np.ndarray, n_prompt: int, seq_len: int) -> dict[str, np.ndarray]:
    """One padded DPO row (segment 1 on real tokens, 0 on padding)."""
    f = supervised_features(ids, n_prompt)
    n = len(ids)
    row = {k: np.zeros(seq_len, v.dtype) for k, v in f.items()}
    for k, v in f.items():
        row[k][:n] = v
    row["positions"] = np.where(np.arange(seq_len) < n, np.arange(seq_len), 0).astype(np.int32)
    row["segment_ids"] = (np.arange(seq_len) < n).astype(np.int32)
    return row


class RecordToFeatures:
    """grain map: a prepared ``sft``/``dpo`` record → features, or None (skipped, counted) when it does
    not fit ``seq_len``. ``skipped`` counts by reason; the first skip of each reason is logged."""

    def __init__(self, tokenizer, seq_len: int, kind: str):
        self.tok, self.seq_len, self.kind = tokenizer, int(seq_len), kind
        self.skipped: dict[str, int] = {}

    def _skip(self, reason: str, rid: str, n: int):
        if reason not in self.skipped:
            log.warning("skipping %s record %r: %d tokens > data.seq_len %d (raise data.seq_len to keep such "
                        "records)", self.kind, rid, n, self.seq_len)
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        return None

    def __call__(self, rec):
        s = {k: (v.decode("utf-8") if isinstance(v, (bytes, np.bytes_)) else str(v)) for k, v in rec.items()
             if k in ("id", "prompt", "response", "chosen", "rejected")}
        if self.kind == "sft":
            ids, n_prompt = supervised_ids(self.tok, s["prompt"], s["response"])
            if len(ids) > self.seq_len:
                return self._skip("longer_than_seq_len", s.get("id", "?"), len(ids))
            return supervised_features(ids, n_prompt)
        rows = []
        for f in ("chosen", "rejected"):
            ids, n_prompt = supervised_ids(self.tok, s["prompt"], s[f])
            if len(ids) > self.seq_len:
                return self._skip("longer_than_seq_len", s.get("id", "?"), len(ids))
            rows.append(pair_row(ids, n_prompt, self.seq_len))
        return {k: np.stack([rows[0][k], rows[1][k]]) for k in rows[0]}


def make_iterator(data_dir: str, tokenizer, *, kind: str, seq_len: int, batch_size: int, seed: int = 0,
                  split: str | None = None, shard_index: int | None = None, shard_count: int | None = None,
                  num_epochs: int | None = None):
    """Batches of a prepared ``sft`` (packed, response-only loss) or ``dpo`` (pairs) split, with grain:
    deterministic, host-sharded, checkpointable (``get_state``/``set_state``)."""
    import grain

    from .loader import LoaderError, open_sources
    from .sequences import pack_and_batch

    if kind not in SFT_KINDS:
        raise SftError(f"kind must be one of {SFT_KINDS}")
    sources, _ = open_sources(data_dir)
    split = split or kind
    if split not in sources:
        raise LoaderError(f"{data_dir} has no {split!r} split (it has {sorted(sources)}); prepare the records with "
                          f"`spiritlm-jax prepare --sft MANIFEST.jsonl`")
    if shard_index is None or shard_count is None:
        import jax

        shard_index, shard_count = jax.process_index(), jax.process_count()
    ds = grain.MapDataset.source(sources[split])[shard_index::shard_count]
    if len(ds) == 0:
        raise LoaderError(f"split {split!r} of {data_dir} has no record for host {shard_index} of {shard_count}")
    ds = ds.shuffle(seed=seed % 2**32).repeat(num_epochs)
    tok = tokenizer
    if isinstance(tokenizer, (str, Path)):
        from .loader import _tokenizer

        tok = _tokenizer(str(tokenizer))
    to_features = RecordToFeatures(tok, seq_len, kind)
    it = ds.map(to_features).to_iter_dataset().filter(lambda x: x is not None)
    one_pass = num_epochs is not None  # held-out data: keep the last, partial batch (padded)
    if kind == "dpo":
        batches = iter(it.batch(batch_size, drop_remainder=not one_pass))
    else:
        batches = iter(pack_and_batch(it, seq_len, batch_size, seed=seed, drop_remainder=not one_pass))
    return _PadLastBatch(batches, batch_size) if one_pass else batches


class _PadLastBatch:
    """A one-pass iterator whose last batch may be short: pad it with empty rows (loss_mask 0, segment 0),
    so the compiled step's shapes hold and every held-out record is seen."""

    def __init__(self, it, rows: int):
        self.it, self.rows = it, rows

    def __iter__(self):
        return self

    def __next__(self):
        b = next(self.it)
        n = len(b["tokens"])
        if n == self.rows:
            return b
        return {k: np.concatenate([v, np.zeros((self.rows - n,) + v.shape[1:], v.dtype)]) for k, v in b.items()}

    def get_state(self):
        return self.it.get_state()

    def set_state(self, state):
        self.it.set_state(state)


# ------------------------------------------------------------------------------------------------
# Prepare (the Beam DoFn calls this): records + unit extractor → examples
# ------------------------------------------------------------------------------------------------

def read_sft_manifest(path: str) -> tuple[list[dict], list[dict]]:
    """A JSONL of SFT / DPO records → (items for prepare, skipped). Bad records are counted skips
    (reason ``bad_record`` / ``chosen_equals_rejected``), never silently used."""
    from .prepare import PrepareError, read_bytes

    base = str(Path(path).parent)
    try:
        lines = read_bytes(path).decode("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: cannot read the SFT manifest ({e})") from None
    items, skipped = [], []
    for ln, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{ln}"
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise PrepareError(f"{where}: not a JSON object ({e})") from None
        rid = str(d.get("id", f"{Path(path).stem}:{ln}")) if isinstance(d, dict) else f"{Path(path).stem}:{ln}"
        try:
            rec = parse_record(d, where)
        except SftError as e:
            reason = "chosen_equals_rejected" if "equals 'rejected'" in str(e) else "bad_record"
            skipped.append({"id": rid, "reason": reason, "message": str(e)})
            continue
        for a in audio_items(rec):
            if "://" not in a["audio"] and not Path(a["audio"]).is_absolute():
                a["audio"] = f"{base}/{a['audio']}"
        items.append({"kind": rec["kind"], "id": rid, "record": rec})
    return items, skipped


def process_sft_items(items: Sequence[dict], extractor, expressive: bool) -> tuple[list[tuple[str, dict]], list[dict]]:
    """Prepare-side: load each record's audio (sliced to start/end), tokenize all of a batch in one call,
    render the strings. Returns ([(key, example)], [stats per item]); unreadable or too-short audio is a
    counted skip."""
    from spiritlm_jax.audio import MIN_WAV_CHUNK, SAMPLE_RATE

    from .prepare import _Skip, _empty_example, _empty_stats, _skip_stats, load_audio_file
    from .sequences import Document, items_to_string, unit_items
    from spiritlm_jax.units import BASE_FORMAT, EXPRESSIVE_FORMAT

    fmt = EXPRESSIVE_FORMAT if expressive else BASE_FORMAT
    streams = ("hubert", "pitch", "style") if expressive else ("hubert",)
    stats, ready = [], []
    for it in items:
        wavs = []
        try:
            for a in audio_items(it["record"]):
                wav = load_audio_file(a["audio"])
                lo = int(round(a.get("start", 0.0) * SAMPLE_RATE))
                hi = int(round(a["end"] * SAMPLE_RATE)) if "end" in a else len(wav)
                if hi > len(wav) + int(0.05 * SAMPLE_RATE):
                    raise _Skip("segment_outside_audio", f"{a['audio']}: end {a.get('end')} s is past the audio's "
                                                         f"{len(wav) / SAMPLE_RATE:.2f} s")
                seg = wav[lo:hi]
                if len(seg) < MIN_WAV_CHUNK:
                    raise _Skip("audio_too_short", f"{a['audio']}: {len(seg)} samples, under {MIN_WAV_CHUNK} (80 ms)")
                wavs.append(seg)
        except _Skip as e:
            stats.append(_skip_stats(it["id"], e.reason, str(e)))
            continue
        ready.append((it, wavs))
    flat = [w for _, ws in ready for w in ws]
    units = extractor(flat) if flat else []
    out, k = [], 0
    for it, wavs in ready:
        strings = []
        for w in wavs:
            u = units[k]
            k += 1
            doc = Document(id=it["id"], kind="speech", num_samples=len(w),
                           units={s: u[s] for s in streams}, starts={s: u[f"{s}_start"] for s in streams},
                           ends={s: u[f"{s}_end"] for s in streams})
            strings.append(items_to_string(unit_items(doc, fmt)))
        text = render(it["record"], strings)
        ex = _empty_example(it["id"], it["kind"], streams)
        ex.update(text)
        out.append((it["id"], ex))
        s = _empty_stats()
        s.update(files=1, ok=1, documents=1, seconds=sum(len(w) for w in wavs) / SAMPLE_RATE,
                 hubert_units=sum(len(units[j]["hubert"]) for j in range(k - len(wavs), k)))
        stats.append(s)
    return out, stats
