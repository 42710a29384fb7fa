"""``spiritlm.model.spiritlm_model``: ``Spiritlm`` with the original's constructor, ``generate`` signature,
dataclass outputs and log lines, over :class:`spiritlm_jax.spiritlm.SpiritLM`.

    spirit_lm = Spiritlm("spirit-lm-base-7b")        # $SPIRITLM_CHECKPOINTS_DIR (else ./checkpoints)
    spirit_lm.generate(interleaved_inputs=[("text", "The largest country in the world is")],
                       output_modality="text", generation_config=GenerationConfig(max_new_tokens=20))
    # [GenerationOuput(content='...', content_type=<ContentType.TEXT: 'TEXT'>)]

The helpers the original's tests call on an instance without state (``_parse_speech_and_text`` after
patching ``__init__``) need no state here either.
"""
from __future__ import annotations

import enum
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Union

import numpy as np

from spiritlm_jax import prompting
from spiritlm_jax.compat._tensor import as_audio
from spiritlm_jax.prompting import ContentType, GenerationInput, OutputModality

_logger = logging.getLogger(__name__)


@dataclass
class GenerationOuput:  # sic: the original's spelling
    content: Union[str, np.ndarray]
    content_type: ContentType


InterleavedInputs = List[GenerationInput]
InterleavedOutputs = List[GenerationOuput]


class SpiritlmVariants(enum.Enum):
    BASE_7B = "spirit-lm-base-7b"
    EXPRESSIVIE_7B = "spirit-lm-expressive-7b"  # sic: the original's spelling

    @classmethod
    def values_as_list(cls):
        return [e.value for e in cls]


def _ensure_model_name(name: str) -> str:
    stem = Path(name).stem if Path(name).exists() else str(name)
    if stem not in SpiritlmVariants.values_as_list():
        raise ValueError(f"Unknown model name {name!r}, expected one of {SpiritlmVariants.values_as_list()} "
                         f"(or a folder with one of these names)")
    return stem


def _convert_str_output_modality(output_modality) -> OutputModality:
    return prompting.to_output_modality(output_modality)


def _get_generation_inputs(interleaved_inputs) -> list[GenerationInput]:
    out = []
    for item in interleaved_inputs:
        if isinstance(item, tuple):
            item = GenerationInput.from_tuple(item)
        elif not isinstance(item, GenerationInput):
            raise prompting.PromptError("Each element of interleaved_inputs is expected to be either an instance of "
                                        "GenerationInput or a tuple of (content_modality, content)")
        out.append(item)
    return out


def _overwrite_generation_config(generation_config, kwargs: dict) -> dict:
    """The options of ``generation_config`` with the keywords on top, logging the original's warning when
    a keyword changes a value the config sets."""
    from spiritlm_jax.infer.hf_config import read_generation_config

    options = read_generation_config(generation_config)
    for name, value in kwargs.items():
        if name in options and value != options[name]:
            _logger.warning(f"Overwrite generation_config's {name} to {value}")
        options[name] = value
    return options


class Spiritlm:
    TEXT_PROMPT_PREFIX = prompting.TEXT_PROMPT_PREFIX
    SPEECH_PROMPT_PREFIX = prompting.SPEECH_PROMPT_PREFIX

    def __init__(self, name: str, **speech_tokenizer_kwargs):
        """``name``: ``spirit-lm-base-7b`` / ``spirit-lm-expressive-7b`` (under
        $SPIRITLM_CHECKPOINTS_DIR/spiritlm_model) or a folder of that name. ``speech_tokenizer_kwargs`` go
        to ``spiritlm_base`` (default_speaker, default_style) or ``spiritlm_expressive`` (f0_backbone,
        default_speaker). Unlike the original, a folder also gets its speech tokenizer."""
        from spiritlm_jax.compat import speech_tokenizer as factories
        from spiritlm_jax.speech import checkpoints_root
        from spiritlm_jax.spiritlm import SpiritLM

        variant = _ensure_model_name(name)
        if Path(name).exists():
            path = Path(name)
            root = path.parent.parent if (path.parent.parent / "speech_tokenizer").is_dir() else None
        else:
            root = checkpoints_root(None)
            path = root / "spiritlm_model" / name
        self.is_expressive_model = variant == SpiritlmVariants.EXPRESSIVIE_7B.value
        _logger.info(f"Loading SPIRIT-LM model from the path {path}...")
        self._lm = SpiritLM.from_pretrained(path, with_speech=False,
                                            variant="expressive" if self.is_expressive_model else "base")
        _logger.info("SPIRIT-LM model is loaded.")
        self.model = self._lm
        self.tokenizer = self._lm.tokenizer
        self.device = _jax_device()
        _logger.info("Loading SPIRIT-LM speech tokenizers ...")
        factory = factories.spiritlm_expressive if self.is_expressive_model else factories.spiritlm_base
        self.speech_tokenizer = factory(checkpoints=root, **speech_tokenizer_kwargs)
        self._lm.speech_tokenizer = self.speech_tokenizer.tokenizer
        _logger.info("SPIRIT-LM speech tokenizers are loaded.")

    # ------------------------------------------------------------------ the original's helpers
    def _build_prompt(self, generation_inputs: List[GenerationInput], output_modality: OutputModality) -> str:
        if not isinstance(output_modality, OutputModality):
            raise ValueError(f"Unknown output_modality: {output_modality}")
        return prompting.build_prompt(generation_inputs, output_modality,
                                      encode_speech=lambda content: self.speech_tokenizer(as_audio(content)))

    def _build_forbidden_tokens(self, output_modality: OutputModality) -> List[int]:
        return prompting.forbidden_tokens_for(output_modality, self.is_expressive_model)

    def _parse_speech_and_text(self, generated_content: str):
        return prompting.parse_speech_and_text(generated_content)

    def _decode_from_generated_output(self, output_modality: OutputModality, generated_content: str, prompt: str,
                                      speaker_id: int = 2) -> InterleavedOutputs:
        outs = prompting.decode_generated_output(
            generated_content, prompt, output_modality,
            lambda gen: self.speech_tokenizer.decode(gen, speaker_id=speaker_id))
        return [GenerationOuput(content=o.content, content_type=o.content_type) for o in outs]

    # ------------------------------------------------------------------ generation
    def generate(self, interleaved_inputs: Optional[List[Union[GenerationInput, tuple]]] = None,
                 prompt: Optional[str] = None, output_modality: Union[OutputModality, str] = OutputModality.ARBITRARY,
                 generation_config: Any = None, force_tokens_to_output_modality: bool = True, speaker_id: int = 2,
                 return_prompt: bool = False, seed: Optional[int] = None, **kwargs):
        """The original ``generate``: a list of ``GenerationOuput`` (and the prompt with ``return_prompt``).
        With ``num_return_sequences=N`` (N > 1), a list of N such lists (the original keeps only the first)."""
        if seed is not None:
            _logger.info(f"Set seed to {seed}")
            random.seed(seed)  # as transformers.set_seed: Python's and numpy's global RNGs too (unit fallbacks)
            np.random.seed(seed)
        output_modality = _convert_str_output_modality(output_modality)
        if interleaved_inputs is None and prompt is None:
            raise prompting.PromptError("interleaved_inputs and prompt can not both be None")
        if prompt is not None and interleaved_inputs is not None and len(interleaved_inputs) > 0:
            _logger.warning("When prompt is specified, interleaved_inputs will not be used.")
        if prompt is None:
            if not isinstance(interleaved_inputs, list):
                interleaved_inputs = [interleaved_inputs]
            prompt = self._build_prompt(_get_generation_inputs(interleaved_inputs), output_modality)
        options = _overwrite_generation_config(generation_config, kwargs)
        new_ids = self._lm.generate_batch(prompts=[prompt], output_modality=output_modality,
                                          generation_config=options,
                                          force_tokens_to_output_modality=force_tokens_to_output_modality,
                                          seed=seed, decode=False)
        prompt_ids = self.tokenizer.encode(prompt)
        decoded = []
        for ids in new_ids:
            gen = self.tokenizer.decode(prompt_ids + ids)
            try:
                decoded.append(self._decode_from_generated_output(output_modality, gen, prompt, speaker_id))
            except Exception:
                _logger.error(f"Fail to decode the content: {gen[len(prompt):].strip()}")
                raise
        out = decoded[0] if len(decoded) == 1 else decoded
        return (out, prompt) if return_prompt else out


def _jax_device() -> str:
    import jax

    return str(jax.devices()[0])


__all__ = ["Spiritlm", "OutputModality", "ContentType", "GenerationInput", "GenerationOuput", "InterleavedInputs",
           "InterleavedOutputs", "SpiritlmVariants"]
