"""The Llama backbone of Spirit LM as pure ``flax.linen`` modules.

Math follows Hugging Face ``LlamaForCausalLM`` (what Spirit LM ships): RMSNorm computed in fp32 and cast
back before the weight multiply; rotary embeddings in the "rotate-half" layout with cos/sin computed in
fp32; grouped-query attention; SiLU-gated MLP; untied (or tied) LM head; logits returned in fp32.

Two call paths share one module:

* **full sequence** (training, scoring): ``model.apply(params, tokens, positions=…, segment_ids=…)``.
  ``segment_ids`` (B, T) marks packed documents (attention stays inside a segment) and padding (0).
* **cached** (prefill and decode): pass ``cache=init_cache(...)``. New tokens are written at the cache
  slots given by ``positions`` (B, T) — per row, so a batch of prompts of different lengths decodes
  exactly as each prompt alone (right padding; each row's next slot is its own length). A query at
  position p attends to cache slots ≤ p; stale slots above p are never read. The updated cache is
  returned: it is an explicit pytree, never hidden state. A tiered cache (``tiered_cache``: several caches of
  different lengths, their rows the batch's rows in order) lets each group of rows attend over its own
  length only (the server's short and long slots).

Parameter shapes (logical axes in brackets), per layer:
  attn/q (embed, heads, head_dim)   attn/k, attn/v (embed, kv_heads, head_dim)   attn/o (heads, head_dim, embed)
  mlp/gate, mlp/up (embed, mlp)     mlp/down (mlp, embed)                         *_norm/scale (norm)
With ``scan_layers`` the per-layer params are stacked under ``layers`` with a leading [layers] axis;
otherwise they live in ``layers_0`` … ``layers_{L-1}``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from ..config import LlamaConfig, dtype_of
from .attention import attend, attend_cached
from .layers import with_precision

Array = jax.Array
# The weights stored output-major, (out, in) like torch's nn.Linear (see Mlp); the attention projections are
# input-major. LoRA merging reads this (converters/llama.py maps the four with COPY).
OUTPUT_MAJOR = frozenset({"gate", "up", "down", "lm_head"})


def _param(module: nn.Module, name: str, shape, names, init, cfg: LlamaConfig):
    return module.param(name, nn.with_logical_partitioning(init, names), shape, dtype_of(cfg.param_dtype))


def _weight(module: nn.Module, name: str, shape, names, init, cfg: LlamaConfig):
    """A matmul weight in the compute dtype. Cast only when the dtypes differ: under qwix PTQ
    (infer/quantize.py) the param is a quantized array that the following einsum consumes as is."""
    w = _param(module, name, shape, names, init, cfg)
    dt = dtype_of(cfg.dtype)
    return w if w.dtype == dt else w.astype(dt)


class RMSNorm(nn.Module):
    eps: float
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        scale = _param(self, "scale", (x.shape[-1],), ("norm",), nn.initializers.ones, self.config)
        x32 = x.astype(jnp.float32)
        y = x32 * lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # HF casts back to the input dtype BEFORE multiplying by the weight (matters in bf16).
        return scale.astype(dtype_of(self.config.dtype)) * y.astype(x.dtype)


def rope_cos_sin(positions: Array, head_dim: int, theta: float, dtype) -> tuple[Array, Array]:
    """cos/sin tables (B, T, head_dim) for integer positions (B, T); computed in fp32 as HF does."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
    """x (B, T, H, D); rotate-half layout: the first and second halves of D form the pairs."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class Attention(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array, cos: Array, sin: Array, where: dict, positions: Array, cache: dict | None):
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        E, H, K, D = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim_
        init = nn.initializers.normal(0.02)
        # The projections are input-major, contracted axes first: XLA:CPU's dot canonicalises a multi-axis
        # weight to (contracted, kept) order, so an output-major (H, D, E) q was transposed on every call. The
        # 2-D weights (MLP, LM head) are output-major instead (see Mlp).
        wq = _weight(self, "q", (E, H, D), ("embed", "heads", "head_dim"), init, cfg)
        wk = _weight(self, "k", (E, K, D), ("embed", "kv_heads", "head_dim"), init, cfg)
        wv = _weight(self, "v", (E, K, D), ("embed", "kv_heads", "head_dim"), init, cfg)
        wo = _weight(self, "o", (H, D, E), ("heads", "head_dim", "embed"), init, cfg)

        q = jnp.einsum("bte,ehd->bthd", x, wq)  # (B, T, H, D)
        k = jnp.einsum("bte,ekd->btkd", x, wk)  # (B, T, KV, D)
        v = jnp.einsum("bte,ekd->btkd", x, wv)
        q = nn.with_logical_constraint(q, ("batch", "length", "act_heads", None))
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)

        if cache is None:
            out = attend(q, k, v, where, cfg, full_sequence=True)
        elif "tiers" in cache:
            out, cache = _attend_tiers(q, k, v, positions, cache, cfg)
        else:
            cache = _write_cache(cache, k, v, positions[:, 0])
            out = attend_cached(q, cache["k"].astype(dt), cache["v"].astype(dt), where, cfg)
        out = nn.with_logical_constraint(out, ("batch", "length", "act_heads", None))
        # An einsum, not a bare dot_general: qwix's LoRA and quantization rules intercept einsums and read the
        # weight's roles from the subscripts (a dot_general here gave LoRA adapters that do not factor the
        # (H, D, E) weight). The head_dim letter is "k", not "d", on purpose: jnp.einsum orders the contracted
        # axes ALPHABETICALLY, and "bthd,hde" contracts as (d, h), which XLA:CPU serves by transposing the whole
        # (H, D, E) weight to (D, H, E) on every call (12.5 % of a batch-16 decode step's op time); "bthk,hke"
        # contracts as (h, k) = the weight's own row-major order, so the dot reads it in place. Same math, same
        # params, same adapters (tests/test_llama.py checks the compiled step has no copy of the weight).
        return jnp.einsum("bthk,hke->bte", out, wo), cache  # (B, T, E)


def _write_cache(cache: dict, k: Array, v: Array, start: Array) -> dict:
    """Write the new keys/values k, v (B, T, KV, D) at each row's own positions start (B,) … start + T. The
    cache is heads-major (B, KV, S, D): the score and value dots batch over (B, KV) and read it in place (a
    (B, S, KV, D) cache was transposed whole, per layer and step, before each dot: 10-20x the dots)."""
    upd = jax.vmap(lambda c, u, i: lax.dynamic_update_slice_in_dim(c, u.astype(c.dtype), i, axis=1))
    new_k, new_v = (jnp.swapaxes(t, 1, 2) for t in (k, v))  # (B, T, KV, D) -> (B, KV, T, D)
    return {"k": upd(cache["k"], new_k, start), "v": upd(cache["v"], new_v, start)}


def cached_where(positions: Array, length: int) -> dict:
    """The cached path's attention rule for queries at ``positions`` (B, T) over a cache of ``length``
    positions: a query at position p reads cache positions <= p."""
    B, T = positions.shape
    return {"q_pos": positions, "kv_pos": jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (B, length)),
            "q_seg": jnp.ones((B, T), jnp.int32), "kv_seg": jnp.ones((B, length), jnp.int32)}


def _attend_tiers(q: Array, k: Array, v: Array, positions: Array, cache: dict, cfg: LlamaConfig):
    """The cached path over a tiered cache (:func:`tiered_cache`): the batch's rows are the tiers' rows in
    order, and each tier's rows write and attend over their own cache only, so a step reads every tier's
    length where it lies, not the longest one for every row. q (B, T, H, D), k, v (B, T, KV, D)."""
    dt = dtype_of(cfg.dtype)
    rows_held = sum(tier["k"].shape[0] for tier in cache["tiers"])
    if rows_held != q.shape[0]:
        raise ValueError(f"the tiered cache holds {rows_held} rows but the batch has {q.shape[0]}")
    outs, tiers, first = [], [], 0
    for tier in cache["tiers"]:
        rows = slice(first, first + tier["k"].shape[0])
        first = rows.stop
        tier = _write_cache(tier, k[rows], v[rows], positions[rows, 0])
        where = cached_where(positions[rows], tier["k"].shape[-2])
        outs.append(attend_cached(q[rows], tier["k"].astype(dt), tier["v"].astype(dt), where, cfg))  # (b, T, H, D)
        tiers.append(tier)
    return jnp.concatenate(outs, axis=0), {"tiers": tiers}


class MLP(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        cfg = self.config
        E, I = cfg.hidden_size, cfg.intermediate_size
        init = nn.initializers.normal(0.02)
        # Output-major (torch's nn.Linear (out, in) order), contracted axis last: a 2-D dot with a transposed
        # weight is served in place, and at decoding's few rows XLA:CPU streams an (N, K) weight much faster
        # than a (K, N) one (12-layer 135 M-shape stack, MLP + LM head: 16 rows 160 -> 108 ms, 1 row level;
        # a single 768 x 2048 dot at 16 rows 4.95 -> 0.90 ms; bench/matmul_bench.py's (N,K) rows).
        gate = _weight(self, "gate", (I, E), ("mlp", "embed"), init, cfg)
        up = _weight(self, "up", (I, E), ("mlp", "embed"), init, cfg)
        down = _weight(self, "down", (E, I), ("embed", "mlp"), init, cfg)
        h = jax.nn.silu(jnp.einsum("bte,ie->bti", x, gate)) * jnp.einsum("bte,ie->bti", x, up)  # (B, T, I)
        h = nn.with_logical_constraint(h, ("batch", "length", "act_mlp"))
        return jnp.einsum("bti,ei->bte", h, down)


class Block(nn.Module):
    config: LlamaConfig

    @nn.compact
    def __call__(self, x, cos, sin, where, positions, cache):
        cfg = self.config
        h = RMSNorm(cfg.rms_norm_eps, cfg, name="attn_norm")(x)
        a, cache = Attention(cfg, name="attn")(h, cos, sin, where, positions, cache)
        x = x + a
        h = RMSNorm(cfg.rms_norm_eps, cfg, name="mlp_norm")(x)
        x = x + MLP(cfg, name="mlp")(h)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        return x, cache


def _remat_block(cfg: LlamaConfig, layer_params=None):
    block = Block
    if layer_params is not None:
        # Inside the remat: the backward pass recomputes the mapped weights from the stored ones instead of
        # keeping one mapped copy per layer alive (QLoRA: only one layer is ever dequantized at a time).
        block = nn.map_variables(Block, "params", trans_in_fn=layer_params)
    if cfg.remat == "none":
        return block
    policy = None if cfg.remat == "full" else jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims
    return nn.remat(block, policy=policy, prevent_cse=not cfg.scan_layers)


class Llama(nn.Module):
    """``LlamaForCausalLM``. Returns ``(logits fp32 (B, T, V), cache)``; cache is None without one.

    ``layer_params`` (optional, apply only): a function of one layer's parameter dict applied inside the
    layer loop, e.g. QLoRA (train/peft.py) dequantizes its stored 4-bit base there, one layer at a time."""

    config: LlamaConfig
    layer_params: Any = None

    @nn.compact
    @with_precision(lambda m: m.config.precision)
    def __call__(self, tokens: Array, positions: Array | None = None, segment_ids: Array | None = None,
                 cache: Any = None, return_hidden: bool = False, logits_at: Array | None = None):
        """``logits_at`` (B,) int: compute logits only at that position of each row (→ (B, 1, V)); a
        prefill needs just the last prompt position, which saves the LM head on every other one."""
        cfg = self.config
        dt = dtype_of(cfg.dtype)
        B, T = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        positions = positions.astype(jnp.int32)

        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dt, param_dtype=dtype_of(cfg.param_dtype),
                         embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), ("vocab", "embed")),
                         name="embed")
        x = embed(tokens)
        x = nn.with_logical_constraint(x, ("batch", "length", "act_embed"))
        cos, sin = rope_cos_sin(positions, cfg.head_dim_, cfg.rope_theta, dt)

        if cache is None:
            # full sequence: causal over sequence indices, inside each packed segment (0 = padding)
            idx = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
            seg = jnp.ones((B, T), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)
            where = {"q_pos": idx, "kv_pos": idx, "q_seg": seg, "kv_seg": seg}
        else:
            if segment_ids is not None:
                raise ValueError("segment_ids is for the full-sequence path; the cached path uses positions")
            # cached: a query at position p reads cache slots <= p (a tiered cache: per tier, in the layer)
            where = None if is_tiered(cache) else cached_where(positions, cache_length(cache))

        block = _remat_block(cfg, self.layer_params)
        if cfg.scan_layers:
            scanned = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, nn.broadcast, 0),
                length=cfg.num_hidden_layers,
                metadata_params={nn.PARTITION_NAME: "layers"},
            )
            x, cache = scanned(cfg, name="layers")(x, cos, sin, where, positions, cache)
        else:
            new = []
            for i in range(cfg.num_hidden_layers):
                layer_cache = None if cache is None else _layer_cache(cache, i)
                x, c = block(cfg, name=f"layers_{i}")(x, cos, sin, where, positions, layer_cache)
                new.append(c)
            cache = None if cache is None else _stack_layer_caches(new, tiered=is_tiered(cache))

        if logits_at is not None:
            x = jnp.take_along_axis(x, logits_at.astype(jnp.int32)[:, None, None], axis=1)
        x = RMSNorm(cfg.rms_norm_eps, cfg, name="final_norm")(x)
        if return_hidden:
            return x, cache
        if cfg.tie_word_embeddings:
            logits = embed.attend(x)
        else:
            w = _weight(self, "lm_head", (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                        nn.initializers.normal(0.02), cfg)
            logits = jnp.einsum("bte,ve->btv", x, w)  # (B, T, V)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "act_vocab"))
        return logits.astype(jnp.float32), cache


def abstract_params(cfg: LlamaConfig):
    """Parameter shapes/dtypes without allocating them, still boxed with their logical axis names
    (``nn.get_partition_spec`` reads those; ``nn.meta.unbox`` strips them)."""
    return jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]


def param_shardings(cfg: LlamaConfig, mesh):
    """NamedSharding of every parameter, from the logical rules (uneven dimensions replicated)."""
    from .. import sharding as shd

    boxed = abstract_params(cfg)
    return shd.logical_sharding(nn.get_partition_spec(boxed), mesh, nn.meta.unbox(boxed))


# ------------------------------------------------------------------------------------------ cache

def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=None):
    """An empty KV cache: stacked ``{"k","v": (L, B, KV, S, D)}`` for scanned layers, else a list of
    per-layer dicts ``{"k","v": (B, KV, S, D)}`` — heads before slots, the layout the attention dots read
    without a copy (:func:`cache_logical_axes` names the axes; callers find them there)."""
    dtype = dtype or dtype_of(cfg.dtype)
    shape = (batch, cfg.num_key_value_heads, max_len, cfg.head_dim_)
    if cfg.scan_layers:
        shape = (cfg.num_hidden_layers,) + shape
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}  # two buffers: donatable
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.num_hidden_layers)]


def tiered_cache(tiers: list) -> dict:
    """Several caches (each from :func:`init_cache`, with its own rows and length) as ONE cache the model
    runs on: the batch's rows are the tiers' rows in order, and each tier's rows attend over their own
    length only. A server holding a few long rows and many short ones reads, per decode step, what the
    rows hold rather than rows × the longest length (serve/engine.py)."""
    return {"tiers": list(tiers)}


def is_tiered(cache) -> bool:
    return isinstance(cache, dict) and "tiers" in cache


def _layer_cache(cache, i: int):
    """Layer ``i``'s part of an unrolled-layers cache (a list of per-layer dicts, or tiers of such lists)."""
    if is_tiered(cache):
        return {"tiers": [tier[i] for tier in cache["tiers"]]}
    return cache[i]


def _stack_layer_caches(per_layer: list, tiered: bool):
    """The per-layer outputs of the unrolled loop back in the input cache's structure."""
    if not tiered:
        return per_layer
    return {"tiers": [[layer["tiers"][t] for layer in per_layer] for t in range(len(per_layer[0]["tiers"]))]}


def cache_length(cache) -> int:
    c = cache if isinstance(cache, dict) else cache[0]
    return c["k"].shape[-2]


CACHE_LOGICAL = ("layers", "batch", "act_kv_heads", "cache_length", None)


def cache_logical_axes(cfg: LlamaConfig):
    """Logical axis names of the cache pytree (for sharding it like the activations)."""
    if cfg.scan_layers:
        return {"k": CACHE_LOGICAL, "v": CACHE_LOGICAL}
    return [{"k": CACHE_LOGICAL[1:], "v": CACHE_LOGICAL[1:]} for _ in range(cfg.num_hidden_layers)]


# ------------------------------------------------------------------------------------------ layouts

def stack_layers(params: dict, num_layers: int) -> dict:
    """Unrolled params (layers_0 … layers_{L-1}) → scanned layout (``layers`` with a leading axis)."""
    p = dict(params)
    layers = [p.pop(f"layers_{i}") for i in range(num_layers)]
    p["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    return p


def unstack_layers(params: dict, num_layers: int) -> dict:
    """Scanned layout → unrolled layout."""
    p = dict(params)
    stacked = p.pop("layers")
    for i in range(num_layers):
        p[f"layers_{i}"] = jax.tree.map(lambda x: x[i], stacked)
    return p
