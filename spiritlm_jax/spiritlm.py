"""The original's user API, ``Spiritlm``, on our JAX models — plus batched generation it cannot do.

    lm = SpiritLM.from_pretrained("spirit-lm-expressive-7b")          # $SPIRITLM_CHECKPOINTS_DIR layout
    outs = lm.generate(interleaved_inputs=[("speech", "question.wav"), ("text", " The answer is")],
                       output_modality="arbitrary", max_new_tokens=200, do_sample=True, top_p=0.95)
    for o in outs: print(o.content_type, o.content if o.content_type.value == "TEXT" else o.content.shape)

    many = lm.generate_batch([[("text", "Once upon a time")], [("speech", wav)]], output_modality="speech",
                             max_new_tokens=100)                     # ONE engine call for every prompt

Behaviour follows the original wrapper (REFERENCE §9): prompt building with ``[Speech]``/``[Text]``
markers, the output-modality ban lists passed as HF ``bad_words_ids`` (SPEECH bans all text ids except
EOS, which transformers drops from any bad-words list), HF ``GenerationConfig`` defaults (greedy unless
``do_sample``; ``top_k=50``; 20 new tokens when neither ``max_new_tokens`` nor ``max_length`` is given, as
transformers does and the original's recorded calls show),
output = decode(prompt + new ids)[len(prompt):].strip(), parsed into text and speech chunks with the
25-unit rule and the prompt-ratio trimming. Sampling draws from the same distributions but not the same
random stream as torch.

Generation options: a ``transformers.GenerationConfig`` (read by attribute; transformers is never
imported), a dict, or keywords — every option of ``infer/hf_config.SUPPORTED`` (repetition_penalty,
min_new_tokens, no_repeat_ngram_size, eos_token_id lists, bad_words_ids, stop_strings,
num_return_sequences, ...); anything else is a clear ``GenerationError``. Without ``seed=``, see
:func:`default_seed` (``transformers.set_seed(n)`` before a call reproduces it).

Fixed original bugs (documented): a model PATH gets a speech tokenizer too (the original silently has
none); an empty speech chunk, or Expressive speech without ``[Pi]``, raises ``SpeechDecodeError`` (a
clear error instead of a crash deep in the vocoder); prompts longer than the context raise
``GenerationError`` before any compute.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from . import prompting
from .config import LlamaConfig
from .prompting import ContentType, GenerationInput, GenerationOutput, OutputModality
from .speech import SpeechTokenizer, _variant, checkpoints_root
from .text import TextTokenizer

def default_dtype() -> str:
    import jax

    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def default_seed() -> int:
    """The seed of a call without ``seed=``. When torch is imported, one draw from torch's default
    generator: ``transformers.set_seed(n)`` before a call then reproduces its output, and successive calls
    differ, as the original's scripts rely on (a seed taken from ``torch.initial_seed()`` would repeat the
    same sample on every call). Without torch: fresh OS entropy. torch is never imported here."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "randint"):
        return int(torch.randint(0, 2**31 - 1, (1,)).item())
    return int.from_bytes(os.urandom(4), "little")


class SpiritLM:
    def __init__(self, cfg: LlamaConfig, params, text_tokenizer: TextTokenizer, speech_tokenizer: SpeechTokenizer | None,
                 variant: str, mesh=None):
        self.cfg = cfg
        self.params = params
        self.tokenizer = text_tokenizer
        self.speech_tokenizer = speech_tokenizer
        self.variant = variant
        self.mesh = mesh

    @property
    def expressive(self) -> bool:
        return self.variant == "expressive"

    # ------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, *, checkpoints: str | os.PathLike | None = None,
                        speech_checkpoints: str | os.PathLike | None = None, dtype: str | None = None,
                        mesh=None, f0_backbone: str = "fcpe", with_speech: bool = True,
                        variant: str | None = None, scan_layers: bool = False,
                        quantize: str | None = None) -> "SpiritLM":
        """``name_or_path``: a variant name (``spirit-lm-base-7b``, ``spirit-lm-expressive-7b``, or
        ``base``/``expressive``) resolved under ``checkpoints`` / $SPIRITLM_CHECKPOINTS_DIR, or a
        directory: a checkpoints/ tree (original, or converted by ``spiritlm-jax convert all``: read
        without torch), an LM folder (original HF, converted, or a trained run exported by
        ``spiritlm-jax export``). docs/model-format.md describes the layouts.

        ``speech_checkpoints``: the folder holding ``speech_tokenizer/`` (default: the same root, the
        grand-parent of an LM folder inside a tree, else ``checkpoints`` — so a trained model exported
        on its own speaks through the speech tokenizer of a checkpoints tree).
        ``variant`` (base / expressive) is read from the name, the folder name, our converted config, or
        the vocabulary size (32512 Base, 32768 Expressive); pass it when none of these tells.
        ``scan_layers``: False (default) runs the layers unrolled, which decodes 2–2.5× faster on CPU than
        ``nn.scan`` (a scanned decode step re-slices every layer's weights and cache each token: measured
        11.9 vs 27.5 ms per step at 135 M parameters, batch 1); True compiles faster for very deep models.
        ``quantize``: None, "int8" or "int4": the LM's matmul weights quantized after loading with qwix
        (weight-only, per-channel; models/quantization.py); generation and scoring then run quantized.
        """
        from .converters.llama import FORMAT, load_converted, load_hf_params

        dtype = dtype or default_dtype()
        p = Path(name_or_path)
        variant = _variant(variant) if variant else None
        if p.is_dir() and (p / "spiritlm_model").is_dir():  # a whole checkpoints/ tree (original or converted)
            present = sorted(v for v in ("base", "expressive") if (p / "spiritlm_model" / f"spirit-lm-{v}-7b").is_dir())
            if variant is None and len(present) != 1:
                raise FileNotFoundError(
                    f"{p} is a checkpoints/ tree holding {present or 'no'} LM(s); pass variant='base' or 'expressive'"
                    if present else f"{p}/spiritlm_model holds no spirit-lm-base-7b or spirit-lm-expressive-7b folder")
            variant = variant or present[0]
            lm_dir = p / "spiritlm_model" / f"spirit-lm-{variant}-7b"
            if not lm_dir.is_dir():
                raise FileNotFoundError(f"{lm_dir} not found: the checkpoint folder lacks the {variant} LM")
            root = speech_checkpoints or p
        elif p.is_dir():  # an LM folder: its speech tokenizer from the tree around it, else from `checkpoints`
            lm_dir = p
            root = speech_checkpoints or (p.parent.parent if (p.parent.parent / "speech_tokenizer").is_dir() else None)
            if root is None and (checkpoints or os.environ.get("SPIRITLM_CHECKPOINTS_DIR")):
                root = checkpoints_root(checkpoints)
        else:
            variant = variant or _variant(name_or_path)
            root = checkpoints_root(checkpoints)
            lm_dir = root / "spiritlm_model" / f"spirit-lm-{variant}-7b"
            if not lm_dir.is_dir():
                raise FileNotFoundError(f"{lm_dir} not found: the checkpoint folder lacks the {variant} LM")
            root = speech_checkpoints or root
        if not (lm_dir / "config.json").is_file():
            raise FileNotFoundError(f"{lm_dir} has no config.json: expected an LM folder (original HF, converted by "
                                    f"`spiritlm-jax convert`, or written by `spiritlm-jax export`) or a checkpoints/ tree")
        meta = json.loads((lm_dir / "config.json").read_text())
        if meta.get("format") == FORMAT:
            cfg, params = load_converted(lm_dir, mesh=mesh, dtype=dtype, param_dtype=dtype, scan_layers=scan_layers)
        else:
            from .model_dir import original_needs_torch

            original_needs_torch(lm_dir, "an HF Llama folder")
            cfg, params = load_hf_params(lm_dir, dtype=dtype, scan_layers=scan_layers)
            cfg = cfg.replace(dtype=dtype, param_dtype=dtype)
            params = _place(params, cfg, mesh)
        if quantize is not None:
            from .models.quantization import quantize_params

            cfg = cfg.replace(quantize=quantize)
            params = quantize_params(cfg, params)
        tok = TextTokenizer.from_dir(lm_dir, n_embed=cfg.vocab_size)
        variant = variant or _infer_variant(lm_dir, meta, cfg)
        speech = None
        if with_speech:
            if root is None:
                raise FileNotFoundError(
                    f"no speech_tokenizer/ folder found for {lm_dir}; pass speech_checkpoints= (the original "
                    f"checkpoints/ root) or with_speech=False for a text-only model")
            # the speech models are small and run on each process's own input: never across processes
            local = mesh if mesh is None or not mesh.is_multi_process else None
            speech = SpeechTokenizer.from_checkpoints(root, variant, f0_backbone=f0_backbone, mesh=local)
        return cls(cfg, params, tok, speech, variant, mesh=mesh)

    # ------------------------------------------------------------------------------ generation
    def _sampling(self, n_prompt: int, generation_config, kwargs: dict):
        """``generation_config`` (a transformers ``GenerationConfig``, read by attribute; a dict; or None)
        overridden by keyword options, as the original's ``_overwrite_generation_config``."""
        from .infer.hf_config import read_generation_config, sampling_config

        options = read_generation_config(generation_config)
        options.update(kwargs)
        return sampling_config(options, n_prompt, context=self.cfg.max_position_embeddings)

    def token_texts(self) -> list[str]:
        """Each token id's text as it reads inside a sentence (HF ``StopStringCriteria``'s view of the
        vocabulary: the token decoded after a fixed prefix); computed once, for ``stop_strings``."""
        if getattr(self, "_token_texts", None) is None:
            base = self.tokenizer.encode("abcdef", add_bos=False)
            head = self.tokenizer.decode(base, skip_special_tokens=False)
            texts = []
            for t in range(len(self.tokenizer)):
                full = self.tokenizer.decode(base + [t], skip_special_tokens=False)
                texts.append(full[len(head):] if full.startswith(head) else full)
            self._token_texts = texts
        return self._token_texts

    def build_prompt(self, interleaved_inputs, output_modality) -> str:
        return prompting.build_prompt(interleaved_inputs, output_modality, encode_speech=self._encode_speech)

    def _encode_speech(self, content) -> str:
        if self.speech_tokenizer is None:
            raise prompting.PromptError("this model was loaded without a speech tokenizer (with_speech=False)")
        return self.speech_tokenizer.encode_string(content)

    def _banned(self, modality: OutputModality, force: bool) -> np.ndarray:
        if not force or modality is OutputModality.ARBITRARY:
            return np.zeros((self.cfg.vocab_size,), bool)
        return prompting.forbidden_mask(modality, self.tokenizer.vocab, self.expressive, n_embed=self.cfg.vocab_size)

    def _decode_speech(self, speaker_id: int):
        def decode(s: str) -> np.ndarray:
            if self.speech_tokenizer is None:
                raise prompting.PromptError("this model was loaded without a speech tokenizer: cannot decode speech")
            return self.speech_tokenizer.decode(s, speaker_id=speaker_id)

        return decode

    def _decode_output(self, full: str, prompt: str, modality, decode_speech):
        return prompting.decode_generated_output(full, prompt, modality, decode_speech)

    def generate_batch(self, batch_inputs: Sequence[Any] | None = None, *, prompts: Sequence[str] | None = None,
                       output_modality: Any = OutputModality.ARBITRARY, generation_config: dict | None = None,
                       force_tokens_to_output_modality: bool = True, speaker_id: int = 2, return_prompt: bool = False,
                       seed: int | None = None, return_ids: bool = False, decode: bool = True, **kwargs):
        """Many prompts in ONE engine call (prompts of any lengths; per-row modality masks).

        ``batch_inputs``: a list whose items are what ``generate`` takes as ``interleaved_inputs``; or
        ``prompts``: ready token strings. ``output_modality``: one for all, or one per prompt.
        Returns a list of output lists (and of prompts with ``return_prompt``; and the new token ids per
        row with ``return_ids``). ``decode=False`` skips text/speech decoding and returns the ids alone.
        With ``num_return_sequences=N`` each prompt's entry is a list of N output lists (the original
        silently decodes only the first).
        """
        from .infer.engine import generate as engine_generate

        if (batch_inputs is None) == (prompts is None):
            raise prompting.PromptError("give exactly one of batch_inputs (interleaved inputs per prompt) or prompts")
        n = len(prompts if prompts is not None else batch_inputs)
        if n == 0:
            raise prompting.PromptError("no prompts given")
        mods = list(output_modality) if isinstance(output_modality, (list, tuple)) else [output_modality] * n
        if len(mods) != n:
            raise prompting.PromptError(f"{n} prompts but {len(mods)} output modalities")
        mods = [prompting.to_output_modality(m) for m in mods]
        if prompts is None:
            prompts = [self.build_prompt(inp, m) for inp, m in zip(batch_inputs, mods)]
        ids = [self.tokenizer.encode(p) for p in prompts]
        sampling = self._sampling(max(map(len, ids)), generation_config, kwargs)
        banned = np.stack([self._banned(m, force_tokens_to_output_modality) for m in mods])
        # the original passes the modality ban list as HF bad_words_ids, from which transformers drops
        # every EOS id (NoBadWordsLogitsProcessor): EOS stays reachable, also in SPEECH mode
        eos_ids = list(sampling.eos_token_id or [self.tokenizer.vocab.eos_id])
        banned[:, [e for e in eos_ids if e < banned.shape[1]]] = False
        seed = default_seed() if seed is None else int(seed)
        new_ids, _ = engine_generate(self.cfg, self.params, ids, sampling, banned, seed=seed, mesh=self.mesh,
                                     eos_id=self.tokenizer.vocab.eos_id,
                                     token_texts=self.token_texts if sampling.stop_strings else None)
        n_seq = sampling.num_return_sequences
        owner = [i for i in range(n) for _ in range(n_seq)]
        if not decode:
            return new_ids
        decode_speech = self._decode_speech(speaker_id)
        decoded = []
        for i, nid in zip(owner, new_ids):
            full = self.tokenizer.decode(ids[i] + nid)
            decoded.append(self._decode_output(full, prompts[i], mods[i], decode_speech))
        # num_return_sequences > 1: each prompt gets the list of its N output lists
        results = decoded if n_seq == 1 else [decoded[i * n_seq:(i + 1) * n_seq] for i in range(n)]
        out = (results, prompts) if return_prompt else results
        return (out, new_ids) if return_ids else out

    def generate(self, interleaved_inputs=None, prompt: str | None = None,
                 output_modality: Any = OutputModality.ARBITRARY, generation_config: dict | None = None,
                 force_tokens_to_output_modality: bool = True, speaker_id: int = 2, return_prompt: bool = False,
                 seed: int | None = None, **kwargs):
        """The original ``Spiritlm.generate``: returns a list of ``GenerationOutput(content, content_type)``
        (text: str; speech: float32 16 kHz waveform), and the prompt too with ``return_prompt``."""
        if prompt is not None and interleaved_inputs:
            import warnings

            warnings.warn("both prompt and interleaved_inputs given: interleaved_inputs is ignored (as the original)")
        if prompt is None and interleaved_inputs is None:
            raise prompting.PromptError("give interleaved_inputs (a list of (content_type, content)) or a ready prompt string")
        kw = dict(output_modality=output_modality, generation_config=generation_config,
                  force_tokens_to_output_modality=force_tokens_to_output_modality, speaker_id=speaker_id,
                  return_prompt=True, seed=seed, **kwargs)
        if prompt is not None:
            outs, prompts = self.generate_batch(prompts=[prompt], **kw)
        else:
            outs, prompts = self.generate_batch([interleaved_inputs], **kw)
        return (outs[0], prompts[0]) if return_prompt else outs[0]


def _infer_variant(lm_dir: Path, meta: dict, cfg: LlamaConfig) -> str:
    names = [lm_dir.name, str(meta.get("source", ""))]
    for n in names:
        for v in ("expressive", "base"):
            if f"spirit-lm-{v}" in Path(n).name:
                return v
    if meta.get("variant") in ("base", "expressive"):
        return meta["variant"]
    by_vocab = {32512: "base", 32768: "expressive"}
    if cfg.vocab_size in by_vocab:
        return by_vocab[cfg.vocab_size]
    raise ValueError(f"cannot tell whether {lm_dir} is the Base or the Expressive model (folder name, config and "
                     f"vocabulary size {cfg.vocab_size} do not say); pass variant='base' or variant='expressive'")


def _place(params, cfg: LlamaConfig, mesh):
    import jax
    import jax.numpy as jnp

    if mesh is None:
        return jax.tree.map(jnp.asarray, params)
    from .models.llama import param_shardings

    return jax.tree.map(lambda a, s: jax.device_put(a, s), params, param_shardings(cfg, mesh))


__all__ = ["SpiritLM", "GenerationInput", "GenerationOutput", "OutputModality", "ContentType"]
