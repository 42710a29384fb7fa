"""Batched log-likelihood scoring of continuations: ONE forward per batch, inside one jit.

    s = score_continuations(cfg, params, contexts=[[1, 5, 9], [1, 7]], continuations=[[4, 4], [8]])
    s.sum_logprob, s.mean_logprob, s.n_tokens      # one value per row (numpy)

Row i is ``context_i + continuation_i`` (the context must start with BOS if the model expects one —
the tokenizer adds it). Rows are right-padded into a (B, L) batch; ``segment_ids`` mark the real
tokens (1) and the padding (0), so padding never reaches a real token. The log-probability of
continuation token t is ``log_softmax(logits[t - 1])[token_t]`` in fp32; per row we return the sum
over the continuation tokens only, their count and the mean (the "token-normalised" score).

Shapes are bucketed (batch to ``batch_size``, padded with dummy rows; length to a multiple of 16
times a power of two), so scoring many batches of varied lengths compiles only a few programs. With a
``mesh`` the batch axis is sharded over (data, fsdp) and params should already be placed
(``SpiritLM.from_pretrained(..., mesh=mesh)``).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spiritlm_jax.buckets import bucket_length  # noqa: F401  (re-exported: the one bucketing rule)
from spiritlm_jax.config import LlamaConfig
from spiritlm_jax.models.quantization import llama_module


class ScoringError(ValueError):
    pass


@dataclasses.dataclass
class Scores:
    sum_logprob: np.ndarray   # (N,) float64 (accumulated from fp32 per-token values)
    n_tokens: np.ndarray      # (N,) int
    token_logprobs: list      # N arrays of per-token log-probs of the continuation

    @property
    def mean_logprob(self) -> np.ndarray:
        return self.sum_logprob / self.n_tokens

    def get(self, normalization: str) -> np.ndarray:
        if normalization == "mean":
            return self.mean_logprob
        if normalization == "sum":
            return self.sum_logprob
        raise ScoringError(f"unknown normalisation {normalization!r}: use 'mean' (token-normalised) or 'sum'")


@functools.partial(jax.jit, static_argnames=("cfg",))
def _score_jit(params, tokens, segment_ids, cont_mask, *, cfg: LlamaConfig):
    """tokens/segment_ids/cont_mask (B, L). cont_mask[b, t] = token t is a continuation token.
    Returns per-token log-probs (B, L) (0 where not a continuation token)."""
    B, L = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
    logits, _ = llama_module(cfg).apply({"params": params}, tokens, positions=positions, segment_ids=segment_ids)
    logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)     # predicts tokens[:, 1:]
    tok_lp = jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]   # (B, L-1)
    tok_lp = jnp.where(cont_mask[:, 1:], tok_lp, 0.0)
    return jnp.pad(tok_lp, ((0, 0), (1, 0)))


def _check(cfg: LlamaConfig, contexts, continuations) -> None:
    if len(contexts) != len(continuations):
        raise ScoringError(f"{len(contexts)} contexts but {len(continuations)} continuations")
    if not contexts:
        raise ScoringError("nothing to score: no (context, continuation) pairs given")
    V, ctx = cfg.vocab_size, cfg.max_position_embeddings
    for i, (c, x) in enumerate(zip(contexts, continuations)):
        if len(c) == 0:
            raise ScoringError(f"row {i}: empty context; the first continuation token needs a token before it "
                               f"(at least BOS)")
        if len(x) == 0:
            raise ScoringError(f"row {i}: empty continuation; there is nothing to score")
        row = np.asarray(list(c) + list(x))
        if row.min() < 0 or row.max() >= V:
            raise ScoringError(f"row {i}: token ids outside [0, {V}) (min {row.min()}, max {row.max()}): the "
                               f"tokenizer does not match the model")
        if len(row) > ctx:
            raise ScoringError(f"row {i}: {len(row)} tokens exceed the model's context of {ctx} positions; "
                               f"shorten the context (fewer shots, less audio)")


def score_continuations(cfg: LlamaConfig, params, contexts: Sequence[Sequence[int]],
                        continuations: Sequence[Sequence[int]], *, batch_size: int = 16, mesh=None,
                        pad_id: int = 0) -> Scores:
    """Sum / count / mean log-prob of each continuation given its context (see the module doc)."""
    _check(cfg, contexts, continuations)
    n = len(contexts)
    if batch_size < 1:
        raise ScoringError(f"batch_size must be ≥ 1, got {batch_size}")
    if mesh is not None:
        nb = int(np.prod([mesh.shape[a] for a in ("data", "fsdp") if a in mesh.shape]))
        batch_size = int(math.ceil(batch_size / nb) * nb)
    lengths = np.array([len(c) + len(x) for c, x in zip(contexts, continuations)])
    order = np.argsort(-lengths, kind="stable")  # similar lengths share a batch (less padding)
    sums = np.zeros(n, np.float64)
    counts = np.zeros(n, np.int64)
    per_tok: list = [None] * n
    from spiritlm_jax.sharding import mesh_context

    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        L = bucket_length(int(lengths[idx].max()))
        tokens = np.full((batch_size, L), pad_id, np.int32)
        seg = np.zeros((batch_size, L), np.int32)
        cmask = np.zeros((batch_size, L), bool)
        for r, i in enumerate(idx):
            c, x = list(contexts[i]), list(continuations[i])
            tokens[r, :len(c) + len(x)] = c + x
            seg[r, :len(c) + len(x)] = 1
            cmask[r, len(c):len(c) + len(x)] = True
        args = [jnp.asarray(tokens), jnp.asarray(seg), jnp.asarray(cmask)]
        if mesh is not None:
            from spiritlm_jax import sharding as shd

            args = [shd.put(a, mesh, "batch", None) for a in args]
        with mesh_context(mesh):
            lp = np.asarray(_score_jit(params, *args, cfg=cfg))
        for r, i in enumerate(idx):
            row = lp[r][cmask[r]]
            per_tok[i] = row
            sums[i] = float(np.sum(row.astype(np.float64)))
            counts[i] = row.size
    return Scores(sums, counts, per_tok)


def compile_count() -> int:
    """How many programs the scorer has compiled in this process (for tests and benchmarks)."""
    return _score_jit._cache_size()


__all__ = ["ScoringError", "Scores", "score_continuations", "bucket_length", "compile_count"]
