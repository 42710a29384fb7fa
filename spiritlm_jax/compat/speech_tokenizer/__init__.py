"""``spiritlm.speech_tokenizer``: ``spiritlm_base()`` / ``spiritlm_expressive()`` and the component
factories. As in the original, each component is loaded once per process and shared (the module-level
``HUBERT``, ``HIFIGAN_BASE``, ``F0``, ``STYLE_W2V2``, ``HIFIGAN_EXPRESSIVE_W2V2``; setting one beforehand
makes the factories use it)."""
from __future__ import annotations

from spiritlm_jax.compat.speech_tokenizer.f0 import spiritlm_expressive_f0
from spiritlm_jax.compat.speech_tokenizer.hifigan import spiritlm_base_hifigan, spiritlm_expressive_hifigan_w2v2
from spiritlm_jax.compat.speech_tokenizer.hubert import spiritlm_hubert
from spiritlm_jax.compat.speech_tokenizer.spiritlm_tokenizer import SpiritLMTokenizer
from spiritlm_jax.compat.speech_tokenizer.style_encoder import spiritlm_expressive_style_encoder_w2v2

HUBERT = None
HIFIGAN_BASE = None
F0 = None
STYLE_W2V2 = None
HIFIGAN_EXPRESSIVE_W2V2 = None


def spiritlm_base(default_speaker=2, default_style=8, checkpoints=None) -> SpiritLMTokenizer:
    """HuBERT units + the Base vocoder. ``checkpoints`` (ours): the root, else $SPIRITLM_CHECKPOINTS_DIR."""
    global HUBERT, HIFIGAN_BASE
    if HUBERT is None:
        HUBERT = spiritlm_hubert(checkpoints)
    if HIFIGAN_BASE is None:
        HIFIGAN_BASE = spiritlm_base_hifigan(default_speaker=default_speaker, default_style=default_style,
                                             checkpoints=checkpoints)
    return SpiritLMTokenizer(hubert_model=HUBERT, hifigan_model=HIFIGAN_BASE)


def spiritlm_expressive(f0_backbone="fcpe", default_speaker=2, checkpoints=None) -> SpiritLMTokenizer:
    """HuBERT + pitch + style units and the Expressive vocoder."""
    global HUBERT, F0, STYLE_W2V2, HIFIGAN_EXPRESSIVE_W2V2
    if HUBERT is None:
        HUBERT = spiritlm_hubert(checkpoints)
    if F0 is None:
        F0 = spiritlm_expressive_f0(f0_backbone=f0_backbone, checkpoints=checkpoints)
    if STYLE_W2V2 is None:
        STYLE_W2V2 = spiritlm_expressive_style_encoder_w2v2(checkpoints)
    if HIFIGAN_EXPRESSIVE_W2V2 is None:
        HIFIGAN_EXPRESSIVE_W2V2 = spiritlm_expressive_hifigan_w2v2(default_speaker=default_speaker,
                                                                   checkpoints=checkpoints)
    return SpiritLMTokenizer(hubert_model=HUBERT, pitch_model=F0, style_model=STYLE_W2V2,
                             hifigan_model=HIFIGAN_EXPRESSIVE_W2V2)


__all__ = ["spiritlm_base", "spiritlm_expressive", "spiritlm_hubert", "spiritlm_expressive_f0",
           "spiritlm_expressive_style_encoder_w2v2", "spiritlm_base_hifigan", "spiritlm_expressive_hifigan_w2v2",
           "SpiritLMTokenizer"]
