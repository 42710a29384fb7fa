"""The original wrapper's prompt and output logic as pure functions (REFERENCE.md §9.2, §9.3, §9.6, §9.7).

Nothing here runs a model: speech encoding/decoding come in as callables
(``encode_speech(content) -> str`` token string, ``decode_speech(str) -> np.ndarray`` waveform).
"""
from __future__ import annotations

import dataclasses
import enum
import math
import re
from typing import Any, Callable, NamedTuple

import numpy as np

from spiritlm_jax.text import Vocab

__all__ = [
    "TEXT_PROMPT_PREFIX",
    "SPEECH_PROMPT_PREFIX",
    "MIN_SPEECH_PIECES",
    "PromptError",
    "OutputModality",
    "ContentType",
    "GenerationInput",
    "GenerationOutput",
    "to_output_modality",
    "get_forbidden_tokens",
    "forbidden_tokens_for",
    "forbidden_mask",
    "mask_logits",
    "parse_speech_and_text",
    "does_start_with_speech_token",
    "does_end_with_speech_token",
    "find_prompt_last_speech_start_position",
    "build_prompt",
    "decode_generated_output",
]

TEXT_PROMPT_PREFIX = "[Text]"
SPEECH_PROMPT_PREFIX = "[Speech]"
_UNIT_HEADS = ("Hu", "Pi", "St")
# A speech chunk is kept only if it has at least this many "[Hu"-split pieces (= 24 [Hu] tokens): the
# original counts len(chunk.split("[Hu")), i.e. the number of [Hu] tokens plus one.
MIN_SPEECH_PIECES = 25


class PromptError(ValueError):
    """Bad wrapper input (modality, interleaved inputs, flags)."""


class OutputModality(enum.Enum):
    TEXT = "TEXT"
    SPEECH = "SPEECH"
    ARBITRARY = "ARBITRARY"


class ContentType(enum.Enum):
    TEXT = "TEXT"
    SPEECH = "SPEECH"


@dataclasses.dataclass
class GenerationInput:
    content: Any  # text: str; speech: whatever encode_speech accepts (path, array, ...)
    content_type: ContentType

    @classmethod
    def from_tuple(cls, item) -> "GenerationInput":
        if not (isinstance(item, tuple) and len(item) == 2):
            raise PromptError(f"an interleaved input must be a GenerationInput or a (content_type, content) "
                              f"tuple, got {type(item).__name__}")
        kind, content = item
        return cls(content, _content_type(kind))


class GenerationOutput(NamedTuple):
    content: Any  # str (text) or np.ndarray (speech waveform)
    content_type: ContentType


def _content_type(kind) -> ContentType:
    if isinstance(kind, ContentType):
        return kind
    if isinstance(kind, str) and kind.upper() in ("SPEECH", "TEXT"):
        return ContentType[kind.upper()]
    raise PromptError(f"expects content_type to be one of ['SPEECH', 'TEXT'] (any case), found {kind!r}")


def to_output_modality(m) -> OutputModality:
    """``OutputModality`` or one of the strings "text", "speech", "arbitrary" (any case)."""
    if isinstance(m, OutputModality):
        return m
    if isinstance(m, str) and m.upper() in OutputModality.__members__:
        return OutputModality[m.upper()]
    raise PromptError(f"invalid output_modality {m!r}; expects one of {list(OutputModality.__members__)} "
                      f"(any case) or an OutputModality")


# ------------------------------------------------------------------------------------ forbidden ids
def get_forbidden_tokens(ban_special_tokens: bool = True, generate_only_speech: bool = False,
                         generate_only_text: bool = False, ban_expressivity_tokens: bool = False,
                         vocab: Vocab | None = None) -> list[int]:
    """The original's ban list, in its order: [Text], [Speech], then text ids | Hu (+ Pi + St) ids.

    ``vocab`` defaults to the layout the original hard-codes (32000 text ids, 501 Hu, 64 Pi, 100 St).
    """
    if generate_only_speech and generate_only_text:
        raise PromptError("Nothing will be generated when generate_only_speech and generate_only_text are both True")
    v = vocab if vocab is not None else Vocab.spiritlm_default(expressive=True)
    out: list[int] = []
    if ban_special_tokens:
        out += [v.text_marker, v.speech_marker]
    if generate_only_speech:
        out += list(v.text)
    elif generate_only_text:
        out += list(v.hubert)
        if ban_expressivity_tokens:
            out += list(v.pitch) + list(v.style)
    return out


def forbidden_tokens_for(modality, expressive: bool, vocab: Vocab | None = None) -> list[int]:
    """The wrapper's ``_build_forbidden_tokens``: TEXT bans markers + units (Pi/St only for Expressive),
    SPEECH bans markers + all text ids (so EOS too), ARBITRARY bans nothing."""
    m = to_output_modality(modality)
    if m is OutputModality.TEXT:
        return get_forbidden_tokens(True, generate_only_text=True, ban_expressivity_tokens=bool(expressive), vocab=vocab)
    if m is OutputModality.SPEECH:
        return get_forbidden_tokens(True, generate_only_speech=True, vocab=vocab)
    return []


def forbidden_mask(modality, vocab: Vocab, expressive: bool, n_embed: int | None = None) -> np.ndarray:
    """Boolean vector over the model's logits (True = banned). Padding rows (no token) are never banned."""
    n = vocab.n_embed if n_embed is None else int(n_embed)
    ids = np.asarray(forbidden_tokens_for(modality, expressive, vocab), dtype=np.int64)
    if ids.size and ids.max() >= n:
        raise PromptError(f"banned id {int(ids.max())} is outside the model's {n} logits: the tokenizer and the "
                          f"model config disagree on the vocabulary")
    mask = np.zeros((n,), dtype=bool)
    mask[ids] = True
    return mask


def mask_logits(logits, mask):
    """Set banned logits to -inf (HF ``bad_words_ids`` with single-token words). jit-able."""
    import jax.numpy as jnp

    logits = jnp.asarray(logits)
    return jnp.where(jnp.asarray(mask), jnp.asarray(-jnp.inf, logits.dtype), logits)


# ------------------------------------------------------------------------------------ string helpers
def parse_speech_and_text(s: str) -> list[tuple[str, str]]:
    """Split into maximal ("content", "t"|"s") chunks; [Text]/[Speech] markers are dropped without
    closing a chunk. A speech token is "[" + Hu/Pi/St + anything up to the next "]" (or the end)."""
    chunks: list[tuple[str, str]] = []
    buf: list[str] = []
    kind = None
    n = len(s)
    i = 0
    while i < n:
        if s[i] == "[":
            if s.startswith(TEXT_PROMPT_PREFIX, i):
                i += len(TEXT_PROMPT_PREFIX)
                continue
            if s.startswith(SPEECH_PROMPT_PREFIX, i):
                i += len(SPEECH_PROMPT_PREFIX)
                continue
            if i + 2 < n and s[i + 1:i + 3] in _UNIT_HEADS:
                close = s.find("]", i + 3)
                j = n if close < 0 else close + 1
                k = "s"
            else:
                j, k = i + 1, "t"
        else:
            nxt = s.find("[", i)
            j, k = (n if nxt < 0 else nxt), "t"
        if buf and k != kind:
            chunks.append(("".join(buf), kind))
            buf = []
        buf.append(s[i:j])
        kind = k
        i = j
    if buf:
        chunks.append(("".join(buf), kind))
    return chunks


def does_start_with_speech_token(s: str | None) -> bool:
    """The original's heuristic: a "]" at index 4..10 closes a first token "[Hu…", "[Pi…" or "[St…"."""
    if s is None or len(s) <= 4 or s[0] != "[":
        return False
    for e in range(1, len(s)):
        if s[e] == "]" and e >= 4:
            return s[1:3] in _UNIT_HEADS
        if e >= 10:
            return False
    return False


def does_end_with_speech_token(s: str | None) -> bool:
    """The original's heuristic: the last "[" within the final 11 characters starts Hu/Pi/St."""
    if s is None or len(s) <= 4 or s[-1] != "]":
        return False
    n = len(s)
    for b in range(n - 2, -1, -1):
        if s[b] == "[" and b + 3 < n:
            return s[b + 1:b + 3] in _UNIT_HEADS
        if b < n - 10:
            return False
    return False


_UNIT_TOKEN = re.compile(r"\[(?:Hu|Pi|St)\d+\]")


def find_prompt_last_speech_start_position(s: str) -> int | None:
    """Start of the last run of adjacent ``[Hu<d>]``/``[Pi<d>]``/``[St<d>]`` tokens; None if there is none."""
    matches = list(_UNIT_TOKEN.finditer(s))
    if not matches:
        return None
    start = matches[-1].start()
    for m in reversed(matches[:-1]):
        if m.end() != start:
            break
        start = m.start()
    return start


# ------------------------------------------------------------------------------------ prompt building
def _as_inputs(interleaved_inputs) -> list[GenerationInput]:
    if interleaved_inputs is None:
        raise PromptError("interleaved_inputs is None: give a list of GenerationInput or (content_type, content)")
    items = interleaved_inputs if isinstance(interleaved_inputs, list) else [interleaved_inputs]
    if not items:
        raise PromptError("interleaved_inputs is an empty list: give at least one GenerationInput or "
                          "(content_type, content) tuple, or a ready prompt string with prompt=")
    out = []
    for it in items:
        if isinstance(it, GenerationInput):
            out.append(GenerationInput(it.content, _content_type(it.content_type)))
        elif isinstance(it, tuple):
            out.append(GenerationInput.from_tuple(it))
        else:
            raise PromptError("Each element of interleaved_inputs is expected to be either an instance of "
                              f"GenerationInput or a tuple of (content_modality, content), got {type(it).__name__}")
    return out


def build_prompt(interleaved_inputs, output_modality, encode_speech: Callable[[Any], str] | None = None) -> str:
    """The wrapper's ``_build_prompt``: "[Speech]"/"[Text]" at each modality change, contents verbatim,
    then the output modality's marker if the last input was of the other kind (nothing for ARBITRARY)."""
    m = to_output_modality(output_modality)
    parts: list[str] = []
    prev = None
    for it in _as_inputs(interleaved_inputs):
        if it.content_type is ContentType.SPEECH:
            if encode_speech is None:
                raise PromptError("a speech input needs encode_speech (audio -> token string, e.g. a SpeechTokenizer)")
            s = encode_speech(it.content)
            if not isinstance(s, str):
                raise PromptError(f"encode_speech must return the speech token string, got {type(s).__name__}")
            if prev != "s":
                parts.append(SPEECH_PROMPT_PREFIX)
            parts.append(s)
            prev = "s"
        else:
            if not isinstance(it.content, str):
                raise PromptError(f"a text input must be a str, got {type(it.content).__name__}")
            if prev != "t":
                parts.append(TEXT_PROMPT_PREFIX)
            parts.append(it.content)
            prev = "t"
    if m is OutputModality.TEXT and prev != "t":
        parts.append(TEXT_PROMPT_PREFIX)
    elif m is OutputModality.SPEECH and prev != "s":
        parts.append(SPEECH_PROMPT_PREFIX)
    return "".join(parts)


# ------------------------------------------------------------------------------------ output parsing
def decode_generated_output(full_text: str, prompt: str, output_modality,
                            decode_speech: Callable[[str], np.ndarray]) -> list[GenerationOutput]:
    """The wrapper's ``_decode_from_generated_output`` (REFERENCE.md §9.6).

    ``full_text`` is the decode of prompt + continuation; the new content is
    ``full_text[len(prompt):].strip()``. In ARBITRARY mode, when the prompt ends with speech and the
    continuation starts with speech, the first speech chunk is decoded together with the prompt's last
    speech run and the prompt's share is trimmed proportionally; speech chunks of fewer than 24 [Hu]
    tokens (other than an untrimmed first chunk) are dropped, but always decoded first.
    """
    m = to_output_modality(output_modality)
    new = full_text[len(prompt):].strip()
    continues_speech, p0 = False, 0
    if m is OutputModality.ARBITRARY and does_end_with_speech_token(prompt) and does_start_with_speech_token(new):
        continues_speech = True
        p0 = find_prompt_last_speech_start_position(prompt)  # never None here in practice; None slices all
        new = full_text[p0:]
    if m is OutputModality.TEXT:
        return [GenerationOutput(new, ContentType.TEXT)]
    if m is OutputModality.SPEECH:
        return [GenerationOutput(np.asarray(decode_speech(new)), ContentType.SPEECH)]
    outs: list[GenerationOutput] = []
    for i, (chunk, kind) in enumerate(parse_speech_and_text(new)):
        if kind == "t":
            outs.append(GenerationOutput(chunk, ContentType.TEXT))
            continue
        n_pieces = len(chunk.split("[Hu"))  # = number of [Hu] + 1, as in the original
        wav = np.asarray(decode_speech(chunk))
        if i == 0 and continues_speech:
            n_prompt = len(prompt[p0:].split("[Hu")) - 1
            if n_pieces - n_prompt < MIN_SPEECH_PIECES:
                continue
            ratio = n_prompt / n_pieces
            wav = wav[math.ceil(wav.size * ratio):]
        elif i > 0 and n_pieces < MIN_SPEECH_PIECES:
            continue
        outs.append(GenerationOutput(wav, ContentType.SPEECH))
    return outs
