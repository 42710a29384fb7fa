"""Generation options the way HF users pass them (``GenerationConfig`` objects, dicts, keywords) → one
validated :class:`~spiritlm_jax.infer.processors.SamplingConfig`.

transformers stays optional and is never imported here: a ``GenerationConfig`` is read through its
attributes (duck typing), and only the fields that DIFFER from transformers' defaults are kept — that is
what the object adds to a call. The defaults below are transformers' documented ``GenerationConfig``
defaults (4.46–4.49, the versions the original was run with; in 5.x every field defaults to None and the
same values apply inside ``generate``); ``tests/test_compat.py`` checks them against the real class.

Names are checked here, values in ``SamplingConfig``: an option we do not implement is a clear
:class:`GenerationError` naming it, never silently ignored.
"""
from __future__ import annotations

from typing import Any, Mapping

from spiritlm_jax.infer.processors import GenerationError, SamplingConfig

# transformers.GenerationConfig defaults (docs: "main_classes/text_generation", 4.46–4.49)
HF_GENERATION_DEFAULTS: dict[str, Any] = {
    "max_length": 20, "max_new_tokens": None, "min_length": 0, "min_new_tokens": None, "early_stopping": False,
    "max_time": None, "stop_strings": None, "do_sample": False, "num_beams": 1, "num_beam_groups": 1,
    "penalty_alpha": None, "dola_layers": None, "use_cache": True, "cache_implementation": None,
    "cache_config": None, "return_legacy_cache": True, "prefill_chunk_size": None, "temperature": 1.0,
    "top_k": 50, "top_p": 1.0, "min_p": None, "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0,
    "diversity_penalty": 0.0, "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "bad_words_ids": None, "force_words_ids": None,
    "renormalize_logits": False, "constraints": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "remove_invalid_values": False, "exponential_decay_length_penalty": None,
    "suppress_tokens": None, "begin_suppress_tokens": None, "forced_decoder_ids": None,
    "sequence_bias": None, "token_healing": False, "guidance_scale": None, "low_memory": None,
    "watermarking_config": None, "num_return_sequences": 1, "output_attentions": False,
    "output_hidden_states": False, "output_scores": False, "output_logits": None,
    "return_dict_in_generate": False, "pad_token_id": None, "bos_token_id": None, "eos_token_id": None,
    "encoder_no_repeat_ngram_size": 0, "decoder_start_token_id": None, "is_assistant": False,
    "num_assistant_tokens": 20, "num_assistant_tokens_schedule": "constant",
    "assistant_confidence_threshold": 0.4, "prompt_lookup_num_tokens": None, "max_matching_ngram_size": None,
    "assistant_early_exit": None, "assistant_lookbehind": 10, "target_lookbehind": 10,
    "compile_config": None, "disable_compile": False, "generation_kwargs": {},
}

# transformers: "by default let's always generate 20 new tokens" (max_length left at its default)
DEFAULT_NEW_TOKENS = 20

# implemented: mapped onto SamplingConfig fields of the same name
SUPPORTED = ("do_sample", "temperature", "top_k", "top_p", "max_new_tokens", "max_length", "repetition_penalty",
             "min_new_tokens", "min_length", "no_repeat_ngram_size", "eos_token_id", "bad_words_ids", "stop_strings",
             "num_return_sequences", "num_beams")
# accepted because they cannot change the returned ids: the prompt is tokenized already (bos), finished
# rows are cut rather than padded (pad), the KV cache is always on (use_cache)
NO_EFFECT = ("pad_token_id", "bos_token_id", "decoder_start_token_id", "use_cache", "cache_implementation")


def _differs(name: str, value) -> bool:
    if value is None:
        return False
    return name not in HF_GENERATION_DEFAULTS or value != HF_GENERATION_DEFAULTS[name]


def read_generation_config(obj) -> dict[str, Any]:
    """A ``transformers.GenerationConfig`` (or anything with its attributes), a dict, a SamplingConfig or
    None → the dict of options it sets (fields equal to transformers' defaults dropped)."""
    if obj is None:
        return {}
    if isinstance(obj, SamplingConfig):
        import dataclasses

        return {k: v for k, v in dataclasses.asdict(obj).items() if _differs(k, v)}
    if isinstance(obj, Mapping):
        items = dict(obj)
    elif hasattr(obj, "__dict__") and hasattr(obj, "to_dict"):  # transformers.GenerationConfig, read by attribute
        items = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "transformers_version"}
    else:
        raise GenerationError(f"generation_config must be a transformers.GenerationConfig, a dict of generation "
                              f"options or None, got {type(obj).__name__}")
    return {k: v for k, v in items.items() if _differs(k, v)}


def sampling_config(options: Mapping[str, Any], n_prompt: int, context: int | None = None) -> SamplingConfig:
    """Options (HF names) → SamplingConfig, with transformers' length rule (what the original ran with,
    as its recorded calls show): ``max_new_tokens`` if given; else an explicit ``max_length`` bounds prompt +
    new tokens (a prompt that already fills it is an error); else 20 new tokens, capped at the context."""
    opts = dict(options)
    unknown = sorted(set(opts) - set(SUPPORTED) - set(NO_EFFECT))
    if unknown:
        raise GenerationError(
            f"unsupported generation option(s) {unknown}: spiritlm-jax implements {sorted(SUPPORTED)} "
            f"(and accepts {sorted(NO_EFFECT)}, which do not change the output); remove the option")
    for name in NO_EFFECT:
        opts.pop(name, None)
    beams = opts.pop("num_beams", 1)
    if beams != 1:
        raise GenerationError(
            f"num_beams={beams!r}: beam search is not implemented in spiritlm-jax (the original's documented "
            f"calls all sample or decode greedily). Use num_beams=1, or do_sample=True with "
            f"num_return_sequences=N to get N candidates")
    max_length = opts.pop("max_length", None)
    if opts.get("max_new_tokens") is None:
        opts.pop("max_new_tokens", None)
        if max_length is not None:
            if not isinstance(max_length, int) or isinstance(max_length, bool):
                raise GenerationError(f"max_length must be an integer, got {max_length!r}")
            if n_prompt >= max_length:
                raise GenerationError(
                    f"the prompt has {n_prompt} tokens but max_length={max_length} (prompt + new tokens) leaves no "
                    f"room; pass max_new_tokens=N (or a larger max_length)")
            opts["max_new_tokens"] = max_length - n_prompt
        else:
            room = (context - n_prompt) if context is not None else DEFAULT_NEW_TOKENS
            opts["max_new_tokens"] = min(DEFAULT_NEW_TOKENS, room) if room > 0 else DEFAULT_NEW_TOKENS
    return SamplingConfig(**opts)


__all__ = ["HF_GENERATION_DEFAULTS", "DEFAULT_NEW_TOKENS", "SUPPORTED", "NO_EFFECT", "read_generation_config", "sampling_config"]
