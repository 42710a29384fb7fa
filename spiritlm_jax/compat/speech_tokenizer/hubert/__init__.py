"""``spiritlm.speech_tokenizer.hubert``: ``spiritlm_hubert()`` → a callable HuBERT unit tokenizer."""
from __future__ import annotations

from spiritlm_jax.compat._tensor import as_audio, like_torch
from spiritlm_jax.compat.speech_tokenizer._paths import speech_dir


class HubertTokenizer:
    """The original's ``HubertTokenizer`` call interface over :class:`spiritlm_jax.hubert_tokenizer.HubertTokenizer`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # ours

    def __call__(self, x, separate_channels: bool = False, dense: bool = False):
        """Audio (path, array, tensor) → units (a tensor-like of int64), or dense features with ``dense``."""
        if separate_channels:
            raise ValueError("separate_channels=True is not supported: pass one channel (channel_id) or a mono waveform")
        return like_torch(self.tokenizer.encode(as_audio(x), dense=dense))

    forward = __call__

    def to(self, *args, **kwargs):  # the original moves the module to a device; JAX places arrays itself
        return self

    def eval(self):
        return self


def spiritlm_hubert(checkpoints=None) -> HubertTokenizer:
    from spiritlm_jax.hubert_tokenizer import HubertTokenizer as Ours

    return HubertTokenizer(Ours.from_checkpoint_dir(speech_dir(checkpoints) / "hubert_25hz"))


__all__ = ["HubertTokenizer", "spiritlm_hubert"]
