"""``spiritlm.speech_tokenizer.f0``: ``spiritlm_expressive_f0()`` → a callable pitch-unit tokenizer."""
from __future__ import annotations

from spiritlm_jax.compat._tensor import as_audio, like_torch
from spiritlm_jax.compat.speech_tokenizer._paths import speech_dir


class F0Tokenizer:
    """The original's ``F0Tokenizer`` call interface over :class:`spiritlm_jax.pitch_tokenizer.PitchTokenizer`."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer  # ours

    def __call__(self, x, speaker=None, dense: bool = False, compute_vqvae_pred: bool = False):
        """Audio → pitch units (tensor-like), or the F0 contour with ``dense``."""
        if speaker is not None or compute_vqvae_pred:
            raise ValueError("speaker= and compute_vqvae_pred= are not supported (the Spirit LM quantizer is "
                             "speaker-independent and only its codes are used)")
        return like_torch(self.tokenizer(as_audio(x), dense=dense))

    forward = __call__

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self


def spiritlm_expressive_f0(f0_backbone: str = "fcpe", checkpoints=None) -> F0Tokenizer:
    from spiritlm_jax.pitch_tokenizer import PitchTokenizer

    return F0Tokenizer(PitchTokenizer.from_checkpoints(speech_dir(checkpoints) / "vqvae_f0_quantizer",
                                                       backbone=f0_backbone))


__all__ = ["F0Tokenizer", "spiritlm_expressive_f0"]
