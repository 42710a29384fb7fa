"""Attention backends of the Llama backbone, behind one config field, ``LlamaConfig.attention``.

Every backend computes the same thing: grouped-query softmax attention where query i of a row may
read key j iff ``kv_pos[j] <= q_pos[i]`` and ``q_seg[i] == kv_seg[j] != 0`` (causal, inside a packed
segment, never padding). The caller (``Llama``) describes that rule with four integer arrays
(``where``): sequence indices and segment ids for the full-sequence path (training, scoring), cache
slots and positions for the cached path (prefill, decode).

* ``xla``: two einsums around a materialised (B, KV, G, T, S) fp32 score tensor — the reference.
* ``chunked``: flash-style blockwise attention in plain XLA, for any backend: queries in blocks of
  ``attention_block`` (``lax.map``), keys/values in blocks (``lax.scan``) with an online softmax
  (running max, running sum, rescaled accumulator), each KV step rematerialised in the backward
  pass. Memory is O(block² · heads) for the scores instead of O(T · S · heads). It computes every
  block (no causal block skipping), so it costs up to 2x the FLOPs of a causal kernel.
* ``cudnn``: ``jax.nn.dot_product_attention(implementation="cudnn")`` — cuDNN flash attention on
  NVIDIA GPUs, the rule given as one boolean (B, 1, T, S) mask shared by all heads. Off GPU the same
  call runs JAX's XLA implementation (that is how CPU tests check it).
* ``splash``: the TPU splash-attention Pallas kernel shipped in JAX
  (``jax.experimental.pallas.ops.tpu.splash_attention``) with a causal mask and segment ids,
  grouped-query natively (K/V keep their KV heads). Mosaic on TPU, Pallas interpret mode elsewhere
  (slow: for tests), chosen when the program is lowered (``lax.platform_dependent``), so an AOT compile
  for a TPU target from a CPU host gets the real kernel. Under a mesh of more than one device
  (``jax.sharding.get_abstract_mesh()``) it runs inside ``jax.shard_map``: rows over the mesh axes of
  the logical ``batch`` axis, heads over those of ``act_heads`` (``sharding.py``), one per-shard kernel
  per device; nothing is gathered. bf16 kernels run at default matmul precision, forward and backward
  (Mosaic refuses bf16 dots at the fp32 contract precision the model's ``precision_scope`` sets). The
  full-sequence path only: the cached path's per-row positions are not a static mask, so a cached
  prefill with ``splash`` runs ``chunked``.
* ``auto``: ``splash`` on TPU, ``cudnn`` on GPU, ``xla`` elsewhere.

Decode steps (one query per row) always use ``xla``: a (B, KV, G, 1, S) score tensor is small, and
no fused kernel beats a matrix-vector product there. The KV cache is heads-major, (B, KV, S, D)
(:func:`attend_cached`): the two decode dots batch over its leading axes and read it in place.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

Array = jax.Array
NEG_INF = float(jnp.finfo(jnp.float32).min)
BACKENDS = ("auto", "xla", "chunked", "cudnn", "splash")


def resolve_backend(name: str, platform: str | None = None) -> str:
    """The concrete backend ``name`` means on ``platform`` (default: JAX's default backend)."""
    if name != "auto":
        return name
    platform = platform or jax.default_backend()
    return {"tpu": "splash", "gpu": "cudnn"}.get(platform, "xla")


def allowed(where: dict) -> Array:
    """(B, T, S) bool: query i may read key j (see module doc)."""
    causal = where["kv_pos"][:, None, :] <= where["q_pos"][:, :, None]
    same = where["q_seg"][:, :, None] == where["kv_seg"][:, None, :]
    return causal & same & (where["kv_seg"][:, None, :] != 0)


def attend(q: Array, k: Array, v: Array, where: dict, cfg, *, full_sequence: bool) -> Array:
    """q (B, T, H, D), k and v (B, S, KV, D) → (B, T, H, D) in q's dtype. ``full_sequence``: the
    uncached path (query i and key i are the same token), else the cached path."""
    backend = resolve_backend(cfg.attention)
    if q.shape[1] == 1 or backend == "xla":
        return xla_attention(q, k, v, where)
    if backend == "chunked":
        return chunked_attention(q, k, v, where, cfg.attention_block)
    if backend == "cudnn":
        return cudnn_attention(q, k, v, where)
    if backend == "splash":
        if full_sequence:
            return splash_attention(q, k, v, where["q_seg"], cfg.attention_block)
        return chunked_attention(q, k, v, where, cfg.attention_block)
    raise ValueError(f"unknown attention backend {backend!r}; use one of {list(BACKENDS)}")


def attend_cached(q: Array, k_cache: Array, v_cache: Array, where: dict, cfg) -> Array:
    """The cached path (prefill, decode): q (B, T, H, D) against a heads-major cache k, v (B, KV, S, D) →
    (B, T, H, D). Decode steps and ``xla`` read the cache in place; the blockwise backends take the
    slots-major layout (one transpose of the cache per call, paid by prefill only)."""
    backend = resolve_backend(cfg.attention)
    if q.shape[1] == 1 or backend == "xla":
        return xla_attention_cached(q, k_cache, v_cache, where)
    k, v = jnp.swapaxes(k_cache, 1, 2), jnp.swapaxes(v_cache, 1, 2)  # (B, S, KV, D)
    return attend(q, k, v, where, cfg, full_sequence=False)


def xla_attention_cached(q: Array, k: Array, v: Array, where: dict) -> Array:
    """:func:`xla_attention` on a heads-major cache k, v (B, KV, S, D): both dots batch over (B, KV), the
    cache's leading axes, so XLA reads it where it lies."""
    B, T, H, D = q.shape
    qg = _group(q, k.shape[1])  # (B, T, KV, G, D)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k).astype(jnp.float32) * (D ** -0.5)  # (B, KV, G, T, S)
    scores = jnp.where(allowed(where)[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bksd->btkgd", probs, v).reshape(B, T, H, D)


def _group(q: Array, kv_heads: int) -> Array:
    B, T, H, D = q.shape
    return q.reshape(B, T, kv_heads, H // kv_heads, D)


def xla_attention(q: Array, k: Array, v: Array, where: dict) -> Array:
    B, T, H, D = q.shape
    qg = _group(q, k.shape[2])  # (B, T, KV, G, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k).astype(jnp.float32) * (D ** -0.5)  # (B, KV, G, T, S)
    scores = jnp.where(allowed(where)[:, None, None], scores, NEG_INF)
    probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(B, T, H, D)


def _pad_axis1(x: Array, multiple: int, value=0) -> Array:
    n = x.shape[1]
    pad = -n % multiple
    if not pad:
        return x
    widths = [(0, 0)] * x.ndim
    widths[1] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def chunked_attention(q: Array, k: Array, v: Array, where: dict, block: int) -> Array:
    """Blockwise attention with an online softmax (see module doc); never builds T x S scores."""
    B, T, H, D = q.shape
    S, KV = k.shape[1], k.shape[2]
    G = H // KV
    bq, bk = min(block, T), min(block, S)
    # pad to whole blocks; padded keys get segment 0 (never read), padded queries are cut off below
    qg = _pad_axis1(_group(q, KV), bq)
    q_pos, q_seg = _pad_axis1(where["q_pos"], bq), _pad_axis1(where["q_seg"], bq)
    k, v = _pad_axis1(k, bk), _pad_axis1(v, bk)
    kv_pos, kv_seg = _pad_axis1(where["kv_pos"], bk), _pad_axis1(where["kv_seg"], bk)
    nq, nk = qg.shape[1] // bq, k.shape[1] // bk
    scale = D ** -0.5

    def blocks(x, n, size):  # (B, n·size, ...) → (n, B, size, ...)
        return jnp.moveaxis(x.reshape(x.shape[0], n, size, *x.shape[2:]), 1, 0)

    kv_blocks = (blocks(k, nk, bk), blocks(v, nk, bk), blocks(kv_pos, nk, bk), blocks(kv_seg, nk, bk))

    def one_query_block(args):
        qb, qp, qs = args  # (B, bq, KV, G, D), (B, bq), (B, bq)

        @jax.checkpoint
        def step(carry, kv):
            m, l, acc = carry  # (B, KV, G, bq) running max and sum (fp32), acc (B, bq, KV, G, D) fp32
            kb, vb, kp, ks = kv
            s = jnp.einsum("btkgd,bskd->bkgts", qb, kb).astype(jnp.float32) * scale  # (B, KV, G, bq, bk)
            ok = ((kp[:, None, :] <= qp[:, :, None]) & (qs[:, :, None] == ks[:, None, :])
                  & (ks[:, None, :] != 0))[:, None, None]  # (B, 1, 1, bq, bk)
            s = jnp.where(ok, s, NEG_INF)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1))
            p = jnp.where(ok, jnp.exp(s - m_new[..., None]), 0.0)
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            pv = jnp.einsum("bkgts,bskd->btkgd", p.astype(vb.dtype), vb).astype(jnp.float32)
            acc = acc * jnp.moveaxis(corr, -1, 1)[..., None] + pv
            return (m_new, l, acc), None

        init = (jnp.full((B, KV, G, bq), NEG_INF, jnp.float32), jnp.zeros((B, KV, G, bq), jnp.float32),
                jnp.zeros((B, bq, KV, G, D), jnp.float32))
        (m, l, acc), _ = lax.scan(step, init, kv_blocks)
        l = jnp.moveaxis(l, -1, 1)[..., None]  # (B, bq, KV, G, 1)
        return jnp.where(l > 0, acc / jnp.where(l > 0, l, 1.0), 0.0)

    out = lax.map(one_query_block, (blocks(qg, nq, bq), blocks(q_pos, nq, bq), blocks(q_seg, nq, bq)))
    out = jnp.moveaxis(out, 0, 1).reshape(B, nq * bq, H, D)
    return out[:, :T].astype(q.dtype)


def cudnn_attention(q: Array, k: Array, v: Array, where: dict) -> Array:
    implementation = "cudnn" if jax.default_backend() == "gpu" else None
    mask = allowed(where)[:, None]  # (B, 1, T, S) bool, broadcast over heads: 1 byte per pair, not 4·heads
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=q.shape[-1] ** -0.5,
                                        implementation=implementation).astype(q.dtype)


def _splash_kernel(heads: int, length: int, block: int, interpret: bool):
    """One shard's kernel: ``heads`` query heads (the per-shard count) over ``length`` tokens."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    mask = masks.MultiHeadMask([masks.CausalMask((length, length)) for _ in range(heads)])
    sizes = kernel.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                              block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # built per trace, never cached across traces: the kernel object holds its mask tables as arrays
    return kernel.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash_rows(q: Array, k: Array, v: Array, seg: Array, block: int, interpret: bool) -> Array:
    """q (b, H, T, D), k and v (b, KV, T, D), seg (b, T) → (b, H, T, D): the kernel per row (vmap).
    Grouped-query natively: the MHA kernel maps query head h to kv head h // (H / KV) itself, so K/V
    are never repeated to H heads."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel

    run = _splash_kernel(q.shape[1], q.shape[2], block, interpret)
    return jax.vmap(lambda a, b, c, s: run(a, b, c, segment_ids=kernel.SegmentIds(q=s, kv=s)))(q, k, v, seg)


def _splash_local(q: Array, k: Array, v: Array, seg: Array, block: int) -> Array:
    """:func:`_splash_rows` on this device's rows and heads. Mosaic or interpret mode is chosen when the
    program is LOWERED (``lax.platform_dependent``), not from the host's default backend when it is traced:
    an AOT compile for a TPU target from a CPU host gets the real kernel, a CPU run gets interpret mode.
    Below fp32 (bf16) the kernel runs at default matmul precision (:func:`_default_precision`); fp32 inputs
    keep the caller's precision (no silent single bf16 pass)."""
    def call(q, k, v, seg):
        return lax.platform_dependent(q, k, v, seg, tpu=lambda *a: _splash_rows(*a, block, False),
                                      default=lambda *a: _splash_rows(*a, block, True))

    if q.dtype != jnp.float32:
        call = _default_precision(call)
    return call(q, k, v, seg)


def _default_precision(fn):
    """``fn`` traced at default matmul precision, its forward AND its backward (a custom_vjp around the
    vjp of ``fn``). Mosaic refuses bf16 dots at fp32 contract precision ("Mosaic failed to compile TPU
    kernel: Bad lhs type" from the TPU compiler), and the model traces under ``precision_scope(cfg.precision)``
    (float32 = HIGHEST, the default, also in training). A context manager around the call
    alone would cover the forward only: the kernel's backward is traced later, when the gradient is
    transposed, under whatever precision surrounds ``jax.grad``."""
    @jax.custom_vjp
    def call(*args):
        with jax.default_matmul_precision("default"):
            return fn(*args)

    def fwd(*args):
        with jax.default_matmul_precision("default"):
            return jax.vjp(fn, *args)  # (out, the pullback: a pytree of residuals)

    def bwd(pullback, g):
        with jax.default_matmul_precision("default"):
            return pullback(g)

    call.defvjp(fwd, bwd)
    return call


def _splash_specs(mesh, B: int, H: int, KV: int):
    """shard_map specs for q (B, H, T, D), k/v (B, KV, T, D), seg (B, T): rows over the mesh axes of the
    logical ``batch`` axis, heads over those of ``act_heads`` (sharding.py's rules; one owner). A dimension
    the axes do not divide is replicated; heads are split only if both H and KV divide (each shard keeps
    whole query groups with their kv head)."""
    from .. import sharding as shd

    row = shd.fit_spec(shd.logical_spec("batch"), (B,), mesh)[0]
    heads = shd.logical_spec("act_heads")[0]
    kv_heads = shd.logical_spec("act_kv_heads")[0]  # one at a time: flax maps a mesh axis once per spec
    if (heads != kv_heads or shd.fit_spec(P(heads), (H,), mesh) != P(heads)
            or shd.fit_spec(P(kv_heads), (KV,), mesh) != P(kv_heads)):
        heads = None
    return P(row, heads, None, None), P(row, heads, None, None), P(row, None)


def splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, block: int) -> Array:
    """Full-sequence causal attention with packed segments through the splash kernel. Under a mesh of
    more than one device (``jax.sharding.get_abstract_mesh()``, e.g. ``sharding.mesh_context``) the
    kernel runs inside ``jax.shard_map``: each device computes its own rows and heads, nothing gathered."""
    B, T, H, D = q.shape
    KV = k.shape[2]
    block = min(block, -(-T // 128) * 128)  # splash blocks are multiples of 128
    pad = -T % block
    seg = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, pad)))  # padded tokens: segment 0
    widths = ((0, 0), (0, pad), (0, 0), (0, 0))
    # (B, T, heads, D) → (B, heads, T, D); k, v keep their KV heads (grouped-query kernel)
    qh = jnp.pad(q * jnp.asarray(D ** -0.5, q.dtype), widths).transpose(0, 2, 1, 3)
    kh, vh = (jnp.pad(x, widths).transpose(0, 2, 1, 3) for x in (k, v))
    local = lambda a, b, c, s: _splash_local(a, b, c, s, block)  # noqa: E731
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        qs, kvs, ss = _splash_specs(mesh, B, H, KV)
        # check_vma=False: pallas_call outputs carry no varying-manual-axes type
        local = jax.shard_map(local, mesh=mesh, in_specs=(qs, kvs, kvs, ss), out_specs=qs, check_vma=False)
    out = local(qh, kh, vh, seg)
    return out.transpose(0, 2, 1, 3)[:, :T].astype(q.dtype)
