"""Batched generation: one prefill, then decoding inside ONE jit-compiled ``lax.while_loop``.

* Prompts of different lengths are right-padded into one batch; every row writes its KV cache at its
  own positions, so each row decodes exactly as it would alone.
* Per-step logits processing follows HF transformers (what the original calls), in HF's order, with
  per-row parameters (``infer/processors.py``): repetition penalty, no-repeat n-grams, bad words and the
  ban mask, min length / min new tokens, then (sampling rows) temperature, top-k, top-p and a
  categorical draw; greedy rows take the argmax. Rows may mix greedy and sampling.
* The ban list (the output-modality mask) is a (B, V) boolean array applied per row INSIDE the loop.
* A row stops at one of its EOS ids (kept in its output), at its ``max_new_tokens`` or at a stop string;
  finished rows emit ``pad_id`` and the loop ends when every row is done.
* Non-finite logits (or a row whose bans leave no token) end the loop at once and raise
  :class:`GenerationError` naming the row and step, instead of returning garbage.
* Prompt lengths and cache sizes are bucketed so a new prompt length rarely recompiles.

JAX's RNG cannot reproduce torch's sampling stream; only the distributions match.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from spiritlm_jax.buckets import bucket_length
from spiritlm_jax.config import LlamaConfig
from spiritlm_jax.infer import processors
from spiritlm_jax.models.llama import init_cache
from spiritlm_jax.models.quantization import llama_module
from spiritlm_jax.infer.processors import GenerationError, ProcessorFlags, RowParams, SamplingConfig, StepState


def process_logits(logits: jax.Array, banned: jax.Array, s: SamplingConfig) -> jax.Array:
    """(B, V) fp32 logits → processed logits, in HF's order (ban → temperature → top-k → top-p).

    Kept for callers of the first engine API; generation itself runs :func:`processors.process`, which
    also applies the history-dependent processors (repetition penalty, n-grams, min lengths)."""
    B, V = logits.shape
    p = jax.tree.map(jnp.asarray, processors.row_params([s] * B, [-1], {}))
    x = jnp.where(banned, -jnp.inf, logits)
    return processors.warp(x, p, processors.flags_for([s], V)) if s.do_sample else x


ERR_NONFINITE, ERR_NOTHING_LEFT = 1, 2


@functools.partial(jax.jit, static_argnames=("cfg", "flags", "n_max", "return_logits"))
def _generate_jit(params, tokens, lengths, banned, rows: RowParams, stop, rng, cache, *, cfg: LlamaConfig,
                  flags: ProcessorFlags, n_max: int, pad_id: int, return_logits: bool):
    model = llama_module(cfg)
    B, P = tokens.shape
    V = cfg.vocab_size
    positions = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
    logits, cache = model.apply({"params": params}, tokens, positions=positions, cache=cache, logits_at=lengths - 1)
    last = logits[:, 0].astype(jnp.float32)  # (B, V): each row's last prompt position

    N = n_max
    batch = jnp.arange(B)
    lengths = lengths.astype(jnp.int32)
    history = jnp.concatenate([tokens, jnp.full((B, N), pad_id, jnp.int32)], axis=1)  # (B, P + N)
    in_prompt = jnp.arange(P)[None, :] < lengths[:, None]
    seen = (processors._scatter_mask(tokens, in_prompt, V) if flags.repetition_penalty
            else jnp.zeros((B, 0), bool))
    out = jnp.full((B, N), pad_id, jnp.int32)
    step_logits = jnp.zeros((B, N if return_logits else 0, V), jnp.float32)
    zeros = jnp.zeros((B,), jnp.int32)
    # n_out: tokens emitted per row; err / err_step: first failure per row (0 = none)
    state = (jnp.int32(0), last, cache, lengths, jnp.zeros((B,), bool), zeros, zeros, zeros, out, history, seen,
             step_logits, rng)

    def cond(st):
        step, _, _, _, done, _, err, *_ = st
        return (step < N) & ~jnp.all(done) & ~jnp.any(err > 0)

    def body(st):
        step, logits, cache, pos, done, n_out, err, err_step, out, history, seen, step_logits, rng = st
        rng, sub = jax.random.split(rng)
        live = ~done
        view = StepState(history=history, cur_len=pos, new_len=n_out, seen=seen)
        greedy_scores, sample_scores = processors.process(logits, banned, view, rows, flags)
        tok = processors.choose(greedy_scores, sample_scores, sub, rows, flags)
        failure = jnp.where(~jnp.all(jnp.isfinite(logits), axis=-1), ERR_NONFINITE,
                            jnp.where(~jnp.any(greedy_scores > -jnp.inf, axis=-1), ERR_NOTHING_LEFT, 0))
        failure = jnp.where(live, failure, 0)
        err_step = jnp.where((err == 0) & (failure > 0), step, err_step)
        err = jnp.where(err == 0, failure, err)
        emit = live & (failure == 0)
        tok = jnp.where(emit, tok, pad_id)
        out = out.at[:, step].set(tok)
        history = history.at[batch, pos].set(jnp.where(emit, tok, history[batch, pos]))
        if flags.repetition_penalty:
            seen = seen.at[batch, tok].max(emit)
        if return_logits:
            step_logits = step_logits.at[:, step].set(logits)
        n_out = n_out + emit.astype(jnp.int32)
        new_pos = pos + emit.astype(jnp.int32)
        finished = jnp.any(tok[:, None] == rows.eos_ids, axis=-1) | (n_out >= rows.max_new_tokens)
        if stop is not None:
            finished |= processors.stop_string_hits(history, new_pos, stop, rows.stop_strings)
        done = done | (emit & finished) | (failure > 0)
        nxt, cache = model.apply({"params": params}, tok[:, None], positions=pos[:, None], cache=cache)
        return (step + 1, nxt[:, 0].astype(jnp.float32), cache, new_pos, done, n_out, err, err_step, out, history,
                seen, step_logits, rng)

    final = lax.while_loop(cond, body, state)
    step, n_out, err, err_step, out, step_logits = final[0], final[5], final[6], final[7], final[8], final[11]
    return out, n_out, err, err_step, step_logits, step


def _configs_per_row(sampling, n_prompts: int) -> list[SamplingConfig]:
    if isinstance(sampling, SamplingConfig):
        return [sampling] * n_prompts
    configs = list(sampling)
    if len(configs) != n_prompts or not all(isinstance(c, SamplingConfig) for c in configs):
        raise GenerationError(f"sampling must be one SamplingConfig or one per prompt ({n_prompts}); got "
                              f"{len(configs)} item(s)")
    return configs


def _token_texts(token_texts, V: int) -> list[str]:
    if token_texts is None:
        raise GenerationError("stop_strings need the tokenizer's token texts: pass token_texts= (e.g. "
                              "TextTokenizer.token_texts()) to engine.generate")
    texts = list(token_texts() if callable(token_texts) else token_texts)
    if len(texts) < V:
        texts += [""] * (V - len(texts))  # padding rows of the embedding have no text
    return texts[:V]


def generate(cfg: LlamaConfig, params, prompts: Sequence[Sequence[int]],
             sampling: SamplingConfig | Sequence[SamplingConfig] = SamplingConfig(),
             banned: np.ndarray | None = None, *, seed: int = 0, eos_id: int | None = None, pad_id: int = 0,
             return_logits: bool = False, mesh=None, token_texts=None):
    """Generate for a batch of token-id prompts.

    sampling: one :class:`SamplingConfig` for all prompts or one per prompt (any mix of greedy and
    sampling rows, temperatures, top-k/top-p, penalties: one compiled program). A config with
    ``num_return_sequences=n`` gives n consecutive output rows for its prompt.
    banned: None, a (V,) boolean mask shared by all rows, or (B, V) per prompt — applied as is (HF's
    "EOS is never a bad word" rule applies to ``bad_words_ids`` only).
    token_texts: each token's text (a list or a callable returning one), needed for ``stop_strings``.
    Returns (list of new-token lists per output row — the stopping EOS included —, raw step logits
    (rows, steps, V) fp32 or None). With a ``mesh`` the batch is split over (data, fsdp) and params
    should already be sharded (``load_converted(..., mesh=mesh)``).
    """
    if not prompts:
        raise GenerationError("no prompts given")
    configs = _configs_per_row(sampling, len(prompts))
    V = cfg.vocab_size
    for c in configs:
        c.check_vocab(V)
    lengths0 = np.array([len(p) for p in prompts], np.int32)
    if (lengths0 == 0).any():
        raise GenerationError(f"prompt(s) {np.nonzero(lengths0 == 0)[0].tolist()} are empty; a prompt needs at least BOS")
    ctx = cfg.max_position_embeddings
    too_long = [i for i, (n, c) in enumerate(zip(lengths0, configs)) if n + c.max_new_tokens > ctx]
    if too_long:
        i = too_long[0]
        raise GenerationError(
            f"prompt {i} has {lengths0[i]} tokens; with max_new_tokens={configs[i].max_new_tokens} that exceeds the "
            f"model's context of {ctx} positions (max_position_embeddings). Shorten the prompt (e.g. less audio) "
            f"or lower max_new_tokens.")
    for i, p in enumerate(prompts):
        arr = np.asarray(p)
        if arr.min() < 0 or arr.max() >= V:
            raise GenerationError(f"prompt {i} has token ids outside [0, {V}): min {arr.min()}, max {arr.max()}")
    if banned is None:
        banned = np.zeros((V,), bool)
    banned = np.asarray(banned, bool)
    if banned.ndim == 1:
        banned = np.broadcast_to(banned, (len(prompts), V))
    if banned.shape != (len(prompts), V):
        raise GenerationError(f"banned mask has shape {banned.shape}; expected ({V},) or ({len(prompts)}, {V})")
    # num_return_sequences: each prompt's rows side by side
    owner = [i for i, c in enumerate(configs) for _ in range(c.num_return_sequences)]
    configs = [configs[i] for i in owner]
    prompts = [prompts[i] for i in owner]
    lengths = lengths0[owner]
    eos = cfg.eos_token_id if eos_id is None else eos_id
    eos_default = [] if eos is None or int(eos) < 0 else [int(eos)]
    banned = banned[owner] | processors.single_token_bans(configs, eos_default, V)
    if banned.all(axis=-1).any():
        raise GenerationError("the banned-token mask (output modality + bad_words_ids) bans every token for some row")
    stop_strings = sorted({s for c in configs for s in c.stop_strings})
    stop = (processors.stop_tables(stop_strings, _token_texts(token_texts, V)) if stop_strings else None)
    rows = processors.row_params(configs, eos_default, {s: i for i, s in enumerate(stop_strings)})
    flags = processors.flags_for(configs, V)
    n_real = max(c.max_new_tokens for c in configs)
    n_max = bucket_length(n_real, 64)  # the output buffer's static length; rows stop at their own max_new_tokens

    B = len(prompts)
    P = bucket_length(int(lengths.max()))
    tokens = np.full((B, P), pad_id, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    S = min(bucket_length(P + n_real), max(ctx, P + n_real))
    S = max(S, int(lengths.max()) + n_real)
    tokens_j, lengths_j, banned_j = jnp.asarray(tokens), jnp.asarray(lengths), jnp.asarray(banned)
    rows_j = jax.tree.map(jnp.asarray, rows)
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
        out, n_out, err, err_step, step_logits, n = _generate_jit(
            params, tokens_j, lengths_j, banned_j, rows_j, stop, jax.random.key(seed), cache, cfg=cfg, flags=flags,
            n_max=n_max, pad_id=pad_id, return_logits=return_logits)
    if not out.is_fully_addressable:  # a mesh over several processes: every process gets every row
        from jax.experimental import multihost_utils

        out, n_out, err, err_step, step_logits, n = multihost_utils.process_allgather(
            (out, n_out, err, err_step, step_logits, n), tiled=True)
    _raise_failures(np.asarray(err), np.asarray(err_step), owner)
    out, n_out, n = np.asarray(out), np.asarray(n_out), int(n)
    results = [row[:k].tolist() for row, k in zip(out, n_out)]
    return results, (np.asarray(step_logits)[:, :n] if return_logits else None)


def _raise_failures(err: np.ndarray, err_step: np.ndarray, owner: list[int]) -> None:
    bad = np.nonzero(err)[0]
    if not bad.size:
        return
    r = int(bad[0])
    where = f"prompt {owner[r]} (output row {r}) at new token {int(err_step[r])}"
    if err[r] == ERR_NONFINITE:
        raise GenerationError(
            f"the model's logits turned non-finite (NaN or inf) for {where}; generation was stopped. The weights "
            f"or activations overflowed: check the checkpoint (spiritlm-jax parity, finite tensors) or run in "
            f"float32 (dtype='float32')")
    raise GenerationError(
        f"every token was removed for {where}: the bans (output modality, bad_words_ids, no_repeat_ngram_size, "
        f"min_length/min_new_tokens on EOS) leave nothing to generate; relax one of them")


def greedy_reference_loop(cfg: LlamaConfig, params, prompt_ids, n_new: int, banned_ids) -> tuple[np.ndarray, np.ndarray]:
    """Greedy decode of one prompt with a ban list, as HF ``generate(do_sample=False, bad_words_ids)``:
    returns (new ids, raw per-step logits). Used by the parity runner."""
    banned = np.zeros((cfg.vocab_size,), bool)
    banned[np.asarray(banned_ids, np.int64)] = True
    ids, logits = generate(cfg, params, [list(map(int, prompt_ids))], SamplingConfig(max_new_tokens=n_new),
                           banned, return_logits=True)
    return np.asarray(ids[0]), logits[0]
