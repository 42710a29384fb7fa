"""``spiritlm.speech_tokenizer.hifigan``: the vocoder factories, callable with the original's signature
``vocoder(code, speaker_id=None, style_id=None, dur_pred=True, f0_code=None, style_code=None,
not_dedup_code=False)`` and returning a tensor-like waveform (``.cpu().numpy()`` works)."""
from __future__ import annotations

from spiritlm_jax.compat._tensor import like_torch
from spiritlm_jax.compat.speech_tokenizer._paths import speech_dir


def _codes(x):
    if x is None or isinstance(x, str):
        return x
    if hasattr(x, "detach"):  # a torch tensor
        x = x.detach().cpu().numpy()
    return x


class HifiGANVocoder:
    """The original ``HifiGANVocoder.forward`` interface over :class:`spiritlm_jax.vocoder.HifiGANVocoder`."""

    def __init__(self, vocoder):
        self.vocoder = vocoder  # ours

    @property
    def default_speaker(self):
        return self.vocoder.default_speaker

    @property
    def default_style(self):
        return self.vocoder.default_style

    def __call__(self, code, speaker_id=None, style_id=None, dur_pred=True, f0_code=None, style_code=None,
                 not_dedup_code=False):
        units = {"hubert": _codes(code)}
        if f0_code is not None:
            units["pitch"] = _codes(f0_code)
        if style_code is not None:
            units["style"] = _codes(style_code)
        wav = self.vocoder.vocode(units, speaker_id=speaker_id, style_id=style_id, dur_pred=dur_pred,
                                  not_dedup_code=not_dedup_code)
        return like_torch(wav)

    forward = __call__

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self


def spiritlm_base_hifigan(default_speaker=2, default_style=8, checkpoints=None) -> HifiGANVocoder:
    from spiritlm_jax.vocoder import HifiGANVocoder as Ours

    return HifiGANVocoder(Ours.from_pretrained(speech_dir(checkpoints) / "hifigan_spiritlm_base",
                                               default_speaker=default_speaker, default_style=default_style))


def spiritlm_expressive_hifigan_w2v2(default_speaker=2, checkpoints=None) -> HifiGANVocoder:
    from spiritlm_jax.vocoder import HifiGANVocoder as Ours

    return HifiGANVocoder(Ours.from_pretrained(speech_dir(checkpoints) / "hifigan_spiritlm_expressive_w2v2",
                                               default_speaker=default_speaker))


__all__ = ["HifiGANVocoder", "spiritlm_base_hifigan", "spiritlm_expressive_hifigan_w2v2"]
