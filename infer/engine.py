"""Batched generation: one prefill, then decoding inside ONE jit-compiled ``lax.while_loop``.

* Prompts of different lengths are right-padded into one batch; every row writes its KV cache at its
  own positions, so each row decodes exactly as it would alone.
* Per-step logits processing follows HF transformers (what the original calls): banned ids → −∞,
  then temperature, top-k (ties at the threshold kept), top-p (drop tokens whose ascending cumulative
  probability is ≤ 1 − top_p, always keep one), then a categorical draw. Greedy = argmax after the ban.
* The ban list (the output-modality mask) is a (B, V) boolean array applied per row INSIDE the loop.
* A row stops at EOS (the EOS is kept in its output) or at ``max_new_tokens``; finished rows emit
  ``pad_id`` and the loop ends when every row is done.
* Prompt lengths and cache sizes are bucketed so a new prompt length rarely recompiles.

JAX's RNG cannot reproduce torch's sampling stream; only the distributions match.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spiritlm_jax.config import LlamaConfig
from spiritlm_jax.models.llama import Llama, init_cache


class GenerationError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """HF ``GenerationConfig`` defaults, as the original applies them (top_k=50 even when sampling
    with only top_p set)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    max_new_tokens: int = 20

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be ≥ 1, got {self.max_new_tokens}")
        if self.do_sample and not self.temperature > 0:
            raise GenerationError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be ≥ 0 (0 disables it), got {self.top_k}")


def process_logits(logits: jax.Array, banned: jax.Array, s: SamplingConfig) -> jax.Array:
    """(B, V) fp32 logits → processed logits, in HF's order (ban → temperature → top-k → top-p)."""
    neg = -jnp.inf
    x = jnp.where(banned, neg, logits)
    if not s.do_sample:
        return x
    if s.temperature != 1.0:
        x = x / s.temperature
    V = x.shape[-1]
    if 0 < s.top_k < V:
        kth = lax.top_k(x, s.top_k)[0][:, -1:]
        x = jnp.where(x < kth, neg, x)
    if s.top_p < 1.0:
        order = jnp.argsort(x, axis=-1)  # ascending
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
        remove_sorted = cum <= (1.0 - s.top_p)
        remove_sorted = remove_sorted.at[:, -1].set(False)  # keep at least the most likely token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(x.shape[0])[:, None], order].set(remove_sorted)
        x = jnp.where(remove, neg, x)
    return x


def _bucket(n: int, base: int = 16) -> int:
    """Round up to a multiple of ``base`` times a power of two (few distinct compiled shapes)."""
    if n <= base:
        return base
    p = 1 << math.ceil(math.log2(n / base))
    # finer steps above 4 buckets: multiples of base * p/4
    step = base * max(1, p // 4)
    return int(math.ceil(n / step) * step)


@functools.partial(jax.jit, static_argnames=("cfg", "s", "return_logits"))
def _generate_jit(params, tokens, lengths, banned, rng, cache, *, cfg: LlamaConfig, s: SamplingConfig,
                  eos_id: int, pad_id: int, return_logits: bool):
    model = Llama(cfg)
    B, P = tokens.shape
    V = cfg.vocab_size
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits, cache = model.apply({"params": params}, tokens, positions=positions, cache=cache, logits_at=lengths - 1)
    last = logits[:, 0]  # (B, V): each row's last prompt position

    N = s.max_new_tokens
    out = jnp.full((B, N), pad_id, jnp.int32)
    step_logits = jnp.zeros((B, N, V), jnp.float32) if return_logits else jnp.zeros((B, 0, V), jnp.float32)
    done = jnp.zeros((B,), bool)
    state = (jnp.int32(0), last, cache, lengths.astype(jnp.int32), done, out, step_logits, rng)

    def cond(st):
        step, _, _, _, done, *_ = st
        return (step < N) & ~jnp.all(done)

    def body(st):
        step, logits, cache, pos, done, out, step_logits, rng = st
        rng, sub = jax.random.split(rng)
        x = process_logits(logits, banned, s)
        if s.do_sample:
            tok = jax.random.categorical(sub, x, axis=-1).astype(jnp.int32)
        else:
            tok = jnp.argmax(x, axis=-1).astype(jnp.int32)
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, step].set(tok)
        if return_logits:
            step_logits = step_logits.at[:, step].set(logits)
        done = done | (tok == eos_id)
        nxt, cache = model.apply({"params": params}, tok[:, None], positions=pos[:, None], cache=cache)
        return step + 1, nxt[:, 0], cache, pos + 1, done, out, step_logits, rng

    step, _, _, _, done, out, step_logits, _ = lax.while_loop(cond, body, state)
    return out, step_logits, step


def generate(cfg: LlamaConfig, params, prompts: Sequence[Sequence[int]], sampling: SamplingConfig = SamplingConfig(),
             banned: np.ndarray | None = None, *, seed: int = 0, eos_id: int | None = None, pad_id: int = 0,
             return_logits: bool = False, mesh=None):
    """Generate for a batch of token-id prompts.

    banned: None, a (V,) boolean mask shared by all rows, or (B, V) per row.
    Returns (list of new-token lists per row — EOS included when produced —, step logits (B, N, V) fp32
    or None). With a ``mesh`` the batch is split over (data, fsdp) and params should already be sharded
    (``load_converted(..., mesh=mesh)``).
    """
    if not prompts:
        raise GenerationError("no prompts given")
    B = len(prompts)
    lengths = np.array([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
        raise GenerationError(f"prompt(s) {np.nonzero(lengths == 0)[0].tolist()} are empty; a prompt needs at least BOS")
    ctx = cfg.max_position_embeddings
    too_long = [i for i, n in enumerate(lengths) if n + sampling.max_new_tokens > ctx]
    if too_long:
        i = too_long[0]
        raise GenerationError(
            f"prompt {i} has {lengths[i]} tokens; with max_new_tokens={sampling.max_new_tokens} that exceeds the "
            f"model's context of {ctx} positions (max_position_embeddings). Shorten the prompt (e.g. less audio) "
            f"or lower max_new_tokens.")
    V = cfg.vocab_size
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.min() < 0 or arr.max() >= V:
            raise GenerationError(f"prompt {i} has token ids outside [0, {V}): min {arr.min()}, max {arr.max()}")
    P = _bucket(int(lengths.max()))
    tokens = np.full((B, P), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    if banned is None:
        banned = np.zeros((V,), bool)
    banned = np.asarray(banned, bool)
    if banned.ndim == 1:
        banned = np.broadcast_to(banned, (B, V))
    if banned.shape != (B, V):
        raise GenerationError(f"banned mask has shape {banned.shape}; expected ({V},) or ({B}, {V})")
    if banned.all(axis=-1).any():
        raise GenerationError("the banned-token mask bans every token for some row")
    eos = cfg.eos_token_id if eos_id is None else eos_id
    eos = -1 if eos is None else int(eos)
    S = min(_bucket(P + sampling.max_new_tokens), max(ctx, P + sampling.max_new_tokens))
    S = max(S, int(lengths.max()) + sampling.max_new_tokens)
    tokens_j, lengths_j, banned_j = jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(banned)
    cache = init_cache(cfg, B, S)
    if mesh is not None:
        from spiritlm_jax import sharding as shd
        from spiritlm_jax.models.llama import cache_logical_axes

        tokens_j = shd.put(tokens_j, mesh, "batch", None)
        lengths_j = shd.put(lengths_j, mesh, "batch")
        banned_j = shd.put(banned_j, mesh, "batch", None)
        cache = jax.tree.map(lambda c, names: shd.put(c, mesh, *names), cache, cache_logical_axes(cfg))
    from spiritlm_jax.sharding import mesh_context

    with mesh_context(mesh):
        out, step_logits, n = _generate_jit(params, tokens_j, lengths_j, banned_j, jax.random.key(seed), cache,
                                            cfg=cfg, s=sampling, eos_id=eos, pad_id=pad_id,
                                            return_logits=return_logits)
    out = np.asarray(out)
    n = int(n)
    results = []
    for row in out[:, :n]:
        ids = row.tolist()
        if eos >= 0 and eos in ids:
            ids = ids[: ids.index(eos) + 1]
        results.append(ids)
    return results, (np.asarray(step_logits)[:, :n] if return_logits else None)


def greedy_reference_loop(cfg: LlamaConfig, params, prompt_ids, n_new: int, banned_ids) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decode of one prompt with a ban list, as HF ``generate(do_sample=False, bad_words_ids)``:
    returns (new ids, raw per-step logits). Used by the parity runner."""
    banned = np.zeros((cfg.vocab_size,), bool)
    banned[np.asarray(banned_ids, np.int64)] = True
    ids, logits = generate(cfg, params, [list(map(int, prompt_ids))], SamplingConfig(max_new_tokens=n_new),
                           banned, return_logits=True)
    return np.asarray(ids[0]), logits[0]
