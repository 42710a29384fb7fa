"""Speech from text with the engine's own word timings: eSpeak NG through the ``espeakng-loader`` wheel.

``espeakng-loader`` ships ``libespeak-ng.so`` and its ``espeak-ng-data`` folder on PyPI, so nothing is
installed system-wide and nothing is downloaded at run time. We bind the few C functions we need with
``ctypes`` (no wrapper package fits: ``py-espeak-ng``/``espeakng`` shell out to a system binary, and
``phonemizer`` only phonemizes) and synthesize in the engine's synchronous mode, collecting the
audio and the events the engine emits next to it.

Word timings come from the engine's WORD events (``espeakEVENT_WORD``: the word's character position in
the input and the sample at which its sound starts), never from a forced aligner. A word spans from its
own start sample to the next word's start (the last word to the end of the utterance, the engine's
END/MSG_TERMINATED sample), so consecutive spans tile the utterance and pauses between words belong to
the word before them. A transcript word that no event points at (the engine merged or skipped it) is
NOT guessed: the sentence is skipped with the reason ``unreported_word_timing``.

Audio is rendered at the engine's rate (22 050 Hz), resampled to 16 kHz with a polyphase filter
(``scipy.signal.resample_poly``, 320/441), and word samples are mapped with the same ratio.

Variation (seeded): each sentence draws a voice (language voice + variant, e.g. ``en-us+m3``), a rate
(words per minute) and a pitch (0–100) from the given lists/ranges, so the corpus is not one speaker at
one speed. Unknown voice names are rejected up front (:func:`check_voices`) with the list of available ones.

``synthesize_corpus`` writes, per sentence, ``<id>.wav`` (16 kHz mono PCM_16) and ``<id>.json`` — a
list of ``{"word", "start", "end"}`` in seconds, the JSON alignment format ``prepare --aligned`` reads —
plus a ``<id>.txt`` transcript, and returns the counts (ok, skipped by reason) for the summary.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["TTSError", "Synthesis", "Espeak", "check_voices", "list_voices", "SynthesisOptions",
           "synthesize_corpus", "read_sentences", "TARGET_RATE"]

TARGET_RATE = 16_000

# espeak_AUDIO_OUTPUT, espeak_PARAMETER, espeak_EVENT_TYPE, espeak_POSITION_TYPE, flags (speak_lib.h)
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _VOLUME, _PITCH, _RANGE = 1, 2, 3, 4
_EV_LIST_TERMINATED, _EV_WORD, _EV_END, _EV_MSG_TERMINATED = 0, 1, 5, 6
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0


class TTSError(ValueError):
    """Synthesis cannot run as asked (engine missing, unknown voice, bad options, empty text)."""


class _Event(ctypes.Structure):
    # espeak_EVENT: type, unique_identifier, text_position (1-based characters), length, audio_position
    # (ms), sample (samples at the engine rate), user_data, id (union of int / char* / char[8]).
    _fields_ = [("type", ctypes.c_int), ("unique_identifier", ctypes.c_uint), ("text_position", ctypes.c_int),
                ("length", ctypes.c_int), ("audio_position", ctypes.c_int), ("sample", ctypes.c_int),
                ("user_data", ctypes.c_void_p), ("id", ctypes.c_char * 8)]


_CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.POINTER(_Event))


@dataclasses.dataclass
class Synthesis:
    """One utterance: 16 kHz float32 audio and, per transcript word, ``(word, start, end)`` in samples."""

    audio: np.ndarray
    words: list[tuple[str, int, int]]
    unreported: list[str]  # transcript words the engine gave no WORD event for (then ``words`` is empty)

    @property
    def duration(self) -> float:
        return len(self.audio) / TARGET_RATE


class Espeak:
    """The eSpeak NG library of the ``espeakng-loader`` wheel, initialised once per process.

    The engine is a process-wide singleton (global state in C), so every call holds one lock.
    """

    _lock = threading.Lock()
    _instance: "Espeak | None" = None

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError as e:
            raise TTSError("speech synthesis needs the espeakng-loader wheel (pip install 'spiritlm-jax[train]' "
                           "or pip install espeakng-loader)") from e
        lib_path, data_path = espeakng_loader.get_library_path(), espeakng_loader.get_data_path()
        try:
            self.lib = ctypes.CDLL(lib_path)
        except OSError as e:
            raise TTSError(f"cannot load eSpeak NG from {lib_path}: {e}") from e
        self.data_path = data_path
        self.lib.espeak_Initialize.restype = ctypes.c_int
        self.lib.espeak_Initialize.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
        self.lib.espeak_SetVoiceByName.argtypes = [ctypes.c_char_p]
        self.lib.espeak_SetParameter.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
        self.lib.espeak_Synth.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int,
                                          ctypes.c_uint, ctypes.c_uint, ctypes.c_void_p, ctypes.c_void_p]
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, data_path.encode(), 0)
        if rate <= 0:
            raise TTSError(f"eSpeak NG failed to initialise with the data at {data_path} (returned {rate})")
        self.engine_rate = int(rate)
        self._chunks: list[np.ndarray] = []
        self._events: list[tuple[int, int, int, int]] = []
        self._cb = _CALLBACK(self._collect)  # keep a reference: the engine calls it
        self.lib.espeak_SetSynthCallback(self._cb)

    @classmethod
    def get(cls) -> "Espeak":
        with cls._lock:
            if cls._instance is None:
                cls._instance = Espeak()
            return cls._instance

    def _collect(self, wav, n, events) -> int:
        if n > 0:
            self._chunks.append(np.ctypeslib.as_array(wav, shape=(n,)).copy())
        i = 0
        while events[i].type != _EV_LIST_TERMINATED:
            e = events[i]
            self._events.append((e.type, e.text_position, e.length, e.sample))
            i += 1
        return 0

    def voice_exists(self, name: str) -> bool:
        """The language must load AND a ``+variant`` must be one of the wheel's variant files: the engine
        itself silently ignores an unknown variant (``en-us+robotz`` speaks as ``en-us``)."""
        lang, _, variant = name.partition("+")
        if variant and not (Path(self.data_path) / "voices" / "!v" / variant).is_file():
            return False
        with self._lock:
            return self.lib.espeak_SetVoiceByName(name.encode()) == _EE_OK

    def synthesize(self, text: str, voice: str = "en-us", rate: int = 175, pitch: int = 50,
                   pitch_range: int = 50) -> Synthesis:
        """``text`` → :class:`Synthesis` (raises :class:`TTSError` for an unknown voice or bad values)."""
        for name, v, lo, hi in (("rate", rate, 80, 450), ("pitch", pitch, 0, 100), ("pitch_range", pitch_range, 0, 100)):
            if not (isinstance(v, (int, np.integer)) and lo <= v <= hi):
                raise TTSError(f"{name} must be an integer in [{lo}, {hi}], got {v!r}")
        raw = text.encode("utf-8")
        if not self.voice_exists(voice):
            raise TTSError(f"eSpeak NG has no voice {voice!r}; see `spiritlm-jax prepare --list-voices`")
        with self._lock:
            if self.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
                raise TTSError(f"eSpeak NG has no voice {voice!r}; see `spiritlm-jax prepare --list-voices`")
            self.lib.espeak_SetParameter(_RATE, int(rate), 0)
            self.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
            self.lib.espeak_SetParameter(_RANGE, int(pitch_range), 0)
            self._chunks, self._events = [], []
            err = self.lib.espeak_Synth(raw, len(raw) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None)
            self.lib.espeak_Synchronize()
            if err != _EE_OK:
                raise TTSError(f"eSpeak NG could not synthesize {text[:60]!r} (error {err})")
            chunks, events = self._chunks, self._events
            self._chunks, self._events = [], []
        wav = np.concatenate(chunks).astype(np.float32) / 32768.0 if chunks else np.zeros(0, np.float32)
        return _to_target(text, wav, events, self.engine_rate)


def _tokens(text: str) -> list[tuple[str, int, int]]:
    """Whitespace tokens with their [start, end) character offsets."""
    out, i, n = [], 0, len(text)
    while i < n:
        while i < n and text[i].isspace():
            i += 1
        j = i
        while j < n and not text[j].isspace():
            j += 1
        if j > i:
            out.append((text[i:j], i, j))
        i = j
    return out


def _to_target(text: str, wav: np.ndarray, events, engine_rate: int) -> Synthesis:
    """Engine audio + events → 16 kHz audio and per-token sample spans (or the unreported tokens)."""
    from scipy.signal import resample_poly

    from spiritlm_jax.train.alignments import normalize_word

    g = np.gcd(TARGET_RATE, engine_rate)
    audio = resample_poly(wav, TARGET_RATE // g, engine_rate // g).astype(np.float32) if len(wav) else wav
    n_out = len(audio)
    scale = TARGET_RATE / engine_rate
    word_events = [(pos - 1, sample) for typ, pos, _len, sample in events if typ == _EV_WORD]
    end_samples = [sample for typ, _p, _l, sample in events if typ in (_EV_END, _EV_MSG_TERMINATED)]
    end = max(end_samples + [len(wav)]) if len(wav) else 0
    toks = [t for t in _tokens(text) if normalize_word(t[0])]  # punctuation-only tokens are not words
    starts: list[int | None] = []
    for _w, a, b in toks:
        hit = [s for p, s in word_events if a <= p < b]
        starts.append(min(hit) if hit else None)
    unreported = [t[0] for t, s in zip(toks, starts) if s is None]
    if unreported or not toks:
        return Synthesis(audio, [], unreported if toks else [])
    bounds = starts + [end]
    words = []
    for k, (w, _a, _b) in enumerate(toks):
        s = min(int(round(bounds[k] * scale)), n_out)
        e = min(int(round(bounds[k + 1] * scale)), n_out)
        words.append((w, s, max(e, s)))
    return Synthesis(audio, words, [])


# ------------------------------------------------------------------------------------------------
# Voices
# ------------------------------------------------------------------------------------------------

def list_voices() -> tuple[list[str], list[str]]:
    """(language voices, variants) shipped in the wheel's data folder (variants combine as ``en-us+m3``)."""
    engine = Espeak.get()
    root = Path(engine.data_path)
    langs = sorted({p.name for p in (root / "lang").rglob("*") if p.is_file()})
    variants = sorted(p.name for p in (root / "voices" / "!v").iterdir() if p.is_file())
    return langs, variants


def check_voices(voices: Sequence[str]) -> list[str]:
    """Every name must be a voice the engine knows; raises :class:`TTSError` naming the unknown ones."""
    voices = [v.strip() for v in voices if v.strip()]
    if not voices:
        raise TTSError("no voices given; pass e.g. --tts-voices en-us,en-us+m3,en-gb-x-rp+f2")
    engine = Espeak.get()
    bad = [v for v in voices if not engine.voice_exists(v)]
    if bad:
        langs, variants = list_voices()
        raise TTSError(f"unknown eSpeak NG voice(s) {bad}: a voice is a language ({', '.join(langs[:12])}, ... "
                       f"{len(langs)} in all) optionally with '+variant' ({', '.join(variants[:10])}, ...); "
                       f"`spiritlm-jax prepare --list-voices` prints them all")
    return voices


# ------------------------------------------------------------------------------------------------
# A corpus
# ------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SynthesisOptions:
    """Seeded variation: per sentence, a voice from ``voices``, a rate in ``rates`` (wpm, inclusive range)
    and a pitch in ``pitches`` (inclusive range)."""

    voices: tuple[str, ...] = ("en-us", "en-us+m3", "en-us+f2", "en-gb-x-rp+m1")
    rates: tuple[int, int] = (150, 200)
    pitches: tuple[int, int] = (35, 65)
    seed: int = 0

    def __post_init__(self):
        for name, (lo, hi), a, b in (("rates", self.rates, 80, 450), ("pitches", self.pitches, 0, 100)):
            if not (a <= lo <= hi <= b):
                raise TTSError(f"{name} must be a range lo,hi with {a} <= lo <= hi <= {b}, got {lo},{hi}")

    def draw(self, index: int) -> dict:
        rng = np.random.default_rng([self.seed, index])
        return {"voice": self.voices[int(rng.integers(len(self.voices)))],
                "rate": int(rng.integers(self.rates[0], self.rates[1] + 1)),
                "pitch": int(rng.integers(self.pitches[0], self.pitches[1] + 1))}


def read_sentences(paths: Sequence[str | os.PathLike]) -> list[tuple[str, str]]:
    """Text files (one sentence per non-empty line) → ``[(id, sentence)]``; ids ``<file stem>-<line>``.

    An empty file (or one with only blank lines) is an error naming it: there is nothing to synthesize.
    """
    out = []
    for p in paths:
        p = Path(p)
        files = sorted(q for q in p.rglob("*.txt")) if p.is_dir() else [p]
        if not files:
            raise TTSError(f"{p}: no .txt files to synthesize")
        for f in files:
            if not f.is_file():
                raise TTSError(f"{f}: no such text file")
            try:
                lines = f.read_text(encoding="utf-8").splitlines()
            except UnicodeDecodeError as e:
                raise TTSError(f"{f}: not UTF-8 text ({e})") from None
            kept = [(n, ln.strip()) for n, ln in enumerate(lines, 1) if ln.strip()]
            if not kept:
                raise TTSError(f"{f}: the file is empty: give one sentence per line to synthesize")
            out += [(f"{f.stem}-{n:06d}", s) for n, s in kept]
    return out


def _write_wav(path: Path, audio: np.ndarray) -> None:
    import soundfile as sf

    sf.write(str(path), np.clip(audio, -1.0, 1.0), TARGET_RATE, subtype="PCM_16")


def synthesize_corpus(sentences: Sequence[tuple[str, str]], out_dir: str | os.PathLike,
                      options: SynthesisOptions = SynthesisOptions(), *, progress: bool = True,
                      min_samples: int = 1280) -> dict:
    """Synthesize every ``(id, sentence)`` into ``out_dir`` (wav + json alignment + txt transcript).

    Returns ``{"ok": n, "seconds": s, "skipped": {reason: n}, "skipped_examples": {reason: [...]},
    "items": [{"id", "voice", "rate", "pitch", "words"}]}``. Skips (counted, nothing written):
    ``no_words`` (nothing voiceable: punctuation only), ``unreported_word_timing`` (a word without an
    engine WORD event), ``too_short`` (under ``min_samples`` of audio: the tokenizer's minimum chunk).
    """
    check_voices(options.voices)
    engine = Espeak.get()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stats: dict = {"ok": 0, "seconds": 0.0, "skipped": {}, "skipped_examples": {}, "items": []}

    def skip(reason: str, msg: str):
        stats["skipped"][reason] = stats["skipped"].get(reason, 0) + 1
        ex = stats["skipped_examples"].setdefault(reason, [])
        if len(ex) < 20:
            ex.append(msg)

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(sentences), desc="synthesize", unit="sentence")
    for k, (sid, text) in enumerate(sentences):
        draw = options.draw(k)
        syn = engine.synthesize(text, draw["voice"], draw["rate"], draw["pitch"])
        if bar is not None:
            bar.update(1)
        if syn.unreported:
            skip("unreported_word_timing", f"{sid}: no engine timing for {syn.unreported[:5]} in {text[:80]!r}")
            continue
        if not syn.words:
            skip("no_words", f"{sid}: nothing to voice in {text[:80]!r}")
            continue
        if len(syn.audio) < min_samples:
            skip("too_short", f"{sid}: {len(syn.audio)} samples of audio for {text[:80]!r}")
            continue
        _write_wav(out / f"{sid}.wav", syn.audio)
        align = [{"word": w, "start": s / TARGET_RATE, "end": e / TARGET_RATE} for w, s, e in syn.words]
        (out / f"{sid}.json").write_text(json.dumps(align))
        (out / f"{sid}.txt").write_text(text + "\n")
        stats["ok"] += 1
        stats["seconds"] += syn.duration
        stats["items"].append({"id": sid, **draw, "words": len(syn.words)})
    if bar is not None:
        bar.close()
    return stats
