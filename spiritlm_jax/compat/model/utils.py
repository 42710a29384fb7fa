"""``spiritlm.model.utils`` of the original: the prompt-string helpers and the ban lists, from
:mod:`spiritlm_jax.prompting` (same rules, unit-tested against the original's cases)."""
from __future__ import annotations

from spiritlm_jax.audio import load_audio
from spiritlm_jax.compat._tensor import as_audio, like_torch
from spiritlm_jax.prompting import (does_end_with_speech_token, does_start_with_speech_token,
                                    find_prompt_last_speech_start_position, get_forbidden_tokens)

EXPECTED_SAMPLING_RATE = 16_000


def convert_to_wav_tensor(content):
    """A path, ``Path``, bytes, numpy / jax / torch waveform → the 16 kHz mono waveform (a torch tensor when
    torch is imported, else an array with ``.cpu()``/``.numpy()``)."""
    return like_torch(load_audio(as_audio(content)))


__all__ = ["EXPECTED_SAMPLING_RATE", "convert_to_wav_tensor", "does_end_with_speech_token",
           "does_start_with_speech_token", "find_prompt_last_speech_start_position", "get_forbidden_tokens"]
