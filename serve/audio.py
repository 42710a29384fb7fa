"""Speech out while it is generated: a unit stream that grows token by token, vocoded incrementally.

``UnitStream`` turns the LM's unit tokens into the per-unit streams ``SpeechTokenizer.decode`` would build
from the final token string (``units.string_to_units``: one pitch/style value per ``[Hu]``, the latest one
seen, leading units back-filled with the first), and knows which units are FINAL: every unit once the first
``[Pi]`` and ``[St]`` have arrived (Expressive; Base units are final at once). A pitch stream without any
``[St]`` gets the original's random common style, which is only drawn when the stream ends, exactly as the
one-shot decode draws it.

``StreamingVocoder`` vocodes what is final, in two stages with receptive-field margins, so the concatenated
chunks equal one-shot vocoding (``HifiGANVocoder.vocode(..., not_dedup_code=True)``, what ``decode`` calls)
of the final units within float rounding (tested ≤ 1e-4):

* durations: the duration predictor (two kernel-3 convs, per-position LayerNorm) sees ``DUR_MARGIN`` = 2
  units each side, so a unit's duration is final once 2 more units are final (or the stream ended); it runs
  on a window of the new units plus those margins (a real boundary is zero padding, as in the one-shot call);
* waveform: frames (units repeated by their durations) go through HifiGAN in windows of ``chunk_frames``
  plus ``margin_frames`` of context each side (the vocoder's own receptive-field bound, the margins
  ``HifiGANVocoder.stream`` uses), all windows one shape, so one compiled program.

The first chunk leaves after ``chunk_frames + margin_frames`` frames are final, whatever the final length.
"""
from __future__ import annotations

import numpy as np

from spiritlm_jax.units import _random_most_common_style
from spiritlm_jax.vocoder import HifiGANVocoder, VocoderInputError

DUR_MARGIN = 2  # the duration predictor's receptive field, in units, each side


class UnitStream:
    """Unit token values in arrival order → the per-unit (hubert, pitch, style) streams, and how many are final."""

    def __init__(self, expressive: bool):
        self.expressive = expressive
        self.hubert: list[int] = []
        self.pitch: list[int | None] = []
        self.style: list[int | None] = []
        self.first_pitch = self.first_style = None
        self._pitch = self._style = None
        self.ended = False

    def add(self, kind: str, value: int) -> None:
        """kind: "hu", "pi" or "st" (a [HuN], [PiN] or [StN] token)."""
        if kind == "hu":
            self.hubert.append(int(value))
            self.pitch.append(self._pitch)
            self.style.append(self._style)
        elif kind == "pi":
            self._pitch = int(value)
            self.first_pitch = self.first_pitch if self.first_pitch is not None else int(value)
        elif kind == "st":
            self._style = int(value)
            self.first_style = self.first_style if self.first_style is not None else int(value)

    def end(self) -> None:
        if self.ended:
            return
        self.ended = True
        if self.expressive and self.first_pitch is not None and self.first_style is None:
            self.first_style = _random_most_common_style()  # the original's draw, at the same point

    def n_final(self) -> int:
        if not self.expressive or (self.first_pitch is not None and self.first_style is not None):
            return len(self.hubert)
        return len(self.hubert) if self.ended else 0

    def units(self, lo: int, hi: int) -> dict:
        """Final units [lo, hi) as a vocoder input dict."""
        out = {"hubert": np.asarray(self.hubert[lo:hi], np.int64)}
        if self.expressive:
            if self.first_pitch is None:
                raise VocoderInputError(
                    "an Expressive vocoder needs pitch units, but the generated speech has no [Pi] token; "
                    "generate more tokens or use the Base model")
            out["pitch"] = np.asarray([self.first_pitch if v is None else v for v in self.pitch[lo:hi]], np.int64)
            out["style"] = np.asarray([self.first_style if v is None else v for v in self.style[lo:hi]], np.int64)
        return out


class StreamingVocoder:
    """Feed unit tokens with ``add``; ``ready()`` returns the waveform blocks that became final; ``finish()``
    the rest. Device calls happen only in ``ready``/``finish`` (run them off the event loop)."""

    def __init__(self, vocoder: HifiGANVocoder, expressive: bool, speaker_id: int | None = 2,
                 style_id: int | None = None, chunk_frames: int = 32):
        if chunk_frames <= 0:
            raise VocoderInputError(f"chunk_frames must be positive, got {chunk_frames}")
        if not vocoder.cfg.has_dur_predictor:
            raise VocoderInputError("streaming needs a vocoder with a duration predictor (Spirit LM's have one)")
        self.voc = vocoder
        self.stream = UnitStream(expressive)
        self.cf = int(chunk_frames)
        self.m = vocoder.margin_frames
        self.speaker_id, self.style_id = speaker_id, style_id
        self._row = vocoder._prepare({"hubert": [0], **({"pitch": [0], "style": [0]} if expressive else {})},
                                     speaker_id, style_id, True, True)  # checks the speaker/style ids now
        self.n_dur = 0  # units whose duration is known
        self.frames: list[np.ndarray] = [np.zeros(0, np.int64)] * 3  # code, f0, style code per frame
        self.emitted = 0  # frames whose samples were returned
        self.samples = 0

    def add(self, kind: str, value: int) -> None:
        self.stream.add(kind, value)

    def _extend_durations(self) -> None:
        s = self.stream
        n = s.n_final()
        hi = n if s.ended else n - DUR_MARGIN
        if hi <= self.n_dur:
            return
        lo = self.n_dur
        w_lo, w_hi = max(0, lo - DUR_MARGIN), min(n, hi + DUR_MARGIN)
        units = s.units(w_lo, w_hi)
        row = self.voc._prepare(units, self.speaker_id, self.style_id, True, True)
        if row.code.size != w_hi - w_lo:  # negative ids would shift positions; the LM never emits them
            raise VocoderInputError("unit ids must be ≥ 0")
        d = self.voc._durations([row.code])[0][1][lo - w_lo:hi - w_lo]
        code, f0, sc = (units[k][lo - w_lo:hi - w_lo] if k in units else None for k in ("hubert", "pitch", "style"))
        new = [np.repeat(code, d), np.repeat(f0, d) if f0 is not None else np.zeros(int(d.sum()), np.int64),
               np.repeat(sc, d) if sc is not None else np.zeros(int(d.sum()), np.int64)]
        self.frames = [np.concatenate([a, b]) for a, b in zip(self.frames, new)]
        self.n_dur = hi

    def _windows(self, final: bool) -> list[np.ndarray]:
        out = []
        t = self.frames[0].size
        m, cf, hop = self.m, self.cf, self.voc.hop
        w = cf + 2 * m
        while self.emitted < t and (final or self.emitted + cf + m <= t):
            s = self.emitted
            lo, hi = s - m, s + cf + m
            src_lo, src_hi = max(0, lo), min(t, hi)
            win = []
            for a in self.frames:
                buf = np.zeros(w, np.int64)
                buf[src_lo - lo:src_hi - lo] = a[src_lo:src_hi]
                win.append(buf)
            wav = self.voc._generate([tuple(win)], [self._row.speaker], [self._row.style], starts=[src_lo - lo],
                                     ends=[src_hi - lo], length=w)
            n = min(cf, t - s)
            out.append(np.ascontiguousarray(wav[0, m * hop:(m + n) * hop], dtype=np.float32))
            self.emitted += n
            self.samples += out[-1].size
        return out

    def ready(self) -> list[np.ndarray]:
        """Blocks that no later unit can change (possibly none)."""
        self._extend_durations()
        return self._windows(final=False)

    def finish(self) -> list[np.ndarray]:
        """The stream ended: every remaining block."""
        self.stream.end()
        self._extend_durations()
        return self._windows(final=True)


def unit_kind(vocab, token_id: int) -> tuple[str, int] | None:
    """A token id → ("hu"|"pi"|"st", value), or None for a text/marker id."""
    for kind, r in (("hu", vocab.hubert), ("pi", vocab.pitch), ("st", vocab.style)):
        if token_id in r:
            return kind, token_id - r.start
    return None


def pcm16(wav: np.ndarray) -> bytes:
    """float32 [-1, 1] → 16-bit little-endian PCM (clipped)."""
    return (np.clip(wav, -1.0, 1.0) * 32767.0).round().astype("<i2").tobytes()


def wav_header(sample_rate: int = 16000, n_samples: int | None = None) -> bytes:
    """A 16-bit mono RIFF/WAVE header; ``n_samples=None`` (streaming) writes the 0xFFFFFFFF sizes that
    streaming WAV producers use (readers take the data up to the end of the file)."""
    import struct

    data = 0xFFFFFFFF if n_samples is None else 2 * n_samples
    riff = 0xFFFFFFFF if n_samples is None else 36 + data
    return (b"RIFF" + struct.pack("<I", riff) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate,
                                                                          2 * sample_rate, 2, 16)
            + b"data" + struct.pack("<I", data))
