"""Code written for the original Spirit LM runs on spiritlm-jax with ONE rule applied to its imports:

    replace the leading ``spiritlm.`` of every import path (and of ``unittest.mock.patch`` target
    strings) by ``spiritlm_jax.compat.``; ``import spiritlm`` becomes ``import spiritlm_jax.compat as spiritlm``.

    from spiritlm.model.spiritlm_model import Spiritlm, OutputModality        # before
    from spiritlm_jax.compat.model.spiritlm_model import Spiritlm, OutputModality   # after

The modules mirror the original's paths (``model.spiritlm_model``, ``model.utils``, ``speech_tokenizer``
and its ``hubert``/``f0``/``style_encoder``/``hifigan``/``spiritlm_tokenizer`` modules) with the same
constructor signatures, defaults, return types (mutable dataclasses, float32 numpy waveforms, unit
dicts with the original's keys) and exception types. It is a thin layer: every call goes to our own
API (``SpiritLM``, ``SpeechTokenizer``, the tokenizers, ``HifiGANVocoder``); nothing is implemented
twice. torch and transformers are never imported here; their objects are accepted when given.
The deliberate differences are listed in the README ("Porting code written for the original").
"""
