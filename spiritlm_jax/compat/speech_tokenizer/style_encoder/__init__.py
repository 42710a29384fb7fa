"""``spiritlm.speech_tokenizer.style_encoder``: ``spiritlm_expressive_style_encoder_w2v2()``."""
from __future__ import annotations

import logging

from spiritlm_jax.compat._tensor import as_audio, like_torch
from spiritlm_jax.compat.speech_tokenizer._paths import speech_dir

_logger = logging.getLogger(__name__)


class Wav2Vec2StyleEncoder:
    """The original's style encoder call interface over :class:`spiritlm_jax.style_tokenizer.StyleTokenizer`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # ours

    def __call__(self, wavs):
        """Audio (path, array, tensor) → one style unit per second (tensor-like)."""
        return like_torch(self.tokenizer(as_audio(wavs)))

    forward = __call__

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self


def spiritlm_expressive_style_encoder_w2v2(checkpoints=None) -> Wav2Vec2StyleEncoder:
    from spiritlm_jax.style_tokenizer import StyleTokenizer

    path = speech_dir(checkpoints) / "style_encoder_w2v2"
    model = Wav2Vec2StyleEncoder(StyleTokenizer.from_checkpoint_dir(path))
    _logger.info(f"Style encoder loaded from {str(path)}")
    return model


__all__ = ["Wav2Vec2StyleEncoder", "spiritlm_expressive_style_encoder_w2v2"]
