"""The serving engine: a fixed number of decode slots, continuous batching, and a prefix cache.

* **Slots, in tiers.** The KV cache is the model's own cache (``models.llama.init_cache``): one contiguous
  row of ``max_len`` positions per slot, or with ``short_slots`` two tiers (``Tier``), ``slots -
  short_slots`` rows of ``max_len`` and ``short_slots`` rows of ``short_len``, one cache each. A request goes
  to the shortest free slot that holds its prompt + max_tokens (``_admit``); a long one that finds no long
  slot free waits at its place in the queue while later short ones start. Gathered calls stay within one
  tier; the in-place step runs on both at once (``models.llama.tiered_cache``), each read over its own
  length: at 135 M, 4 rows past a 1,000-token prefix beside 12 short rows, 16 × 1,152 positions took
  156 ms per step and 4 × 1,152 + 12 × 256 104 ms (``bench/serve_bench.py --parts layout``).
  A gathered call gathers the rows it works on (a power-of-two bucket of slot indices; padding rows index
  past the slots and are never written) over the first ``window`` positions only, runs the model on that
  small cache and writes back what it wrote.
  A finished or cancelled slot is free at the next scheduler iteration; the lowest free slot is used first.
* **Batched, chunked prefill.** Each scheduler iteration prefills a chunk (≤ ``prefill_chunk`` tokens) of
  every admitted prompt, up to ``prefill_budget`` padded tokens (rows bucket × length). A call batches pieces
  of about the same length and the same attention window (a short prompt never reads a long one's window):
  ``_prefill_batch`` weighs padding against one more call. A long few-shot prompt therefore stalls the
  decoding slots for one chunk at a time, not for its whole prefill.
* **Decode: in place, or grouped by window.** ONE compiled decode step advances a group of slots, each at its
  own position, with its own generation options, ban mask (output modality) and token history. Two forms,
  chosen per step by what they read (``_groups``):
  - *gathered* (``_decode_step``): the decoding slots are split into groups (sorted by position, the split
    minimising the cost: the weights once per call, the KV of rows bucket × window, copied out first, per
    call), so a step with 3 short live slots runs a batch of 4 over a 128-position window;
  - *in place* (``_decode_all``): every slot, free and prefilling ones included, on the cache where it lies,
    over all its tier's positions: no copy at all (XLA:CPU's dots read a whole cache leaf in place at
    ~22 GB/s, while a gathered window's copy ran at 1.3-4.6 GB/s: ``bench/kv_read_bench.py``). At 135 M
    with 16 slots × 1,152, a step of 12 short rows and 4 rows past a 1,000-token few-shot prefix took
    249 ms gathered (two calls) and 120 ms in place; 16 short rows 82 ms gathered (at the 128 window) and
    138 ms in place (``bench/serve_bench.py --parts layout``, bench/RESULTS.md session 7).
* **Sampling: the offline processors.** Logits go through ``infer/processors.py`` (HF's processors and
  warpers with per-row (B,) parameters: the same code as ``infer.engine.generate``), so every option of a
  :class:`SamplingConfig` (repetition penalty, no-repeat n-grams, bad words, min lengths, temperature, top-k,
  top-p) works per slot and changing a value never recompiles. Only the static structure
  (:class:`ProcessorFlags`) is chosen from the running slots, from a handful of variants (greedy only; sampling
  over the top ``SORT_WIDTH`` candidates; sampling over the full vocabulary; with no-repeat n-grams), each
  compiled once. A sampling slot draws with its own key ``fold_in(key(seed), n)`` at its n-th token, so its
  stream does not depend on what runs beside it.
* **Exactness.** A row only ever reads cache positions it wrote itself (a query at position p attends to
  positions ≤ p, and every position ≤ p is written by this request's prefill or decode before it is
  read), so what other slots hold or do cannot change a row's result: greedy output equals the offline
  ``infer.engine.generate`` of the same prompt (tested with requests arriving at random steps).
* **Prefix cache.** After a prefill the prompt's KV, in whole blocks of ``block`` tokens, is kept as a
  read-only device copy keyed by a hash chain over the blocks (``PrefixCache``). A later prompt that starts
  with cached blocks gets them copied into its row and prefills only the rest. Least-recently-used
  entries are evicted beyond ``prefix_cache_mb``.
* **Why contiguous rows + a prefix copy, not a paged cache.** The measured target is met with it: a request
  sharing a cached 1,000-token prefix reaches its first token in 8% of the cold time (135 M parameters,
  ``bench/serve_bench.py --parts prefix``; target ≤ 20%). The copy is one write of the prefix's KV per
  request (12 layers × 2 × 1,000 × 768 fp32 = 74 MB at 135 M), against a page-table gather of the whole
  cache in every decode step that paging costs without a custom attention kernel (XLA on CPU has none);
  under the load of the shared machine the two did not separate in our measurement (bench/RESULTS.md), so
  the choice rests on exactness and simplicity: a row is the model's own cache layout, read through the
  public ``apply``/``init_cache`` API. What paging would add is memory and reads: rows reserve their
  tier's length whatever the request needs, and the in-place step reads all of it; the short tier takes
  back most of both for a mix of short and long requests.
* **Attention window.** A call attends over the first ``window`` positions of its rows only: the smallest
  power of two (≥ ``MIN_WINDOW``) above its furthest position, each window one compile. At 135 M parameters,
  16 slots × 1,152 positions, a step over all positions took 2,972 ms and over a 128-position window 656 ms
  (load 13.7, ``bench/serve_bench.py --parts layout``): the attention read of the cache, not the weights,
  dominates — hence the window, and the grouping above.
* **Compiled programs.** Every call shape is bucketed (rows, prefill length, attention window; two prefill
  windows), so the set of programs is finite; ``precompile`` (``serve --precompile``) builds all of them
  up front (156 at 135 M with 16 slots × 1,152: 7 minutes on 2 CPU cores), otherwise a request that needs a
  new shape waits for its compile (1.8-7.4 s per prefill program at 135 M here).
* **Scheduling.** First come, first served: before each decode step every free slot is filled from the queue
  and one budget of prefill runs (the lowest time to first token; the decoding slots wait one budget).

The engine runs in one background thread (``start``); ``step`` is one scheduler iteration, so tests can
drive it deterministically. Requests report through callbacks, called on the engine thread.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import sys
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spiritlm_jax.config import LlamaConfig
from spiritlm_jax.buckets import bucket_length
from spiritlm_jax.infer import processors
from spiritlm_jax.infer.processors import GenerationError, ProcessorFlags, SamplingConfig, StepState
from spiritlm_jax.models.llama import cache_logical_axes, init_cache, tiered_cache
from spiritlm_jax.models.quantization import llama_module

TOP_LOGPROBS = 5  # the most OpenAI's completions API returns per position
SORT_WIDTH = 64  # top-k/top-p over this many candidates when every sampling slot has 1 ≤ top_k ≤ 64 (HF: 50)
GREEDY = SamplingConfig()
MIN_WINDOW = 128  # the smallest attention window of a decode step (positions)
PREFILL_CHUNK = 256  # a prompt is prefilled at most this many tokens per scheduler iteration
PREFILL_BUDGET = 1024  # padded tokens (rows bucket × length bucket) of one batched prefill call
# A gathered decode call copies its rows' KV windows out of the slots before attending: per byte, that cost
# what GATHER_COST bytes read in place by the attention dots did (bench/serve_bench.py --parts layout: 4.7
# with malloc huge pages, serve's default, and 16 without; 5 keeps the in-place call for mixed long rows).
GATHER_COST = 5
PREFILL_WINDOW = 256  # a prefill call attends over these positions while its rows end below them, else max_len
# A prefill call's length is ``bucket_length(piece, PREFILL_BUCKET)``: multiples of 32 up to 256 (the one
# bucketing rule, spiritlm_jax/buckets.py, at base 32: under 32 padded tokens per row, 8 lengths to compile).
PREFILL_BUCKET = 32
# What one prefill call costs beyond its padded tokens, in tokens of compute (the weights read once and the
# dispatch); the batch chooser (``Engine._prefill_batch``) trades padding rows against extra calls with it.
# Measured at 135 M (bench/serve_bench.py --parts prefill): 38.6 ms per call + 1.09 ms per padded token
# (36 tokens) without malloc huge pages, 31.5 + 1.16 (27 tokens) with them.
PREFILL_CALL_COST = 36
SHORT_LEN = 256  # positions of a short slot (``short_slots``): a text prompt of ≤ 200 tokens and its answer


class ServeError(ValueError):
    """A request the engine cannot run (too long, bad ids, bad parameters); the message says how to fix it."""


# ------------------------------------------------------------------------------------------ requests
@dataclasses.dataclass(eq=False)
class Request:
    """One generation. ``on_token(id, logprob, top_ids, top_logprobs) -> bool`` is called per new token
    (True stops the request: a stop string was hit); ``on_finish(reason, error)`` once at the end, with
    reason "stop" (EOS or stop string), "length" (max_tokens), "cancelled" or "error".

    ``sampling`` is the offline :class:`SamplingConfig` (validated where it is built); its
    ``max_new_tokens`` is replaced by ``max_tokens``, and its ``stop_strings`` are the server's business
    (text-level, host side). ``seed`` picks the slot's random stream."""

    prompt: list[int]
    max_tokens: int
    sampling: SamplingConfig = GREEDY
    banned: np.ndarray | None = None  # (V,) bool
    seed: int = 0
    on_token: Callable[..., bool] | None = None
    on_finish: Callable[[str, Exception | None], None] | None = None
    # filled in by the engine
    submitted: float = dataclasses.field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    first_audio_at: float | None = None  # set by the server when audio leaves
    cached_tokens: int = 0
    n_generated: int = 0
    finish_reason: str | None = None
    cancelled: bool = False
    stop_requested: bool = False

    def cancel(self) -> None:
        """End the request (client gone): its slot frees at the next engine step; reason "cancelled"."""
        self.cancelled = True

    def stop(self) -> None:
        """End the request because its output is complete (a stop string): reason "stop"."""
        self.stop_requested = self.cancelled = True


# ------------------------------------------------------------------------------------------ cache layout
def _cache_axes(cfg: LlamaConfig) -> tuple[int, int]:
    """(batch axis, length axis) of every cache leaf, read from the model's logical cache axes."""
    names = cache_logical_axes(cfg)
    leaf = names["k"] if isinstance(names, dict) else names[0]["k"]
    return leaf.index("batch"), leaf.index("cache_length")


class PrefixCache:
    """Read-only KV copies of prompt prefixes, in whole blocks, found by a hash chain over the blocks.

    ``lookup(ids)`` → (entry, n_tokens) for the longest cached run of leading blocks; an entry's first j
    blocks are the KV of exactly those tokens (causal attention), so one entry serves every prompt that
    shares any number of its leading blocks. LRU eviction keeps the total under ``budget_bytes``."""

    def __init__(self, block: int, budget_bytes: int):
        self.block = int(block)
        self.budget = int(budget_bytes)
        self.entries: collections.OrderedDict[int, dict] = collections.OrderedDict()
        self.by_hash: dict[bytes, tuple[int, int]] = {}  # chain hash of blocks 0..j → (entry id, j + 1)
        self.nbytes = 0
        self._next = 0
        self.lookups = self.hits = self.hit_tokens = self.prompt_tokens = 0

    def _chain(self, ids: list[int], n_blocks: int) -> list[bytes]:
        out, h = [], b""
        arr = np.asarray(ids, np.int32)
        for j in range(n_blocks):
            h = hashlib.blake2b(h + arr[j * self.block:(j + 1) * self.block].tobytes(), digest_size=16).digest()
            out.append(h)
        return out

    def lookup(self, ids: list[int]) -> tuple[dict | None, int]:
        """The longest cached prefix, at most ``len(ids) - 1`` tokens (the last one must be computed)."""
        self.lookups += 1
        self.prompt_tokens += len(ids)
        best, n = None, 0
        for h in self._chain(ids, (len(ids) - 1) // self.block):
            hit = self.by_hash.get(h)
            if hit is None:
                break
            best, n = hit
        if best is None:
            return None, 0
        self.entries.move_to_end(best)
        self.hits += 1
        self.hit_tokens += n * self.block
        return self.entries[best], n * self.block

    def store(self, ids: list[int], matched_tokens: int, extract: Callable[[int], object], length_for) -> None:
        """Keep the prompt's whole blocks if they extend what is cached; ``extract(L)`` gives its KV tree
        of static length ``length_for(n_tokens)``."""
        n_blocks = len(ids) // self.block
        if n_blocks * self.block <= matched_tokens or self.budget <= 0:
            return
        tree = extract(length_for(n_blocks * self.block))
        size = sum(x.nbytes for x in jax.tree.leaves(tree))
        if size > self.budget:
            return
        while self.entries and self.nbytes + size > self.budget:
            self._evict()
        eid, self._next = self._next, self._next + 1
        hashes = self._chain(ids, n_blocks)
        self.entries[eid] = {"tree": tree, "tokens": n_blocks * self.block, "hashes": hashes, "nbytes": size}
        self.nbytes += size
        for j, h in enumerate(hashes):
            self.by_hash[h] = (eid, j + 1)

    def _evict(self) -> None:
        eid, e = self.entries.popitem(last=False)
        self.nbytes -= e["nbytes"]
        for j, h in enumerate(e["hashes"]):
            if self.by_hash.get(h, (None,))[0] != eid:
                continue
            # another entry may hold the same leading blocks: point the hash at it instead
            other = next((k for k, o in self.entries.items() if len(o["hashes"]) > j and o["hashes"][j] == h), None)
            if other is None:
                del self.by_hash[h]
            else:
                self.by_hash[h] = (other, j + 1)



# ------------------------------------------------------------------------------------------ compiled steps
# Module-level jits with the config static: every Engine of the same model and shapes shares the programs.
def _row_start(c, bax: int, len_ax: int, row, position):
    at = [jnp.int32(0)] * c.ndim
    at[bax], at[len_ax] = row, position
    return at


def _gather_rows(cache, idx, window: int, cfg: LlamaConfig):
    """Rows ``idx`` (R,) of the cache, positions [0, window): a batch-R cache the model runs on. One
    contiguous slice per row (XLA:CPU's gather of whole rows measured several times slower); a padding
    row (index ≥ slots) reads the last slot and is never written back."""
    bax, len_ax = _cache_axes(cfg)

    def leaf(c):
        safe = jnp.minimum(idx, c.shape[bax] - 1)
        sizes = list(c.shape)
        sizes[bax], sizes[len_ax] = 1, window
        rows = [lax.dynamic_slice(c, _row_start(c, bax, len_ax, safe[r], 0), sizes) for r in range(idx.shape[0])]
        return jnp.concatenate(rows, axis=bax)

    return jax.tree.map(leaf, cache)


def _write_rows(cache, view, idx, start, length: int, cfg: LlamaConfig, logits):
    """Write back what a call wrote: positions [start[r], start[r] + length) of each gathered row r into slot
    idx[r] (in place: one small update per row). A padding row, and a row whose ``logits`` (R, …) are not all
    finite (its request ends with an error; its KV is never read again), writes back what its slot holds.

    That second condition is also what keeps the update in place. Attention reads the cache through
    slices fused into its own kernels, and the write-back otherwise depends on none of them, so XLA's copy
    insertion cannot order the reads before the in-place write and copies the WHOLE cache leaf instead:
    measured on the 135 M model with 16 slots, 24 copies of f32[16,12,1152,64] (1.36 GB) per decode step,
    and a one-row step at 607 ms instead of 52 ms. Gating the write on the logits makes every layer's update
    come after every layer's attention (``optimization_barrier`` cannot do this: XLA:CPU drops barriers
    before fusion). tests/test_serve_engine.py checks the compiled steps hold no copy of a cache leaf."""
    bax, len_ax = _cache_axes(cfg)
    ok = jnp.all(jnp.isfinite(logits.reshape(logits.shape[0], -1)), axis=-1)  # (R,)

    def leaf(c, v):
        sizes = list(c.shape)
        sizes[bax], sizes[len_ax] = 1, length
        for r in range(idx.shape[0]):
            row = jnp.minimum(idx[r], c.shape[bax] - 1)
            new = lax.dynamic_slice(v, _row_start(v, bax, len_ax, jnp.int32(r), start[r]), sizes)
            at = _row_start(c, bax, len_ax, row, start[r])
            old = lax.dynamic_slice(c, at, sizes)
            c = lax.dynamic_update_slice(c, jnp.where((idx[r] < c.shape[bax]) & ok[r], new, old), at)
        return c

    return jax.tree.map(leaf, cache, view)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(0,))
def _copy_prefix(cache, slot, prefix, *, cfg: LlamaConfig):
    """Copy a cached prefix's KV (batch 1, its own static length) into the first positions of row ``slot``; an
    entry longer than the row (from a longer slot: only a shorter match of it fits here) is cut to the row."""
    bax, len_ax = _cache_axes(cfg)
    start = [0] * 5

    def put(c, p):
        at = list(start[:c.ndim])
        at[bax] = slot
        p = lax.slice_in_dim(p, 0, min(p.shape[len_ax], c.shape[len_ax]), axis=len_ax)
        return lax.dynamic_update_slice(c, p.astype(c.dtype), tuple(at))

    return jax.tree.map(put, cache, prefix)


@functools.partial(jax.jit, static_argnames=("cfg", "window"), donate_argnums=(1,))
def _prefill(params, cache, idx, tokens, start, last, *, cfg: LlamaConfig, window: int):
    """Prefill ``tokens`` (R, P) of R requests at once: row r's tokens go to positions start[r].. of slot
    idx[r] (R,). Attention reads positions [0, window) (every row's start + P ≤ window). Returns the logits
    at index ``last[r]`` of each row (R, V) and the cache."""
    view = _gather_rows(cache, idx, window, cfg)  # (R, window, …) per leaf
    positions = start[:, None] + jnp.arange(tokens.shape[1], dtype=jnp.int32)[None]  # (R, P)
    logits, view = llama_module(cfg).apply({"params": params}, tokens, positions=positions, cache=view, logits_at=last)
    return logits[:, 0], _write_rows(cache, view, idx, start, tokens.shape[1], cfg, logits)


def _top_k(x, k):
    """``lax.top_k`` kept as a TopK op: fused with its consumers XLA turns it into a full sort (measured:
    152 ms per step for 4 rows instead of 2 ms). One barrier per output (a single barrier over both is
    folded onto the TopK tuple, which XLA's SPMD TopkDecomposer cannot handle)."""
    vals, ids = lax.top_k(x, k)
    return lax.optimization_barrier(vals), lax.optimization_barrier(ids)


def _choose(logits, banned, view: StepState, rows, seeds, counters, flags: ProcessorFlags):
    """(B, V) logits → the next token of every row through the offline processors.

    Returns (token (B,), its logprob (B,), top ids (B, 5), top logprobs (B, 5), failed (B,)); the
    log-probabilities are of the processed distribution the token came from (greedy rows: after the
    bans and penalties; sampling rows: after the warpers too). ``failed``: non-finite logits or bans that
    leave no token (the request ends with an error instead of emitting garbage)."""
    greedy_scores, sample_scores = processors.process(logits, banned, view, rows, flags)
    keys = jax.vmap(lambda s, c: jax.random.fold_in(jax.random.key(s), c))(seeds, counters)  # one stream per row
    tok = processors.choose(greedy_scores, sample_scores, keys, rows, flags)
    scores = jnp.where(rows.do_sample[:, None], sample_scores, greedy_scores) if flags.sampling else greedy_scores
    logp = jax.nn.log_softmax(scores, axis=-1)  # (B, V)
    chosen = jnp.take_along_axis(logp, tok[:, None], axis=-1)[:, 0]
    top_lp, top_ids = _top_k(logp, TOP_LOGPROBS)
    failed = ~jnp.all(jnp.isfinite(logits), axis=-1) | ~jnp.any(greedy_scores > -jnp.inf, axis=-1)
    return tok, chosen, top_ids.astype(jnp.int32), top_lp, failed


def _mark(seen, history, rows_idx, tok, at):
    """Record the new tokens: ``seen`` (B, V) for the repetition penalty, ``history`` (B, T) at index ``at``."""
    seen = seen.at[rows_idx, tok].set(True)
    history = history.at[rows_idx, at].set(tok, mode="drop")
    return seen, history


@functools.partial(jax.jit, static_argnames=("flags",), donate_argnums=(1, 2, 3))
def _first_token(logits, banned, seen, history, slot, banned_row, seen_row, history_row, prompt_len, rows, seed,
                 *, flags: ProcessorFlags):
    """A new slot's first token from its prefill logits (1, V); sets the slot's ban, seen and history rows."""
    one = jnp.zeros((1,), jnp.int32)
    view = StepState(history=history_row[None], cur_len=prompt_len[None], new_len=one, seen=seen_row[None])
    tok, lp, top_ids, top_lp, failed = _choose(logits, banned_row[None], view, rows, seed[None], one, flags)
    seen_row, history_row = (x[0] for x in _mark(seen_row[None], history_row[None], one, tok, prompt_len[None]))
    put = lambda full, row: lax.dynamic_update_slice_in_dim(full, row[None], slot, axis=0)  # noqa: E731
    return tok, lp, top_ids, top_lp, failed, put(banned, banned_row), put(seen, seen_row), put(history, history_row)


@functools.partial(jax.jit, static_argnames=("cfg", "flags", "window"), donate_argnums=(1, 3, 4))
def _decode_step(params, cache, banned, seen, history, idx, slot, token, position, counter, rows, seeds, *,
                 cfg: LlamaConfig, flags: ProcessorFlags, window: int):
    """ONE step for the rows ``idx`` (R,) of one tier's cache, slots ``slot`` (R,) of the per-slot state:
    token (R,) at position (R,) → next token per row (at position + 1).

    R is a bucket of the live slots (padding rows: index ≥ the tier's rows and slot ≥ slots, never written),
    and attention reads only the first ``window`` positions of those rows (each position is below it), so a
    step costs what its rows need, not what ``slots`` × ``max_len`` reserves."""
    view = _gather_rows(cache, idx, window, cfg)
    logits, view = llama_module(cfg).apply({"params": params}, token[:, None], positions=position[:, None], cache=view)
    cache = _write_rows(cache, view, idx, position, 1, cfg, logits)
    take = lambda x: jnp.take(x, slot, axis=0, mode="clip")  # noqa: E731  (R, …) rows of a per-slot array
    seen_r, history_r = take(seen), take(history)
    state = StepState(history=history_r, cur_len=position + 1, new_len=counter, seen=seen_r)
    tok, lp, top_ids, top_lp, failed = _choose(logits[:, 0], take(banned), state, rows, seeds, counter, flags)
    seen_r, history_r = _mark(seen_r, history_r, jnp.arange(tok.shape[0]), tok, position + 1)
    seen = seen.at[slot].set(seen_r, mode="drop")
    history = history.at[slot].set(history_r, mode="drop")
    return tok, lp, top_ids, top_lp, failed, cache, seen, history


@functools.partial(jax.jit, static_argnames=("cfg", "flags"), donate_argnums=(1, 3, 4))
def _decode_all(params, cache, banned, seen, history, live, token, position, counter, rows, seeds, *,
                cfg: LlamaConfig, flags: ProcessorFlags):
    """ONE step of EVERY slot on the cache where it lies: no gather, no write-back; attention reads every
    position of every slot's tier in place (the model's own cached path, as offline ``generate``).

    ``cache``: the engine's tiers (``tiered_cache``; one tier is a plain cache), rows in slot order, each
    tier read over its own length. ``live`` (slots,) marks the decoding slots; the engine feeds every other
    slot (free or prefilling) the pad token at its tier's last position, so its one write lands where no
    request reads before writing it (a request writes position p before a query at p reads it, and a request
    goes only to a slot that holds its prompt + max_tokens), and its seen/history rows are kept. Its token
    is discarded."""
    logits, cache = llama_module(cfg).apply({"params": params}, token[:, None], positions=position[:, None], cache=cache)
    state = StepState(history=history, cur_len=position + 1, new_len=counter, seen=seen)
    tok, lp, top_ids, top_lp, failed = _choose(logits[:, 0], banned, state, rows, seeds, counter, flags)
    seen_new, history_new = _mark(seen, history, jnp.arange(tok.shape[0]), tok, position + 1)
    seen = jnp.where(live[:, None], seen_new, seen)
    history = jnp.where(live[:, None], history_new, history)
    return tok, lp, top_ids, top_lp, failed, cache, seen, history


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnums=(0,))
def _clear_positions(cache, slots, positions, *, cfg: LlamaConfig):
    """Zero position ``positions[r]`` of slot ``slots[r]`` in every cache leaf."""
    bax, len_ax = _cache_axes(cfg)

    def leaf(c):
        sizes = list(c.shape)
        sizes[bax], sizes[len_ax] = 1, 1
        for r in range(slots.shape[0]):
            c = lax.dynamic_update_slice(c, jnp.zeros(sizes, c.dtype), _row_start(c, bax, len_ax, slots[r], positions[r]))
        return c

    return jax.tree.map(leaf, cache)


@functools.partial(jax.jit, static_argnames=("cfg", "length"))
def _extract(cache, slot, *, cfg: LlamaConfig, length: int):
    """Row ``slot``'s KV at positions [0, length) (batch 1): a prefix-cache entry."""
    bax, len_ax = _cache_axes(cfg)
    return jax.tree.map(lambda c: lax.dynamic_slice_in_dim(
        lax.dynamic_slice_in_dim(c, slot, 1, axis=bax), 0, length, axis=len_ax), cache)


# ------------------------------------------------------------------------------------------ the engine
class Profile:
    """Where the engine's time goes (read by ``bench/serve_bench.py``): prefill vs decode wall time, the
    decode steps by batch rows, live rows and window, and the compiled programs (a new one = a compile)."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.prefill_calls = self.prefill_rows = self.prefill_padded = self.prefill_tokens = 0
        self.prefill_s = self.decode_s = self.decode_dispatch_s = self.decode_sync_s = 0.0
        self.decode_steps = self.live_rows = 0
        self.steps_by_shape: collections.Counter = collections.Counter()  # ((rows bucket, live, window), …) → steps
        self.prefill_shapes: collections.Counter = collections.Counter()  # (rows, padded tokens, window) → calls
        self.programs0 = self.programs()

    @staticmethod
    def programs() -> int:
        return sum(f._cache_size() for f in (_prefill, _copy_prefix, _first_token, _decode_step, _decode_all,
                                             _clear_positions, _extract))

    def prefill(self, seconds: float, rows: int, padded: int, tokens: int, window: int) -> None:
        self.prefill_shapes[(rows, padded, window)] += 1
        self.prefill_calls += 1
        self.prefill_rows += rows
        self.prefill_padded += padded
        self.prefill_tokens += tokens
        self.prefill_s += seconds

    def decode(self, dispatch: float, sync: float, shapes: list[tuple[int, int, int]]) -> None:
        """One scheduler decode step: its calls' (rows bucket, live rows, window)."""
        self.decode_steps += 1
        self.decode_dispatch_s += dispatch
        self.decode_sync_s += sync
        self.decode_s += dispatch + sync
        self.live_rows += sum(n for _, n, _ in shapes)
        self.steps_by_shape[tuple(shapes)] += 1

    def summary(self) -> dict:
        return {"prefill_calls": self.prefill_calls, "prefill_rows": self.prefill_rows,
                "prefill_tokens": self.prefill_tokens, "prefill_padded_tokens": self.prefill_padded,
                "prefill_s": round(self.prefill_s, 3), "decode_steps": self.decode_steps,
                "decode_s": round(self.decode_s, 3), "decode_dispatch_s": round(self.decode_dispatch_s, 3),
                "decode_sync_s": round(self.decode_sync_s, 3),
                "mean_live_rows": round(self.live_rows / max(1, self.decode_steps), 2),
                "decode_steps_by_calls": {" + ".join(f"{n}/{b}@{w}" for b, n, w in k): c
                                          for k, c in sorted(self.steps_by_shape.items())},
                "prefill_calls_by_rows_padded_window": {f"{r}r {p}t @{w}": c
                                                        for (r, p, w), c in sorted(self.prefill_shapes.items())},
                "new_programs": self.programs() - self.programs0}


@dataclasses.dataclass
class _Slot:
    request: Request | None = None
    generated: list[int] = dataclasses.field(default_factory=list)
    filled: int | None = None  # prompt tokens already in the cache while prefilling; None once decoding
    cached: int = 0  # of which came from the prefix cache
    order: int = 0  # admission order (prefill is first come, first served)


@dataclasses.dataclass(frozen=True)
class Tier:
    """A run of slots of one length. The engine's KV cache is one model cache per tier (slots ``first`` …
    ``first + slots - 1``, ``length`` positions each); a decode step reads each tier over its own length."""

    first: int
    slots: int
    length: int


def _pow2(n: int) -> int:
    """The batch-rows bucket of a compiled call: 1, 2, 4, 8, …"""
    return 1 << (int(n) - 1).bit_length()


class Engine:
    """Continuous batching over ``slots`` decode rows of ``max_len`` positions each, or, with ``short_slots``,
    over ``slots - short_slots`` rows of ``max_len`` and ``short_slots`` rows of ``short_len`` positions (a
    request goes to the shortest free slot that holds its prompt + max_tokens)."""

    def __init__(self, cfg: LlamaConfig, params, *, slots: int = 8, max_len: int | None = None,
                 eos_id: int | None = None, pad_id: int = 0, mesh=None, prefix_block: int = 16,
                 prefix_cache_mb: float = 256.0, prefill_chunk: int = PREFILL_CHUNK,
                 prefill_budget: int = PREFILL_BUDGET, dense_decode: bool = True, short_slots: int = 0,
                 short_len: int = SHORT_LEN):
        if slots < 1:
            raise ServeError(f"slots must be ≥ 1, got {slots}")
        self.cfg, self.params, self.mesh = cfg, params, mesh
        self.slots = int(slots)
        self.max_len = int(min(max_len or cfg.max_position_embeddings, cfg.max_position_embeddings))
        if self.max_len < 2:
            raise ServeError(f"max_len must be ≥ 2, got {self.max_len}")
        self.tiers = _tiers(self.slots, self.max_len, short_slots, short_len)
        self._slot_tier = [t for t, tier in enumerate(self.tiers) for _ in range(tier.slots)]
        eos = cfg.eos_token_id if eos_id is None else eos_id
        self.eos_id = -1 if eos is None else int(eos)
        self.pad_id = int(pad_id)
        self.vocab = cfg.vocab_size
        self.prefix = PrefixCache(prefix_block, int(prefix_cache_mb * 2 ** 20))
        if prefill_chunk < 16 or prefill_budget < prefill_chunk:
            raise ServeError(f"prefill_chunk must be ≥ 16 and prefill_budget ≥ prefill_chunk, got {prefill_chunk} "
                             f"and {prefill_budget}")
        self.prefill_chunk, self.prefill_budget = int(prefill_chunk), int(prefill_budget)
        self._chunk_cap = -(-self.prefill_chunk // 16) * 16  # the longest prefill call: the chunk, to a multiple of 16
        self.prefill_call_cost = PREFILL_CALL_COST  # tokens; what ``_prefill_batch`` weighs padding against
        self.dense_decode = bool(dense_decode)  # allow the in-place step over every slot (see ``_groups``)
        self._build_state()
        # the decode grouping's cost model (bytes a step reads): the weights once per call, the KV per row-position
        self._weight_bytes = sum(x.nbytes for x in jax.tree.leaves(params))
        self._kv_bytes = (sum(x.nbytes for x in jax.tree.leaves(self.caches))
                          // sum(tier.slots * tier.length for tier in self.tiers))
        self._admitted = 0
        self._queue: collections.deque[Request] = collections.deque()
        self._slots = [_Slot() for _ in range(self.slots)]
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._thread_exit = False
        self.steps = 0
        self.tokens_total = 0
        self.prefill_tokens_total = 0
        self.finished = collections.Counter()
        self.profile = Profile()
        self.observer = None  # gets first_token(req) and finished(req, reason) on the engine thread (metrics)

    # ---------------------------------------------------------------------------------- device state
    def _shard(self, x, *names):
        if self.mesh is None:
            return x
        from spiritlm_jax import sharding

        return sharding.put(x, self.mesh, *names)

    def _build_state(self):
        B, V = self.slots, self.vocab
        self.caches = [self._tier_cache(tier) for tier in self.tiers]
        self.banned = self._shard(jnp.zeros((B, V), bool), "batch", None)
        self.seen = self._shard(jnp.zeros((B, V), bool), "batch", None)
        self.history = self._shard(jnp.full((B, self.max_len), self.pad_id, jnp.int32), "batch", None)
        # host side, per slot: the token to feed, its position, tokens generated, seed, options
        self.host = {"token": np.zeros(B, np.int32), "position": np.zeros(B, np.int32),
                     "counter": np.zeros(B, np.int32), "seed": np.zeros(B, np.uint32)}
        self.configs: list[SamplingConfig] = [GREEDY] * B  # a free slot is a neutral greedy row
        self._rows: dict = {}  # slot index tuple → the configs as processors.RowParams (device); cleared on change

    def _tier_cache(self, tier: Tier):
        cache = init_cache(self.cfg, tier.slots, tier.length)
        if self.mesh is None:
            return cache
        from spiritlm_jax import sharding

        return jax.tree.map(lambda c, names: sharding.put(c, self.mesh, *names), cache, cache_logical_axes(self.cfg))

    def tier_of(self, i: int) -> tuple[int, Tier]:
        """(tier index, tier) of slot ``i``; its row in the tier's cache is ``i - tier.first``."""
        t = self._slot_tier[i]
        return t, self.tiers[t]

    def slot_length(self, i: int) -> int:
        """The positions slot ``i`` holds (prompt + max_tokens of the request in it)."""
        return self.tier_of(i)[1].length

    def _dense_cache(self):
        """Every tier as the one cache the in-place step runs on."""
        return self.caches[0] if len(self.caches) == 1 else tiered_cache(self.caches)

    def _set_dense_cache(self, cache) -> None:
        self.caches = [cache] if len(self.caches) == 1 else list(cache["tiers"])

    # ---------------------------------------------------------------------------------- options per slot
    def _eos_default(self) -> list[int]:
        return [] if self.eos_id < 0 else [self.eos_id]

    def _row_params(self, configs: list[SamplingConfig]):
        rows = processors.row_params(configs, self._eos_default(), {})
        return jax.tree.map(lambda x: self._shard(jnp.asarray(x), "batch", *([None] * (x.ndim - 1))), rows)

    def flags(self, configs: list[SamplingConfig]) -> ProcessorFlags:
        """The static processing structure for these rows, from a few variants (each compiled once): the
        repetition penalty is always compiled in (1.0 is an exact no-op); top-k/top-p run over
        ``SORT_WIDTH`` candidates when every sampling row allows it, else over the full vocabulary."""
        f = processors.flags_for(configs, self.vocab)
        width = 0 if not f.sort_width else (min(SORT_WIDTH, self.vocab) if f.sort_width <= SORT_WIDTH else self.vocab)
        ngram = 0 if not f.max_ngram else min(processors.MAX_NGRAM, 1 << (f.max_ngram - 1).bit_length())
        return ProcessorFlags(sort_width=width, top_p=bool(width), repetition_penalty=True, max_ngram=ngram,
                              sampling=f.sampling)

    def window(self, last_position: int, length: int | None = None) -> int:
        """The cache positions a decode step attends over when the furthest row is at ``last_position``:
        powers of two from ``MIN_WINDOW`` up to the slots' ``length`` (default ``max_len``; few buckets: each
        is one compile of the step)."""
        return min(length or self.max_len, max(MIN_WINDOW, 1 << int(last_position).bit_length()))

    def prefill_window(self, last_position: int, length: int | None = None) -> int:
        """The cache positions a prefill call attends over: ``PREFILL_WINDOW`` while every row ends below it,
        else all ``max_len``. Two windows, not the decode step's powers of two: a prefill call's window copy
        is small beside its P tokens of compute, and each window multiplies the prefill programs (rows
        bucket × length bucket) that ``precompile`` builds."""
        length = length or self.max_len
        short = min(PREFILL_WINDOW, length)
        return short if last_position < short else length

    def precompile(self, log: Callable[[str], None] | None = None, progress: bool = False) -> int:
        """Compile, before any request, every program the scheduler picks in steady state: each prefill shape
        (rows bucket × length bucket within ``prefill_budget``, at both prefill windows), each gathered decode
        shape (rows bucket × window) and the in-place step, in the greedy and the top-k sampling variants
        (HF's defaults), and the prefix cache's extraction and copy at each entry length. The calls run on
        padding rows (nothing is written that a request reads). A chunk padded only to what its slot holds
        (a prompt filling its slot to the end) is compiled when it comes. ``progress``: a tqdm bar on
        stderr. Returns the number of programs compiled."""
        if self.has_work():
            raise ServeError("precompile runs before the engine takes requests")
        t0, n0 = time.perf_counter(), Profile.programs()
        tasks = self._precompile_tasks()
        if progress:
            from tqdm.auto import tqdm

            tasks = tqdm(tasks, desc="precompiling", unit="program", file=sys.stderr)
        for task in tasks:
            task()
        jax.block_until_ready(self.caches)
        n = Profile.programs() - n0
        if log:
            log(f"precompiled {n} programs ({len(self._prefill_shapes())} prefill shapes, decode windows "
                f"{self._decode_windows()}) in {time.perf_counter() - t0:.0f} s")
        return n

    def _prefill_shapes(self) -> list[tuple[int, int, int, int]]:
        """(tier, rows bucket, length bucket, window) of every prefill call ``_prefill_batch`` can make."""
        return [(t, R, P, window) for t, tier in enumerate(self.tiers)
                for window in sorted({self.prefill_window(0, tier.length), tier.length})
                for P in self._prefill_lengths() if P <= window
                for R in (1 << i for i in range(16)) if R <= _pow2(tier.slots) and R * P <= self.prefill_budget]

    def _prefill_lengths(self) -> list[int]:
        """Every padded length ``_prefill_length`` gives (8 at the default chunk of 256)."""
        return sorted({self._prefill_length(n) for n in range(1, self.prefill_chunk + 1)})

    def _decode_windows(self, length: int | None = None) -> list[int]:
        length = length or self.max_len
        return sorted({self.window(p, length) for p in range(length)})

    def _precompile_tasks(self) -> list[Callable[[], None]]:
        """One call per program ``precompile`` builds, each on padding rows (index past the tier's rows: read
        from its last row, never written) or, for the in-place step, on no live row."""
        B = self.slots
        tasks = []

        def prefill(t, R, P, window):
            z = jnp.zeros((R,), jnp.int32)
            _, self.caches[t] = _prefill(self.params, self.caches[t], jnp.full((R,), self.tiers[t].slots, jnp.int32),
                                         jnp.zeros((R, P), jnp.int32), z, z, cfg=self.cfg, window=window)

        def gathered(t, R, window, flags):
            slot, z = np.full(R, B, np.int32), jnp.zeros((R,), jnp.int32)
            out = _decode_step(self.params, self.caches[t], self.banned, self.seen, self.history,
                               jnp.full((R,), self.tiers[t].slots, jnp.int32), jnp.asarray(slot), z, z, z,
                               self._row_params_for(tuple(slot.tolist())), jnp.zeros((R,), jnp.uint32),
                               cfg=self.cfg, flags=flags, window=window)
            self.caches[t], self.seen, self.history = out[5:]

        def in_place(flags):
            z = jnp.zeros((B,), jnp.int32)
            out = _decode_all(self.params, self._dense_cache(), self.banned, self.seen, self.history,
                              jnp.zeros((B,), bool), z, jnp.asarray(self._idle_positions()), z,
                              self._row_params_for(tuple(range(B))), jnp.zeros((B,), jnp.uint32), cfg=self.cfg,
                              flags=flags)
            self._set_dense_cache(out[5])
            self.seen, self.history = out[6:]

        def prefix_entry(source, length):  # an entry's extraction from a tier, its copy into row 0 of every tier
            entry = _extract(self.caches[source], jnp.int32(0), cfg=self.cfg, length=length)
            for t in range(len(self.tiers)):
                self.caches[t] = _copy_prefix(self.caches[t], jnp.int32(0), entry, cfg=self.cfg)

        tasks += [functools.partial(prefill, *shape) for shape in self._prefill_shapes()]
        for config in (GREEDY, SamplingConfig(do_sample=True)):
            flags = self.flags([config])
            tasks += [functools.partial(gathered, t, R, window, flags) for t, tier in enumerate(self.tiers)
                      for R in (1 << i for i in range(16)) if R <= _pow2(tier.slots)
                      for window in self._decode_windows(tier.length)]
            if self.dense_decode:
                tasks.append(functools.partial(in_place, flags))
            # the first-token program of this variant
            tasks.append(functools.partial(self.run_to_completion, [Request([0], 2, config)]))
        if self.prefix.budget > 0:
            for t, tier in enumerate(self.tiers):
                lengths = {min(bucket_length(n), tier.length)
                           for n in range(self.prefix.block, tier.length + 1, self.prefix.block)}
                tasks += [functools.partial(prefix_entry, t, length) for length in sorted(lengths)]
        return tasks

    # ---------------------------------------------------------------------------------- checks
    def check(self, req: Request) -> None:
        """Refuse what cannot run, before it is queued (the server turns this into a 400)."""
        n = len(req.prompt)
        if n == 0:
            raise ServeError("the prompt is empty; a prompt needs at least the BOS token")
        if not isinstance(req.max_tokens, int) or req.max_tokens < 1:
            raise ServeError(f"max_tokens must be an integer ≥ 1, got {req.max_tokens!r}")
        if n + req.max_tokens > self.max_len:
            raise ServeError(
                f"the prompt has {n} tokens; with max_tokens={req.max_tokens} that needs {n + req.max_tokens} "
                f"positions but a slot holds {self.max_len} (--max-len; the model's context is "
                f"{self.cfg.max_position_embeddings}). Shorten the prompt or lower max_tokens.")
        arr = np.asarray(req.prompt)
        if arr.min() < 0 or arr.max() >= self.vocab:
            raise ServeError(f"the prompt has token ids outside [0, {self.vocab}): min {arr.min()}, max {arr.max()}")
        if req.banned is not None:
            b = np.asarray(req.banned, bool)
            if b.shape != (self.vocab,):
                raise ServeError(f"the ban mask has shape {b.shape}; expected ({self.vocab},)")
            if b.all():
                raise ServeError("the ban mask bans every token")
        if not isinstance(req.sampling, SamplingConfig):
            raise ServeError(f"sampling must be an infer.processors.SamplingConfig, got {type(req.sampling).__name__}")
        try:  # the one validation point of generation options (infer/processors.py), same messages as the CLI
            dataclasses.replace(req.sampling, max_new_tokens=req.max_tokens).check_vocab(self.vocab)
        except GenerationError as e:
            raise ServeError(str(e)) from None
        if req.sampling.num_return_sequences != 1:
            raise ServeError("num_return_sequences must be 1 per engine request; submit n requests (the API's n)")
        if isinstance(req.seed, bool) or not isinstance(req.seed, (int, np.integer)) or not 0 <= int(req.seed) < 2 ** 32:
            raise ServeError(f"seed must be an integer in [0, 2**32), got {req.seed!r}")

    # ---------------------------------------------------------------------------------- public API
    def submit(self, req: Request) -> Request:
        self.check(req)
        with self._lock:
            if self._stopping:
                raise ServeError("the server is shutting down; retry on another replica")
            req.submitted = time.perf_counter()
            self._queue.append(req)
            self._lock.notify_all()
        return req

    @property
    def queue_depth(self) -> int:
        return len(self._queue)

    @property
    def active_slots(self) -> int:
        return sum(s.request is not None for s in self._slots)

    def has_work(self) -> bool:
        return bool(self._queue) or self.active_slots > 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="spiritlm-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True, timeout: float = 60.0) -> None:
        """Stop accepting requests; with ``drain`` let queued and running ones finish (up to ``timeout``)."""
        with self._lock:
            self._stopping = True
            if not drain:
                for r in list(self._queue):
                    r.cancel()
            self._lock.notify_all()
        deadline = time.monotonic() + timeout
        while self._thread is not None and self.has_work() and time.monotonic() < deadline:
            time.sleep(0.01)
        with self._lock:
            self._thread_exit = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self.has_work() and not self._thread_exit:
                    self._lock.wait(timeout=0.5)
                if self._thread_exit and not self.has_work():
                    return
            try:
                self.step()
            except Exception as e:  # a device failure: fail the running requests, keep serving
                for s in self._slots:
                    if s.request is not None:
                        self._finish(s, "error", e)

    # ---------------------------------------------------------------------------------- scheduling
    def step(self) -> None:
        """One scheduler iteration: drop cancelled requests, admit queued ones into free slots, one batched
        prefill call (a chunk of every admitted prompt that fits ``prefill_budget``), then one decode step of
        every decoding slot (in groups by attention window, see ``_groups``)."""
        for s in self._slots:
            if s.request is not None and s.request.cancelled:
                self._finish(s, "stop" if s.request.stop_requested else "cancelled")
        self._admit()
        if any(s.request is not None and s.filled is not None for s in self._slots):
            self._prefill()
        live = [i for i, s in enumerate(self._slots) if s.request is not None and s.filled is None]
        if live:
            self._decode(live)

    def _slot_for(self, req: Request) -> int | None:
        """The free slot for ``req``: the shortest that holds its prompt + max_tokens (so short requests leave
        the long slots to long ones), lowest first; None if none is free."""
        need = len(req.prompt) + req.max_tokens
        free = [i for i, s in enumerate(self._slots) if s.request is None and need <= self.slot_length(i)]
        return min(free, key=lambda i: (self.slot_length(i), i), default=None)

    def _admit(self) -> None:
        """Fill free slots from the queue, first come first served; a cached prefix is copied in at once.

        A request that finds no free slot long enough waits at its place while later requests that fit the
        free (shorter) slots start: with short slots, a short request may pass a long one waiting for a long
        slot, and the long one still gets the next long slot that frees (it is ahead in the queue)."""
        with self._lock:
            queued = list(self._queue)
        for req in queued:
            if not any(s.request is None for s in self._slots):
                return
            if req.cancelled:
                with self._lock:
                    self._queue.remove(req)
                self._report_finish(req, "stop" if req.stop_requested else "cancelled")
                continue
            free = self._slot_for(req)
            if free is None:
                continue
            with self._lock:
                self._queue.remove(req)
            self._place(req, free)

    def _place(self, req: Request, free: int) -> None:
        """Put ``req`` in slot ``free``, with the KV of its longest cached prefix copied into the slot's row."""
        t, tier = self.tier_of(free)
        try:
            entry, start = self.prefix.lookup(req.prompt)
            if entry is not None:
                self.caches[t] = _copy_prefix(self.caches[t], jnp.int32(free - tier.first), entry["tree"],
                                              cfg=self.cfg)
            req.cached_tokens = start
            self._admitted += 1
            self._slots[free] = _Slot(req, filled=start, cached=start, order=self._admitted)
        except Exception as e:  # this request fails alone
            self._slots[free] = _Slot()
            self._report_finish(req, "error", e)

    def _piece(self, i: int) -> int:
        """The prompt tokens slot ``i`` prefills in its next call (at most ``prefill_chunk``)."""
        s = self._slots[i]
        return min(len(s.request.prompt) - s.filled, self.prefill_chunk)

    def _prefill_length(self, piece: int) -> int:
        """The padded length of a prefill call for a piece of ``piece`` tokens (one of ``_prefill_lengths``)."""
        return min(bucket_length(piece, PREFILL_BUCKET), self._chunk_cap)

    def _prefill_batch(self, skip: set[int]) -> tuple[list[int], int]:
        """The prefilling slots (not in ``skip``) of the next prefill call and its length P.

        The longest piece (first come among equals) sets P (``_prefill_length``; near the end of its slot P is
        only what the slot holds), the tier and the attention window. Rows of the same tier whose piece fits in
        P, whose slot holds P more positions and whose window is the same may join, longest first: the call takes the first m of them that
        make the most prompt tokens per unit of cost, ``Σ pieces / (rows bucket(m) × P + prefill_call_cost)``,
        within ``prefill_budget``. So a 256-token chunk is not batched with three 32-token prompts (1,024 padded
        tokens for 352), and four 64-token prompts are (256 for 256); the rest go in the next calls."""
        waiting = sorted((i for i, s in enumerate(self._slots)
                          if s.request is not None and s.filled is not None and i not in skip),
                         key=lambda i: (-self._prefill_length(self._piece(i)), self._slots[i].order))
        if not waiting:
            return [], 0
        t, tier = self.tier_of(waiting[0])
        first = self._slots[waiting[0]].filled
        P = min(self._prefill_length(self._piece(waiting[0])), tier.length - first)
        window = self.prefill_window(first + P - 1, tier.length)
        fits = [i for i in waiting if self._slot_tier[i] == t and self._piece(i) <= P
                and self._slots[i].filled + P <= tier.length
                and self.prefill_window(self._slots[i].filled + P - 1, tier.length) == window]
        best, best_rate, tokens = 1, 0.0, 0
        for m, i in enumerate(fits, start=1):
            R = _pow2(m)
            if R > _pow2(tier.slots) or (m > 1 and R * P > self.prefill_budget):
                break
            tokens += self._piece(i)
            rate = tokens / (R * P + self.prefill_call_cost)
            if rate >= best_rate:  # ties: fewer calls
                best, best_rate = m, rate
        return fits[:best], P

    def _prefill(self) -> None:
        """Prefill calls (``_prefill_batch``) until every prefilling slot had one chunk or
        ``prefill_budget`` padded tokens were spent."""
        done: set[int] = set()
        spent = 0
        while spent < self.prefill_budget:
            rows, P = self._prefill_batch(done)
            if not rows:
                return
            done.update(rows)
            spent += _pow2(len(rows)) * P
            self._prefill_call(rows, P)

    def _prefill_call(self, rows: list[int], P: int) -> None:
        R = _pow2(len(rows))
        t, tier = self.tier_of(rows[0])
        idx = np.full(R, tier.slots, np.int32)  # padding rows: an index past the tier's rows (never written)
        tokens = np.full((R, P), self.pad_id, np.int32)
        start, last = np.zeros(R, np.int32), np.zeros(R, np.int32)
        pieces = []
        for r, i in enumerate(rows):
            s, piece = self._slots[i], self._piece(i)
            idx[r], start[r], last[r] = i - tier.first, s.filled, piece - 1
            tokens[r, :piece] = s.request.prompt[s.filled:s.filled + piece]
            pieces.append(piece)
        window = self.prefill_window(int(start.max()) + P - 1, tier.length)
        t0 = time.perf_counter()
        try:
            logits, self.caches[t] = _prefill(self.params, self.caches[t], jnp.asarray(idx), jnp.asarray(tokens),
                                              jnp.asarray(start), jnp.asarray(last), cfg=self.cfg, window=window)
            jax.block_until_ready(logits)
        except Exception as e:  # these requests fail; the others go on
            for i in rows:
                self._finish(self._slots[i], "error", e)
            return
        self.profile.prefill(time.perf_counter() - t0, len(rows), R * P, sum(pieces), window)
        self.prefill_tokens_total += sum(pieces)
        finite = np.isfinite(np.asarray(logits)).all(axis=-1)  # a row with non-finite logits wrote no KV
        for r, (i, piece) in enumerate(zip(rows, pieces)):
            s = self._slots[i]
            if not finite[r]:
                self._finish(s, "error", _failure(s.filled + piece, 0))
                continue
            s.filled += piece
            if s.filled == len(s.request.prompt):
                try:
                    self._first(i, logits[r][None])
                except Exception as e:  # this request fails alone
                    self._finish(s, "error", e)

    def _first(self, i: int, logits) -> None:
        """Slot ``i``'s prompt is in the cache: keep its prefix, set its options and pick its first token."""
        slot, h = self._slots[i], self.host
        req, ids = slot.request, slot.request.prompt
        slot.filled = None
        t, tier = self.tier_of(i)
        self.prefix.store(ids, slot.cached,
                          lambda L: _extract(self.caches[t], jnp.int32(i - tier.first), cfg=self.cfg, length=L),
                          lambda n: min(bucket_length(n), tier.length))
        config = dataclasses.replace(req.sampling, max_new_tokens=req.max_tokens, stop_strings=())
        self.configs[i] = config
        self._rows = {}
        h["seed"][i], h["counter"][i] = req.seed, 0
        banned = np.zeros(self.vocab, bool) if req.banned is None else np.asarray(req.banned, bool)
        banned = banned | processors.single_token_bans([config], self._eos_default(), self.vocab)[0]
        seen = np.zeros(self.vocab, bool)
        seen[np.asarray(ids)] = True
        history = np.full(self.max_len, self.pad_id, np.int32)
        history[:len(ids)] = ids
        tok, lp, top_ids, top_lp, failed, self.banned, self.seen, self.history = _first_token(
            logits, self.banned, self.seen, self.history, jnp.int32(i), jnp.asarray(banned), jnp.asarray(seen),
            jnp.asarray(history), jnp.int32(len(ids)), jax.tree.map(jnp.asarray, processors.row_params(
                [config], self._eos_default(), {})), jnp.uint32(req.seed), flags=self.flags([config]))
        h["position"][i] = len(ids)
        if bool(failed[0]):
            raise _failure(len(ids), 0)
        self._deliver(i, int(tok[0]), float(lp[0]), np.asarray(top_ids[0]), np.asarray(top_lp[0]))

    def _step_cost(self, rows: int, last_position: int, length: int | None = None) -> float:
        """What one gathered decode call costs, in bytes read in place: the weights, and the KV of its
        window, which is copied out of the slots first (``GATHER_COST`` per byte)."""
        return self._weight_bytes + GATHER_COST * _pow2(rows) * self.window(last_position, length) * self._kv_bytes

    def _dense_cost(self) -> float:
        """What one in-place call over every slot costs (``_decode_all``): the weights and the whole cache
        (each tier's rows over their own length)."""
        return self._weight_bytes + sum(tier.slots * tier.length for tier in self.tiers) * self._kv_bytes

    def _groups(self, live: list[int]) -> list[list[int]] | None:
        """Split the decoding slots into gathered calls, each within one tier with its own rows bucket and
        window: per tier, the split of its slots sorted by position into runs that minimises the summed
        ``_step_cost`` (one call unless a few long rows would make every short row attend over their window).
        None: one in-place call over every slot (``_decode_all``) costs less than the best split."""
        total, groups = 0.0, []
        for t, tier in enumerate(self.tiers):
            cost, split = self._split([i for i in live if self._slot_tier[i] == t], tier.length)
            total += cost
            groups += split
        if self.dense_decode and self._dense_cost() < total:
            return None
        return groups

    def _split(self, live: list[int], length: int) -> tuple[float, list[list[int]]]:
        """The cheapest split of one tier's decoding slots into gathered calls, and its cost."""
        h = self.host
        live = sorted(live, key=lambda i: h["position"][i])
        n = len(live)
        best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
        for j in range(1, n + 1):
            for i in range(j):
                c = best[i] + self._step_cost(j - i, int(h["position"][live[j - 1]]), length)
                if c < best[j]:
                    best[j], cut[j] = c, i
        groups, j = [], n
        while j:
            groups.append(live[cut[j]:j])
            j = cut[j]
        return best[n], groups[::-1]

    def _row_params_for(self, idx: tuple[int, ...]):
        if idx not in self._rows:
            self._rows[idx] = self._row_params([self.configs[i] if i < self.slots else GREEDY for i in idx])
        return self._rows[idx]

    def _decode(self, live: list[int]) -> None:
        groups = self._groups(live)
        if groups is None:
            return self._decode_dense(live)
        h = self.host
        t0 = time.perf_counter()
        calls, shapes = [], []
        for group in groups:
            R = _pow2(len(group))
            t, tier = self.tier_of(group[0])
            slot = np.asarray(group + [self.slots] * (R - len(group)), np.int32)  # padding: past every slot
            idx = np.where(slot < self.slots, slot - tier.first, tier.slots).astype(np.int32)  # rows of the tier
            at = np.minimum(slot, self.slots - 1)
            pad = slot >= self.slots
            window = self.window(int(h["position"][group].max()), tier.length)
            out = _decode_step(
                self.params, self.caches[t], self.banned, self.seen, self.history, jnp.asarray(idx), jnp.asarray(slot),
                jnp.asarray(np.where(pad, self.pad_id, h["token"][at])), jnp.asarray(np.where(pad, 0, h["position"][at])),
                jnp.asarray(np.where(pad, 0, h["counter"][at])), self._row_params_for(tuple(slot.tolist())),
                jnp.asarray(np.where(pad, 0, h["seed"][at]).astype(np.uint32)), cfg=self.cfg,
                flags=self.flags([self.configs[i] for i in group]), window=window)
            tok, lp, top_ids, top_lp, failed, self.caches[t], self.seen, self.history = out
            calls.append((group, (tok, lp, top_ids, top_lp, failed)))
            shapes.append((R, len(group), window))
        self.steps += 1
        t1 = time.perf_counter()
        results = [(group, [np.asarray(x) for x in outs]) for group, outs in calls]
        self.profile.decode(t1 - t0, time.perf_counter() - t1, shapes)
        self._advance(results)

    def _decode_dense(self, live: list[int]) -> None:
        """One in-place step of every slot (``_decode_all``); only the ``live`` rows' tokens are kept."""
        h, B = self.host, self.slots
        t0 = time.perf_counter()
        mask = np.zeros(B, bool)
        mask[live] = True
        position = np.where(mask, h["position"], self._idle_positions()).astype(np.int32)
        out = _decode_all(
            self.params, self._dense_cache(), self.banned, self.seen, self.history, jnp.asarray(mask),
            jnp.asarray(np.where(mask, h["token"], self.pad_id).astype(np.int32)), jnp.asarray(position),
            jnp.asarray(np.where(mask, h["counter"], 0).astype(np.int32)), self._row_params_for(tuple(range(B))),
            jnp.asarray(np.where(mask, h["seed"], 0).astype(np.uint32)), cfg=self.cfg,
            flags=self.flags([self.configs[i] for i in live]))
        tok, lp, top_ids, top_lp, failed, cache, self.seen, self.history = out
        self._set_dense_cache(cache)
        self.steps += 1
        t1 = time.perf_counter()
        tok, lp, top_ids, top_lp, failed = (np.asarray(x) for x in (tok, lp, top_ids, top_lp, failed))
        self.profile.decode(t1 - t0, time.perf_counter() - t1, [(B, len(live), self.max_len)])
        if failed.any():  # a non-finite row wrote non-finite KV at its position: zero it (0·NaN would poison
            # every later request in that slot, which reads the whole row with weight 0 beyond its position)
            for t, tier in enumerate(self.tiers):
                bad = [i for i in np.flatnonzero(failed) if self._slot_tier[i] == t]
                if bad:
                    self.caches[t] = _clear_positions(self.caches[t], jnp.asarray(np.subtract(bad, tier.first), jnp.int32),
                                                      jnp.asarray(position[bad]), cfg=self.cfg)
        self._advance([(live, [x[live] for x in (tok, lp, top_ids, top_lp, failed)])])

    def _idle_positions(self) -> np.ndarray:
        """(slots,) the position an idle slot is fed at in the in-place step: its tier's last (never read
        before a request writes it)."""
        return np.asarray([self.slot_length(i) - 1 for i in range(self.slots)], np.int32)

    def _advance(self, results) -> None:
        """Deliver each decoded row's token (or end it on failure) and move it one position on."""
        h = self.host
        for group, (tok, lp, top_ids, top_lp, failed) in results:
            for r, i in enumerate(group):
                s = self._slots[i]
                if s.request is None:
                    continue
                h["position"][i] += 1
                if failed[r]:
                    self._finish(s, "error", _failure(int(h["position"][i]), s.request.n_generated))
                else:
                    self._deliver(i, int(tok[r]), float(lp[r]), top_ids[r], top_lp[r])

    def _deliver(self, i: int, token: int, logprob: float, top_ids, top_lp) -> None:
        slot, h = self._slots[i], self.host
        req = slot.request
        slot.generated.append(token)
        req.n_generated += 1
        self.tokens_total += 1
        if req.first_token_at is None:
            req.first_token_at = time.perf_counter()
            if self.observer is not None:
                self.observer.first_token(req)
        h["token"][i] = token
        h["counter"][i] += 1
        stop = False
        if req.on_token is not None:
            try:
                stop = bool(req.on_token(token, logprob, top_ids, top_lp))
            except Exception as e:  # a failing consumer ends its own request only
                self._finish(slot, "error", e)
                return
        if stop or token == self.eos_id:
            self._finish(slot, "stop")
        elif req.n_generated >= req.max_tokens:
            self._finish(slot, "length")
        elif req.cancelled:
            self._finish(slot, "stop" if req.stop_requested else "cancelled")

    def _finish(self, slot: _Slot, reason: str, error: Exception | None = None) -> None:
        req = slot.request
        i = self._slots.index(slot)
        self._slots[i] = _Slot()
        h = self.host
        h["token"][i] = self.pad_id
        h["position"][i] = 0
        self.configs[i] = GREEDY
        self._rows = {}
        self._report_finish(req, reason, error)

    def _report_finish(self, req: Request, reason: str, error: Exception | None = None) -> None:
        req.finish_reason = reason
        self.finished[reason] += 1
        if self.observer is not None:
            self.observer.finished(req, reason)
        if req.on_finish is not None:
            try:
                req.on_finish(reason, error)
            except Exception:  # the consumer is gone; the engine goes on
                pass

    # ---------------------------------------------------------------------------------- convenience
    def warm_up(self, bos_id: int) -> None:
        """Compile the two decode-step variants every server needs (greedy; sampling with HF's defaults,
        top_k 50 → the ``SORT_WIDTH`` path) and the smallest prefill bucket."""
        self.run_to_completion([Request([bos_id], 2)])
        self.run_to_completion([Request([bos_id], 2, SamplingConfig(do_sample=True))])

    def run_to_completion(self, requests: list[Request]) -> list[list[int]]:
        """Submit and drive synchronously (no thread): the new ids of each request (EOS included)."""
        out: dict[int, list[int]] = {id(r): [] for r in requests}
        for r in requests:
            prev = r.on_token
            r.on_token = (lambda r, prev: lambda t, *a: (out[id(r)].append(t), bool(prev and prev(t, *a)))[1])(r, prev)
            self.submit(r)
        while self.has_work():
            self.step()
        return [out[id(r)] for r in requests]


def _tiers(slots: int, max_len: int, short_slots: int, short_len: int) -> list[Tier]:
    """The slot tiers: ``slots - short_slots`` of ``max_len`` positions, then ``short_slots`` of ``short_len``."""
    if isinstance(short_slots, bool) or not 0 <= short_slots < slots:
        raise ServeError(f"short_slots must be in [0, slots - 1] = [0, {slots - 1}] (at least one slot holds "
                         f"max_len positions for the longest request), got {short_slots}")
    if not short_slots:
        return [Tier(0, slots, max_len)]
    if not 2 <= short_len < max_len:
        raise ServeError(f"short_len must be in [2, max_len) = [2, {max_len}), got {short_len}; a short slot "
                         f"shorter than max_len is what saves a decode step its reads")
    return [Tier(0, slots - short_slots, max_len), Tier(slots - short_slots, short_slots, short_len)]


def _failure(position: int, n_generated: int) -> ServeError:
    return ServeError(
        f"generation stopped at new token {n_generated} (position {position}): the logits turned non-finite or the "
        f"bans (output modality, bad_words_ids, no_repeat_ngram_size, min lengths) left no token; check the "
        f"checkpoint (spiritlm-jax parity) or relax the options")


__all__ = ["Engine", "Request", "SamplingConfig", "ServeError", "PrefixCache", "GenerationError"]
