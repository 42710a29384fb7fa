"""Hugging Face logits processors and stopping rules as pure JAX functions with PER-ROW parameters.

What the original passes to ``transformers.generate`` (and what HF users pass through it), applied in
HF's order (``GenerationMixin._get_logits_processor``, transformers 4.46 – 5.x):

    repetition_penalty → no_repeat_ngram_size → bad_words_ids (+ the output-modality mask) →
    min_length → min_new_tokens → [sampling only] temperature → top_k → top_p

and the stopping rules: an id of the ``eos_token_id`` list, ``max_new_tokens`` / ``max_length``, and
``stop_strings`` (HF ``StopStringCriteria``: the stop string must END inside the final token).

Every numeric option is a (B,) array, one value per row, so one compiled program serves rows with
different settings (the server's per-slot sampling) and changing a value never recompiles. A neutral
value is an exact no-op (temperature 1, top_k 0, top_p 1, penalty 1, sizes 0). Only the STRUCTURE is
static (:class:`ProcessorFlags`: which processors are compiled in, the sort width, the largest n-gram
size), chosen by :func:`flags_for` from the rows' settings.

:class:`SamplingConfig` is the ONE place where generation options are validated: every entry point
(``SpiritLM.generate``, the compat layer, the engine, the CLI, the server) builds one and gets the
same :class:`GenerationError` for a bad value.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NEG_INF = -jnp.inf
INT32_MAX = 2**31 - 1
MAX_NGRAM = 32  # the n-gram check is unrolled over the n-gram size: beyond this it is a compile-time cost
MAX_RETURN_SEQUENCES = 4096


class GenerationError(ValueError):
    """A generation request that cannot run: bad option values, prompts that do not fit, non-finite logits."""


# ------------------------------------------------------------------------------------ validation
def _int_option(name: str, value, lo: int, hi: int = INT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = type(value).__name__
        hint = f" (use {int(value)} or {math.ceil(value)})" if isinstance(value, float) and math.isfinite(value) else ""
        raise GenerationError(f"{name} must be an integer, got {value!r} ({kind}){hint}")
    value = int(value)
    if not lo <= value <= hi:
        raise GenerationError(f"{name}={value} is out of range: it must be between {lo} and {hi}")
    return value


def _float_option(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise GenerationError(f"{name} must be a number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if not math.isfinite(value):
        raise GenerationError(f"{name} must be a finite number, got {value}")
    return value


def _id_list(name: str, value, allow_none: bool = True) -> tuple[int, ...] | None:
    if value is None and allow_none:
        return None
    items = [value] if isinstance(value, numbers.Integral) and not isinstance(value, bool) else value
    try:
        items = list(items)
    except TypeError:
        raise GenerationError(f"{name} must be a token id or a list of token ids, got {value!r}") from None
    if not items:
        raise GenerationError(f"{name} is an empty list; give at least one token id (or None)")
    return tuple(_int_option(f"{name}[{i}]", v, 0) for i, v in enumerate(items))


def _bad_words(value) -> tuple[tuple[int, ...], ...]:
    if value is None:
        return ()
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise GenerationError(f"bad_words_ids must be a list of lists of token ids (e.g. [[5], [7, 9]]), got {value!r}")
    words = []
    for i, w in enumerate(value):
        if isinstance(w, numbers.Integral) or not isinstance(w, Sequence) or isinstance(w, (str, bytes)):
            raise GenerationError(f"bad_words_ids[{i}] must be a list of token ids, got {w!r}: bad_words_ids is a "
                                  f"list of lists (e.g. [[5], [7, 9]])")
        if len(w) == 0:
            raise GenerationError(f"bad_words_ids[{i}] is empty; every banned word needs at least one token id")
        words.append(tuple(_int_option(f"bad_words_ids[{i}][{j}]", t, 0) for j, t in enumerate(w)))
    return tuple(words)


def _stop_strings(value) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, Sequence):
        raise GenerationError(f"stop_strings must be a string or a list of strings, got {value!r}")
    out = []
    for i, s in enumerate(items):
        if not isinstance(s, str) or not s:
            raise GenerationError(f"stop_strings[{i}] must be a non-empty string, got {s!r}")
        out.append(s)
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Generation options with HF ``GenerationConfig`` defaults, validated on construction.

    The original applies transformers' defaults: greedy unless ``do_sample``; ``top_k=50`` even when only
    ``top_p`` is set. ``min_length`` counts prompt + new tokens (HF); ``eos_token_id=None`` means the
    model's EOS; ``num_return_sequences`` rows are generated per prompt (sampling only, as HF).
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 20
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0
    min_length: int = 0
    no_repeat_ngram_size: int = 0
    eos_token_id: tuple[int, ...] | None = None
    bad_words_ids: tuple[tuple[int, ...], ...] = ()
    stop_strings: tuple[str, ...] = ()
    num_return_sequences: int = 1

    def __post_init__(self):
        put = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 - frozen dataclass normalisation
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise GenerationError(f"do_sample must be True or False, got {self.do_sample!r}")
        put("do_sample", bool(self.do_sample))
        put("max_new_tokens", _int_option("max_new_tokens", self.max_new_tokens, 1))
        put("top_k", _int_option("top_k", self.top_k, 0))
        put("min_new_tokens", _int_option("min_new_tokens", self.min_new_tokens, 0))
        put("min_length", _int_option("min_length", self.min_length, 0))
        put("no_repeat_ngram_size", _int_option("no_repeat_ngram_size", self.no_repeat_ngram_size, 0, MAX_NGRAM))
        put("num_return_sequences", _int_option("num_return_sequences", self.num_return_sequences, 1,
                                                MAX_RETURN_SEQUENCES))
        for name in ("temperature", "top_p", "repetition_penalty"):
            put(name, _float_option(name, getattr(self, name)))
        if self.do_sample and not self.temperature > 0:
            raise GenerationError(f"temperature must be > 0 when sampling, got {self.temperature} "
                                  f"(use do_sample=False for greedy decoding)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise GenerationError(f"repetition_penalty must be > 0 (1.0 = off), got {self.repetition_penalty}")
        if self.num_return_sequences > 1 and not self.do_sample:
            raise GenerationError(f"num_return_sequences={self.num_return_sequences} needs do_sample=True: greedy "
                                  f"decoding would return the same sequence every time (as transformers refuses)")
        put("eos_token_id", _id_list("eos_token_id", self.eos_token_id))
        put("bad_words_ids", _bad_words(self.bad_words_ids))
        put("stop_strings", _stop_strings(self.stop_strings))

    def check_vocab(self, vocab_size: int) -> None:
        """Token ids of the options must index the model's logits."""
        ids = list(self.eos_token_id or ()) + [t for w in self.bad_words_ids for t in w]
        bad = sorted({t for t in ids if t >= vocab_size})
        if bad:
            raise GenerationError(f"token id(s) {bad[:10]} in eos_token_id/bad_words_ids are outside the model's "
                                  f"vocabulary of {vocab_size}")


# ------------------------------------------------------------------------------------ per-row arrays
class RowParams(NamedTuple):
    """The rows' options as arrays (a pytree; every field has the batch as its leading axis)."""

    do_sample: jax.Array  # (B,) bool
    temperature: jax.Array  # (B,) f32
    top_k: jax.Array  # (B,) i32, 0 = off
    top_p_cut: jax.Array  # (B,) f32: float32(1 - top_p) computed in float64, as torch compares it
    repetition_penalty: jax.Array  # (B,) f32
    min_new_tokens: jax.Array  # (B,) i32
    min_length: jax.Array  # (B,) i32 (prompt + new)
    no_repeat_ngram_size: jax.Array  # (B,) i32
    max_new_tokens: jax.Array  # (B,) i32
    eos_ids: jax.Array  # (B, E) i32, -1 = padding
    bad_words: jax.Array  # (B, W, L) i32 multi-token banned words, right-aligned, -1 = padding
    stop_strings: jax.Array  # (B, S) bool: which of the shared stop-string tables the row uses


@dataclasses.dataclass(frozen=True)
class ProcessorFlags:
    """The static structure of the processing (changing it recompiles; values never do)."""

    sort_width: int = 0  # 0: no top-k/top-p; else the number of sorted candidates (vocab size = full sort)
    top_p: bool = False
    repetition_penalty: bool = False
    max_ngram: int = 0
    sampling: bool = False


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(n, 1))))


def row_params(configs: Sequence[SamplingConfig], eos_default: Sequence[int], stop_index: dict[str, int],
               ) -> RowParams:
    """One :class:`SamplingConfig` per row → :class:`RowParams` (numpy; the engine places them)."""
    B = len(configs)
    eos = [tuple(c.eos_token_id) if c.eos_token_id is not None else tuple(eos_default) for c in configs]
    E = max(1, max(len(e) for e in eos))
    eos_arr = np.full((B, E), -1, np.int32)
    for i, e in enumerate(eos):
        eos_arr[i, :len(e)] = e
    multi = [[w for w in c.bad_words_ids if len(w) > 1 and not _is_eos_word(w, e)] for c, e in zip(configs, eos)]
    W = max(1, max(len(m) for m in multi))
    L = max([2] + [len(w) for m in multi for w in m])
    words = np.full((B, W, L), -1, np.int32)
    for i, m in enumerate(multi):
        for j, w in enumerate(m):
            words[i, j, L - len(w):] = w
    stops = np.zeros((B, max(1, len(stop_index))), bool)
    for i, c in enumerate(configs):
        for s in c.stop_strings:
            stops[i, stop_index[s]] = True
    f32 = lambda xs: np.asarray(xs, np.float32)  # noqa: E731
    i32 = lambda xs: np.asarray(xs, np.int32)  # noqa: E731
    return RowParams(
        do_sample=np.asarray([c.do_sample for c in configs], bool),
        temperature=f32([c.temperature for c in configs]),
        top_k=i32([c.top_k for c in configs]),
        top_p_cut=f32([1.0 - c.top_p for c in configs]),
        repetition_penalty=f32([c.repetition_penalty for c in configs]),
        min_new_tokens=i32([c.min_new_tokens for c in configs]),
        min_length=i32([c.min_length for c in configs]),
        no_repeat_ngram_size=i32([c.no_repeat_ngram_size for c in configs]),
        max_new_tokens=i32([c.max_new_tokens for c in configs]),
        eos_ids=eos_arr, bad_words=words, stop_strings=stops)


def _is_eos_word(word: tuple[int, ...], eos: tuple[int, ...]) -> bool:
    return len(word) == 1 and word[0] in eos


def single_token_bans(configs: Sequence[SamplingConfig], eos_default: Sequence[int], vocab_size: int) -> np.ndarray:
    """(B, V) mask of the one-token ``bad_words_ids``. As HF's ``NoBadWordsLogitsProcessor``, a word that
    is exactly an EOS id is dropped from the list (EOS stays reachable)."""
    mask = np.zeros((len(configs), vocab_size), bool)
    for i, c in enumerate(configs):
        eos = tuple(c.eos_token_id) if c.eos_token_id is not None else tuple(eos_default)
        for w in c.bad_words_ids:
            if len(w) == 1 and not _is_eos_word(w, eos):
                mask[i, w[0]] = True
    return mask


def flags_for(configs: Sequence[SamplingConfig], vocab_size: int) -> ProcessorFlags:
    """The smallest static structure that serves every row exactly."""
    sampling = [c for c in configs if c.do_sample]
    uses_k = [c for c in sampling if 0 < c.top_k < vocab_size]
    uses_p = any(c.top_p < 1.0 for c in sampling)
    width = 0
    if uses_k or uses_p:
        # top-p after top-k needs only the k best; any row without top-k needs the full sort
        width = vocab_size
        if uses_k and len(uses_k) == len(sampling):
            width = min(vocab_size, _pow2_at_least(max(c.top_k for c in uses_k)))
    return ProcessorFlags(sort_width=width, top_p=uses_p,
                          repetition_penalty=any(c.repetition_penalty != 1.0 for c in configs),
                          max_ngram=max(c.no_repeat_ngram_size for c in configs), sampling=bool(sampling))


# ------------------------------------------------------------------------------------ processors
def repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """HF ``RepetitionPenaltyLogitsProcessor`` over every id already in the sequence (prompt included):
    negative scores are multiplied by the penalty, positive ones divided. seen: (B, V) bool."""
    p = penalty[:, None]
    return jnp.where(seen, jnp.where(logits < 0, logits * p, logits / p), logits)


def no_repeat_ngram_bans(history: jax.Array, cur_len: jax.Array, size: jax.Array, max_ngram: int,
                         vocab_size: int) -> jax.Array:
    """HF ``NoRepeatNGramLogitsProcessor``: ban every token that would complete an n-gram already present.

    history: (B, T) ids (prompt then generated; positions ≥ cur_len are ignored); size: (B,) n (0 = off).
    An n-gram starting at j (0 ≤ j ≤ cur_len − n) whose first n−1 ids equal the last n−1 ids bans its
    n-th id. Returns (B, V) bool.
    """
    B, T = history.shape
    j = jnp.arange(T)[None, :]  # (1, T) candidate n-gram starts
    n = size[:, None]  # (B, 1)
    match = (n > 0) & (j <= cur_len[:, None] - n) & (cur_len[:, None] + 1 >= n)
    for k in range(max_ngram - 1):  # compare the k-th id of the candidate with the k-th id of the tail
        tail_pos = cur_len[:, None] - n + 1 + k  # (B, 1)
        tail = jnp.take_along_axis(history, jnp.clip(tail_pos, 0, T - 1), axis=1)  # (B, 1)
        cand = jnp.take_along_axis(history, jnp.clip(j + k, 0, T - 1), axis=1)  # (B, T)
        match &= (k >= n - 1) | (cand == tail)
    banned_ids = jnp.take_along_axis(history, jnp.clip(j + n - 1, 0, T - 1), axis=1)  # (B, T)
    return _scatter_mask(banned_ids, match, vocab_size)


def bad_word_bans(history: jax.Array, cur_len: jax.Array, words: jax.Array, vocab_size: int) -> jax.Array:
    """HF ``NoBadWordsLogitsProcessor`` for words of ≥ 2 tokens: ban a word's last id when the sequence
    ends with the rest of it. words: (B, W, L) right-aligned, -1 padded. Returns (B, V) bool."""
    B, W, L = words.shape
    T = history.shape[1]
    ok = words[:, :, -1] >= 0  # (B, W) a word is present
    for k in range(L - 1):  # prefix id k of the word must equal the id at cur_len - (L - 1) + k
        want = words[:, :, k]  # (B, W)
        pos = cur_len[:, None] - (L - 1) + k  # (B, 1)
        got = jnp.take_along_axis(history, jnp.clip(pos, 0, T - 1), axis=1)  # (B, 1)
        ok &= (want < 0) | ((pos >= 0) & (got == want))
    return _scatter_mask(jnp.maximum(words[:, :, -1], 0), ok, vocab_size)


def _scatter_mask(ids: jax.Array, on: jax.Array, vocab_size: int) -> jax.Array:
    """(B, K) ids and (B, K) flags → (B, V) mask with True at every flagged id."""
    B = ids.shape[0]
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], ids.shape)
    return jnp.zeros((B, vocab_size), bool).at[rows, ids].max(on)


def eos_mask(eos_ids: jax.Array, vocab_size: int) -> jax.Array:
    """(B, E) EOS ids (-1 padded) → (B, V) bool."""
    return _scatter_mask(jnp.maximum(eos_ids, 0), eos_ids >= 0, vocab_size)


def min_length_bans(cur_len: jax.Array, new_len: jax.Array, p: RowParams, vocab_size: int) -> jax.Array:
    """HF ``MinLengthLogitsProcessor`` (total length < min_length) and ``MinNewTokensLengthLogitsProcessor``
    (new tokens < min_new_tokens): EOS ids are banned until the minimum is reached."""
    early = (cur_len < p.min_length) | (new_len < p.min_new_tokens)  # (B,)
    return eos_mask(p.eos_ids, vocab_size) & early[:, None]


def warp(x: jax.Array, p: RowParams, flags: ProcessorFlags) -> jax.Array:
    """The sampling warpers in HF's order: temperature → top-k (ties at the threshold kept) → top-p (drop
    ids whose ascending cumulative probability is ≤ 1 − top_p, always keep the most likely one)."""
    x = x / p.temperature[:, None]
    if not flags.sort_width:
        return x
    B, V = x.shape
    M = flags.sort_width
    vals, idx = lax.top_k(x, M)  # (B, M) descending
    # kept as a TopK op: fused with its consumers XLA turns it into a full sort (measured in serve: 152 ms
    # per step for 4 rows instead of 2 ms); one barrier per output, as XLA's SPMD TopkDecomposer fails on
    # one barrier over the TopK tuple
    vals, idx = lax.optimization_barrier(vals), lax.optimization_barrier(idx)
    k = p.top_k
    use_k = (k > 0) & (k < V)
    kth = jnp.take_along_axis(vals, jnp.clip(k - 1, 0, M - 1)[:, None], axis=1)  # (B, 1)
    kth = jnp.where(use_k[:, None], kth, NEG_INF)
    x = jnp.where(x < kth, NEG_INF, x)
    if not flags.top_p:
        return x
    vals = jnp.where(vals < kth, NEG_INF, vals)
    asc = vals[:, ::-1]  # ascending, as HF sorts
    cum = jnp.cumsum(jax.nn.softmax(asc, axis=-1), axis=-1)
    # a row with top_p == 1 skips top-p (as HF, which builds no warper): underflowed zero-probability
    # ids would otherwise be dropped
    remove = ((cum <= p.top_p_cut[:, None]) & (p.top_p_cut > 0)[:, None]).at[:, -1].set(False)
    keep_sorted = ~remove[:, ::-1]  # back to descending order, aligned with idx
    keep = _scatter_mask(idx, keep_sorted, V)
    return jnp.where(keep, x, NEG_INF)


class StepState(NamedTuple):
    """What the processors read besides the logits (all (B, …) arrays)."""

    history: jax.Array  # (B, T) prompt then generated ids
    cur_len: jax.Array  # (B,) valid length of history (prompt + generated)
    new_len: jax.Array  # (B,) generated so far
    seen: jax.Array  # (B, V) bool ids in history (repetition penalty) or (B, 0)


def process(logits: jax.Array, banned: jax.Array, st: StepState, p: RowParams, flags: ProcessorFlags,
            ) -> tuple[jax.Array, jax.Array]:
    """(B, V) fp32 logits → (greedy scores, sampling scores) after every processor, in HF's order."""
    V = logits.shape[-1]
    x = logits
    if flags.repetition_penalty:
        x = repetition_penalty(x, st.seen, p.repetition_penalty)
    ban = banned
    if flags.max_ngram:
        ban = ban | no_repeat_ngram_bans(st.history, st.cur_len, p.no_repeat_ngram_size, flags.max_ngram, V)
    ban = ban | bad_word_bans(st.history, st.cur_len, p.bad_words, V)
    ban = ban | min_length_bans(st.cur_len, st.new_len, p, V)
    x = jnp.where(ban, NEG_INF, x)
    return x, (warp(x, p, flags) if flags.sampling else x)


def choose(greedy_scores: jax.Array, sample_scores: jax.Array, rng: jax.Array, p: RowParams,
           flags: ProcessorFlags) -> jax.Array:
    """Per row: argmax (greedy rows) or a categorical draw (sampling rows). (B,) int32.

    rng: one key for the batch, or a (B,) array of typed keys (``jax.random.key``), one per row (the
    server's per-slot streams: a row's draw then does not depend on the other rows)."""
    tok = jnp.argmax(greedy_scores, axis=-1).astype(jnp.int32)
    if flags.sampling:
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) and rng.ndim == 1:  # typed keys, one per row
            drawn = jax.vmap(lambda key, row: jax.random.categorical(key, row))(rng, sample_scores).astype(jnp.int32)
        else:
            drawn = jax.random.categorical(rng, sample_scores, axis=-1).astype(jnp.int32)
        tok = jnp.where(p.do_sample, drawn, tok)
    return tok


# ------------------------------------------------------------------------------------ stop strings
class StopTables(NamedTuple):
    """HF ``StopStringCriteria``'s per-token tables for S stop strings (padded to one length Lmax).

    end_overlap[s, t, i]: stop string s can end inside token t with i of its characters in t: either all
    of s (i = len(s), anywhere in the token) or its last i characters as the token's first i characters;
    valid[s, t, p]: with p characters of s already matched from its end, t's text (its last
    min(len(t), len(s) − p) characters) equals the part of s just before them (running off s's start is
    allowed); tok_len[t]: the token's text length; length[s]: len(s).
    """

    end_overlap: jax.Array  # (S, V, Lmax + 1) bool
    valid: jax.Array  # (S, V, Lmax + 1) bool
    tok_len: jax.Array  # (V,) i32
    length: jax.Array  # (S,) i32


def stop_tables(stop_strings: Sequence[str], token_texts: Sequence[str]) -> StopTables:
    """Build the tables from each token's text (as HF: the token decoded after a fixed prefix)."""
    S, V = max(1, len(stop_strings)), len(token_texts)
    Lmax = max([1] + [len(s) for s in stop_strings])
    end = np.zeros((S, V, Lmax + 1), bool)
    valid = np.zeros((S, V, Lmax + 1), bool)
    tok_len = np.array([len(t) for t in token_texts], np.int32)
    for si, s in enumerate(stop_strings):
        n = len(s)
        for t, text in enumerate(token_texts):
            if not text:
                continue
            for i, ch in enumerate(text):  # the stop string ends at character i of the token
                if ch == s[-1]:
                    ov = min(i + 1, n)
                    end[si, t, ov] |= text[i + 1 - ov:i + 1] == s[n - ov:]
            for pos in range(1, n):
                left = n - pos  # characters of s still to match, ending at index left
                m = min(len(text), left)
                valid[si, t, pos] = text[len(text) - m:] == s[left - m:left]
    lengths = np.array([len(s) for s in stop_strings] or [Lmax], np.int32)
    return StopTables(end, valid, tok_len, lengths)


def stop_string_hits(history: jax.Array, cur_len: jax.Array, tables: StopTables, use: jax.Array) -> jax.Array:
    """(B,) True where the sequence (ending at cur_len) completes a stop string the row uses."""
    S, V, L1 = tables.end_overlap.shape
    Lmax = L1 - 1
    T = history.shape[1]
    pos = jnp.arange(L1)[None, :]  # (1, L1)
    hit = jnp.zeros((history.shape[0],), bool)
    last = jnp.take_along_axis(history, jnp.clip(cur_len - 1, 0, T - 1)[:, None], axis=1)[:, 0]  # (B,)
    for s in range(S):
        n = tables.length[s]
        reach = tables.end_overlap[s][last] & (pos <= n)  # (B, L1): matched-so-far counts
        done = jnp.take_along_axis(reach, jnp.broadcast_to(n, (reach.shape[0], 1)), axis=1)[:, 0]
        for back in range(1, Lmax):  # earlier tokens, walking backwards
            idx = cur_len - 1 - back
            tok = jnp.take_along_axis(history, jnp.clip(idx, 0, T - 1)[:, None], axis=1)[:, 0]  # (B,)
            ok = reach & tables.valid[s][tok] & (idx >= 0)[:, None] & (pos > 0) & (pos < n)
            step = tables.tok_len[tok][:, None]  # (B, 1)
            done |= jnp.any(ok & (pos + step >= n), axis=1)
            src = pos - step  # new count q comes from q - len(tok)
            reach = jnp.take_along_axis(ok, jnp.clip(src, 0, Lmax), axis=1) & (src >= 0)
        hit |= done & use[:, s]
    return hit


__all__ = ["GenerationError", "SamplingConfig", "RowParams", "ProcessorFlags", "StepState", "StopTables",
           "row_params", "single_token_bans", "flags_for", "repetition_penalty", "no_repeat_ngram_bans",
           "bad_word_bans", "eos_mask", "min_length_bans", "warp", "process", "choose", "stop_tables",
           "stop_string_hits"]
