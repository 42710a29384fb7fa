"""``spiritlm.speech_tokenizer.spiritlm_tokenizer``: ``SpiritLMTokenizer`` and the unit-string helpers.

The helpers are ours (:mod:`spiritlm_jax.units`, same rules as the original, golden-tested); the
tokenizer wraps :class:`spiritlm_jax.speech.SpeechTokenizer`. Where our API raises its documented
:class:`~spiritlm_jax.speech.SpeechDecodeError`, ``decode`` raises the original's exception types
(subclasses of both, so either ``except`` works): no ``[Hu]`` unit → :class:`NoSpeechUnitsError`
(a ``RuntimeError``, where the original's vocoder fails on an empty tensor); an Expressive string
without ``[Pi]`` → :class:`MissingPitchUnitsError` (a ``KeyError`` on ``'f0_code'``).
"""
from __future__ import annotations

import logging

from spiritlm_jax.compat._tensor import as_audio, like_torch
from spiritlm_jax.speech import SpeechDecodeError, SpeechTokenizer
from spiritlm_jax.units import MOST_COMMON_STYLES, UnitStringFormat, string_to_units, units_to_string
from spiritlm_jax.units import _random_most_common_style as get_random_most_common_style

_logger = logging.getLogger(__name__)


class NoSpeechUnitsError(SpeechDecodeError, RuntimeError):
    """No ``[Hu]`` unit to vocode (the original: a RuntimeError from the vocoder's convolution)."""


class MissingPitchUnitsError(SpeechDecodeError, KeyError):
    """An Expressive vocoder got no pitch units (the original: ``KeyError: 'f0_code'``)."""

    def __str__(self):
        return repr(self.args[0]) if self.args else ""


_KEYS = {"hubert_key": "hubert", "pitch_key": "pitch", "style_key": "style"}


def _model(x):
    """A compat component (``HubertTokenizer``, ``F0Tokenizer``, ...) → our object inside it."""
    if x is None:
        return None
    return getattr(x, "tokenizer", None) or getattr(x, "vocoder", None) or x


class SpiritLMTokenizer:
    def __init__(self, hubert_model, pitch_model=None, style_model=None, hifigan_model=None, hubert_rate=24.99,
                 hubert_dedup=True, hubert_key="hubert", pitch_rate=12.5, pitch_dedup=True, pitch_key="pitch",
                 style_rate=1, style_dedup=False, style_key="style", expected_sample_rate=16_000,
                 max_wav_chunk=100 * 16_000, min_wav_chunk=1280):
        given = {"hubert_key": hubert_key, "pitch_key": pitch_key, "style_key": style_key}
        renamed = {k: v for k, v in given.items() if v != _KEYS[k]}
        if renamed:
            raise ValueError(f"custom unit keys {renamed} are not supported: spiritlm-jax's unit dicts use the keys "
                             f"'hubert', 'pitch' and 'style' (the original's defaults)")
        if expected_sample_rate != 16_000:
            raise ValueError(f"expected_sample_rate={expected_sample_rate}: every Spirit LM model runs at 16 kHz")
        self.hubert_model, self.pitch_model = hubert_model, pitch_model
        self.style_model, self.hifigan_model = style_model, hifigan_model
        self.hubert_key = "hubert"
        self.pitch_key = "pitch" if pitch_model is not None else None
        self.style_key = "style" if pitch_model is not None and style_model is not None else None
        self.speech_token = "[Speech]"
        self.expected_sample_rate = expected_sample_rate
        self.max_wav_chunk, self.min_wav_chunk = max_wav_chunk, min_wav_chunk
        self.tokenizer = SpeechTokenizer(_model(hubert_model), _model(hifigan_model), _model(pitch_model),
                                         _model(style_model), max_wav_chunk=max_wav_chunk, min_wav_chunk=min_wav_chunk)
        self.tokenizer.format = UnitStringFormat(
            has_pitch=self.pitch_key is not None, has_style=self.style_key is not None, hubert_rate=hubert_rate,
            hubert_dedup=hubert_dedup, pitch_rate=pitch_rate, pitch_dedup=pitch_dedup, style_rate=style_rate,
            style_dedup=style_dedup)

    def load_audio(self, path):
        from spiritlm_jax.audio import load_audio

        return like_torch(load_audio(path))

    def encode_units(self, audio, channel_id=None) -> dict:
        """{'audio': absolute path (for a path input), 'hubert': '…', 'pitch': '…', 'style': '…'}."""
        return self.tokenizer.encode_units(as_audio(audio), channel_id)

    def units2string(self, units) -> str:
        return self.tokenizer.units2string(units)

    def encode_string(self, audio) -> str:
        return self.tokenizer.encode_string(as_audio(audio))

    def __call__(self, audio) -> str:
        return self.encode_string(audio)

    def string2units(self, gen, duplicate_hubert_for_multiple_pitch=False) -> dict:
        return self.tokenizer.string2units(gen, duplicate_hubert_for_multiple_pitch)

    def decode(self, code, speaker_id=2, dur_pred=True):
        """A unit string or dict → 16 kHz float32 numpy waveform, raising the original's exception types."""
        try:
            return self.tokenizer.decode(code, speaker_id=speaker_id, dur_pred=dur_pred)
        except SpeechDecodeError as e:
            units = self.string2units(code) if isinstance(code, str) else dict(code)
            if not str(units.get("hubert", "")).split():
                raise NoSpeechUnitsError(str(e)) from e
            if self.pitch_key and "pitch" not in units:
                err = MissingPitchUnitsError("f0_code")
                err.add_note(str(e))
                raise err from e
            raise


__all__ = ["SpiritLMTokenizer", "MOST_COMMON_STYLES", "units_to_string", "string_to_units",
           "get_random_most_common_style", "NoSpeechUnitsError", "MissingPitchUnitsError"]
