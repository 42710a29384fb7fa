"""The Spirit LM speech tokenizer: audio ↔ unit dicts ↔ unit strings (the original ``SpiritLMTokenizer``).

    tok = SpeechTokenizer.from_checkpoints(root, "expressive")     # root = the original checkpoints/ folder
    units = tok.encode_units("speech.wav")    # {"audio", "hubert": "12 12 7 …", "pitch": …, "style": …}
    s = tok.encode_string("speech.wav")       # "[St71][Pi39][Hu99][Hu49]…"
    wav = tok.decode(s, speaker_id=2)         # 16 kHz float32

Semantics follow the original (REFERENCE §3.3, §8): audio is split into independent 100 s chunks, chunks
shorter than 1280 samples are dropped, each kept chunk goes through HuBERT (+ pitch + style for
Expressive), and the per-chunk units are concatenated. ``decode`` turns a string into per-unit streams
(``string_to_units``), switches duration prediction off when pitch and HuBERT lengths differ, and always
vocodes with ``not_dedup_code=True``.

Beyond the original: ``encode_units_batch`` / ``encode_string_batch`` run many utterances (all their
chunks) through each model in shared padded batches, and ``decode_batch`` vocodes many strings at once.

Deliberate differences (documented, with the original behaviour behind ``strict_original=True``):
* fully unvoiced audio: the original's FCPE raises IndexError; we return the pitch units of an all-zero
  F0 contour. ``strict_original=True`` raises :class:`UnvoicedAudioError` instead.
* an Expressive string without any ``[Pi]`` or an empty speech string: a clear error (the original crashes
  deep inside the vocoder).
* an input shorter than 1280 samples (80 ms, the encoder's receptive field): :class:`ShortAudioError` (the
  original returns empty units, which then vanish from a prompt without a word). A longer input whose LAST
  100 s chunk is under 1280 samples loses that tail, as in the original.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .audio import AudioError, chunk_audio, load_audio
from .units import BASE_FORMAT, EXPRESSIVE_FORMAT, UnitStringError, UnitStringFormat, string_to_units

MAX_WAV_CHUNK = 100 * 16_000
MIN_WAV_CHUNK = 1280


class ShortAudioError(AudioError):
    """An input shorter than the encoder's receptive field (1280 samples = 80 ms): it has no unit at all."""


class UnvoicedAudioError(AudioError):
    """(strict_original=True) a chunk has no voiced frame, where the original pitch tokenizer raises."""


class SpeechDecodeError(ValueError):
    """A unit string/dict cannot be vocoded (no units, missing pitch for an Expressive vocoder, …)."""


def checkpoints_root(root: str | os.PathLike | None = None) -> Path:
    """The original's checkpoint root: ``root``, else $SPIRITLM_CHECKPOINTS_DIR, else ./checkpoints."""
    p = Path(root or os.environ.get("SPIRITLM_CHECKPOINTS_DIR") or "checkpoints")
    if not p.is_dir():
        raise FileNotFoundError(
            f"checkpoint folder {p} not found. Point --checkpoints (or SPIRITLM_CHECKPOINTS_DIR) at the original "
            f"Spirit LM checkpoints/ folder (speech_tokenizer/…, spiritlm_model/…)")
    return p


class SpeechTokenizer:
    def __init__(self, hubert, vocoder=None, pitch=None, style=None, *, max_wav_chunk: int = MAX_WAV_CHUNK,
                 min_wav_chunk: int = MIN_WAV_CHUNK, strict_original: bool = False):
        self.hubert = hubert
        self.vocoder = vocoder
        self.pitch = pitch
        # as the original: a style model is only used together with a pitch model
        self.style = style if pitch is not None else None
        self.max_wav_chunk = int(max_wav_chunk)
        self.min_wav_chunk = int(min_wav_chunk)
        self.strict_original = strict_original
        self.format = EXPRESSIVE_FORMAT if self.style is not None else (
            UnitStringFormat(has_pitch=True) if self.pitch is not None else BASE_FORMAT)

    @property
    def expressive(self) -> bool:
        return self.pitch is not None

    @classmethod
    def from_checkpoints(cls, root: str | os.PathLike | None = None, variant: str = "base", *, f0_backbone: str = "fcpe",
                         mesh=None, with_vocoder: bool = True, default_speaker: int = 2, **kw) -> "SpeechTokenizer":
        """Build from a ``checkpoints/`` tree (``speech_tokenizer/…``), as the factories
        ``spiritlm_base()`` / ``spiritlm_expressive()`` do: the original tree (needs torch) or one written
        by ``spiritlm-jax convert all`` (read without torch; docs/model-format.md). Each component's
        identity is checked against its slot (e.g. the vocoder's variant)."""
        from .hubert_tokenizer import HubertTokenizer
        from .vocoder import HifiGANVocoder

        variant = _variant(variant)
        st = checkpoints_root(root)
        st = st / "speech_tokenizer" if (st / "speech_tokenizer").is_dir() else st
        hubert = HubertTokenizer.from_checkpoint_dir(st / "hubert_25hz", mesh=mesh)
        pitch = style = vocoder = None
        if variant == "expressive":
            from .pitch_tokenizer import PitchTokenizer
            from .style_tokenizer import StyleTokenizer

            pitch = PitchTokenizer.from_checkpoints(st / "vqvae_f0_quantizer", backbone=f0_backbone, mesh=mesh)
            style = StyleTokenizer.from_checkpoint_dir(st / "style_encoder_w2v2", mesh=mesh)
        if with_vocoder:
            from .vocoder import VOCODER_FOLDERS

            vocoder = HifiGANVocoder.from_pretrained(st / VOCODER_FOLDERS[variant], variant=variant,
                                                     default_speaker=default_speaker, mesh=mesh)
        return cls(hubert, vocoder, pitch, style, **kw)

    # ------------------------------------------------------------------------------ encoding
    def _load(self, audio, sample_rate=None, channel_id=None) -> tuple[np.ndarray, str | None]:
        path = os.path.abspath(audio) if isinstance(audio, (str, os.PathLike)) else None
        return load_audio(audio, sample_rate=sample_rate, channel=channel_id), path

    def _chunks(self, wav: np.ndarray) -> list[np.ndarray]:
        return chunk_audio(wav, self.max_wav_chunk, self.min_wav_chunk)

    def encode_units_batch(self, audios: Sequence[Any], *, sample_rate: int | None = None,
                           channel_id: int | None = None, strict_original: bool | None = None) -> list[dict[str, str]]:
        """Many utterances → one unit dict each; all chunks of all utterances share padded batches."""
        strict = self.strict_original if strict_original is None else strict_original
        loaded = [self._load(a, sample_rate, channel_id) for a in audios]
        chunks, owner = [], []
        for i, (wav, path) in enumerate(loaded):
            kept = self._chunks(wav)
            if not kept and not strict:
                raise ShortAudioError(
                    f"{path or f'audio input {i}'}: {len(wav)} samples ({len(wav) / 16000 * 1000:.0f} ms at 16 kHz) is "
                    f"shorter than the {self.min_wav_chunk} samples ({self.min_wav_chunk / 16:.0f} ms) the speech "
                    f"encoder needs for one unit, so it would give no units at all (the original silently returns "
                    f"an empty string; strict_original=True does the same). Give at least {self.min_wav_chunk} samples.")
            for c in kept:
                chunks.append(c)
                owner.append(i)
        keys = ["hubert"] + (["pitch"] if self.pitch is not None else []) + (["style"] if self.style is not None else [])
        per_chunk: dict[str, list[np.ndarray]] = {k: [] for k in keys}
        if chunks:
            per_chunk["hubert"] = self.hubert.encode_batch(chunks, max_chunk=self.max_wav_chunk, min_chunk=1)
            if self.pitch is not None:
                if strict:
                    for j, (f0, vuv) in enumerate(self.pitch.f0(chunks)):
                        if not np.any(vuv):
                            raise UnvoicedAudioError(
                                f"chunk {j} of the input has no voiced frame; the original pitch tokenizer raises "
                                f"here (strict_original=True). Without strict mode it is tokenized as flat F0.")
                per_chunk["pitch"] = self.pitch.encode_batch(chunks)
            if self.style is not None:
                per_chunk["style"] = self.style.encode_batch(chunks, max_chunk=self.max_wav_chunk, min_chunk=1)
        out = []
        for i, (_, path) in enumerate(loaded):
            d: dict[str, str] = {}
            if path is not None:
                d["audio"] = path
            for k in keys:
                parts = [np.asarray(per_chunk[k][j]).reshape(-1) for j in range(len(chunks)) if owner[j] == i]
                d[k] = " ".join(str(int(u)) for u in (np.concatenate(parts) if parts else []))
            out.append(d)
        return out

    def encode_units(self, audio, channel_id: int | None = None, *, sample_rate: int | None = None,
                     strict_original: bool | None = None) -> dict[str, str]:
        return self.encode_units_batch([audio], sample_rate=sample_rate, channel_id=channel_id,
                                       strict_original=strict_original)[0]

    def units2string(self, units: dict) -> str:
        return self.format.units2string(units)

    def encode_string(self, audio, *, sample_rate: int | None = None, channel_id: int | None = None) -> str:
        return self.units2string(self.encode_units(audio, channel_id, sample_rate=sample_rate))

    __call__ = encode_string

    def encode_string_batch(self, audios: Sequence[Any], **kw) -> list[str]:
        return [self.units2string(u) for u in self.encode_units_batch(audios, **kw)]

    def string2units(self, s: str, duplicate_hubert_for_multiple_pitch: bool = False) -> dict:
        return self.format.string2units(s, duplicate_hubert_for_multiple_pitch=duplicate_hubert_for_multiple_pitch)

    # ------------------------------------------------------------------------------ decoding
    def _decode_args(self, code, dur_pred: bool) -> tuple[dict, bool]:
        if self.vocoder is None:
            raise SpeechDecodeError("this tokenizer was built without a vocoder (with_vocoder=False)")
        units = self.string2units(code) if isinstance(code, str) else dict(code)
        hub = units.get("hubert", "")
        n_hub = len(hub.split()) if isinstance(hub, str) else len(hub)
        if n_hub == 0:
            raise SpeechDecodeError(
                f"no [Hu] unit to vocode in {str(code)[:80]!r}: a speech chunk needs at least one HuBERT unit")
        if self.expressive:
            if "pitch" not in units:
                raise SpeechDecodeError(
                    "an Expressive vocoder needs pitch units, but the speech has no [Pi] token (the original "
                    "crashes with KeyError 'f0_code'); generate speech with pitch tokens or use the Base model")
            pit = units["pitch"]
            n_pit = len(pit.split()) if isinstance(pit, str) else len(pit)
            if n_pit != n_hub:
                dur_pred = False  # raw units from encode_units: resynthesis at the native rates
        v = {"hubert": hub}
        if self.expressive:
            v["pitch"] = units["pitch"]
            if "style" in units:
                v["style"] = units["style"]
        return v, dur_pred

    def decode(self, code, speaker_id: int = 2, dur_pred: bool = True) -> np.ndarray:
        """A unit string or dict → 16 kHz float32 waveform, as the original ``decode``."""
        units, dur_pred = self._decode_args(code, dur_pred)
        return self.vocoder.vocode(units, speaker_id=speaker_id, dur_pred=dur_pred, not_dedup_code=True)

    def decode_with_details(self, code, speaker_id: int = 2, dur_pred: bool = True):
        units, dur_pred = self._decode_args(code, dur_pred)
        return self.vocoder.vocode_with_details(units, speaker_id=speaker_id, dur_pred=dur_pred, not_dedup_code=True)

    def decode_batch(self, codes: Sequence, speaker_id: int | Sequence[int] = 2, dur_pred: bool = True) -> list[np.ndarray]:
        """Many strings/dicts → waveforms, vocoded in shared batches (grouped by resolved dur_pred)."""
        prepared = [self._decode_args(c, dur_pred) for c in codes]
        spk = list(speaker_id) if isinstance(speaker_id, (list, tuple)) else [speaker_id] * len(codes)
        out: list[np.ndarray | None] = [None] * len(codes)
        for flag in (True, False):
            idx = [i for i, (_, d) in enumerate(prepared) if d == flag]
            if idx:
                wavs = self.vocoder.vocode_batch([prepared[i][0] for i in idx], speaker_id=[spk[i] for i in idx],
                                                 dur_pred=flag, not_dedup_code=True)
                for i, w in zip(idx, wavs):
                    out[i] = w
        return out


def _variant(v: str) -> str:
    v = str(v).lower()
    for name in ("base", "expressive"):
        if v == name or v == f"spirit-lm-{name}-7b":
            return name
    raise ValueError(f"unknown Spirit LM variant {v!r}: use 'base', 'expressive', 'spirit-lm-base-7b' or "
                     f"'spirit-lm-expressive-7b'")


__all__ = ["SpeechTokenizer", "UnvoicedAudioError", "SpeechDecodeError", "UnitStringError", "checkpoints_root",
           "string_to_units"]
