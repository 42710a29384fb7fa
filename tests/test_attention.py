"""Attention backends (LlamaConfig.attention, models/attention.py) against the einsum ("xla") path.

Tolerance 1e-5 (fp32), the issue's bound: measured on this config, logits differ by ≤ 2e-7 and
gradients by ≤ 6e-8 (largest gradient entry ≈ 0.14) for chunked, cudnn (XLA implementation off GPU)
and splash (Pallas interpret mode); only the summation order of the softmax differs. Queries that
are padding (segment 0) are excluded: their outputs are unspecified on every backend.
"""
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
import pytest

from spiritlm_jax.config import ConfigError, LlamaConfig
from spiritlm_jax.infer import engine
from spiritlm_jax.models import attention
from spiritlm_jax.models.llama import Llama

TOL = 1e-5
B, T = 2, 256  # two 128-blocks: the online softmax really combines blocks


def _cfg(**kw):
    base = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                num_key_value_heads=2, attention="xla", attention_block=128, max_position_embeddings=512)
    base.update(kw)
    return LlamaConfig(**base)


@pytest.fixture(scope="module")
def setup():
    cfg = _cfg()
    tokens = jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size)
    # three packed documents per row, then padding (segment 0)
    seg = jnp.concatenate([jnp.ones((B, 100), jnp.int32), 2 * jnp.ones((B, 120), jnp.int32),
                           jnp.zeros((B, 36), jnp.int32)], axis=1)
    params = Llama(cfg).init(jax.random.key(0), tokens[:, :4])
    refs = {segments: _value_and_grad(cfg, params, tokens, seg if segments else None) for segments in (False, True)}
    return cfg, tokens, seg, params, refs


def _value_and_grad(cfg, params, tokens, seg):
    valid = (jnp.ones_like(tokens) if seg is None else seg > 0)[..., None]

    def loss(p):
        logits, _ = Llama(cfg).apply(p, tokens, segment_ids=seg)
        return jnp.sum(jnp.where(valid, logits, 0.0) ** 2) / 1000, logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return np.where(np.asarray(valid), np.asarray(logits), 0.0), grads


@pytest.mark.parametrize("segments", [False, True], ids=["causal", "packed"])
@pytest.mark.parametrize("backend", ["chunked", "cudnn", "splash"])
def test_backend_matches_einsum_forward_and_gradients(setup, backend, segments):
    """One layer (splash runs in Pallas interpret mode on CPU: slow); every parameter's gradient."""
    cfg, tokens, seg, params, refs = setup
    seg = seg if segments else None
    ref_logits, ref_grads = refs[segments]
    logits, grads = _value_and_grad(cfg.replace(attention=backend), params, tokens, seg)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_chunked_never_builds_the_full_score_tensor(setup):
    """No intermediate of the chunked forward holds T x T scores (the point of the backend)."""
    cfg, tokens, seg, params, _ = setup
    jaxpr = jax.make_jaxpr(lambda p: Llama(cfg.replace(attention="chunked")).apply(p, tokens, segment_ids=seg))(params)
    sizes = []

    def walk(jp):
        jp = getattr(jp, "jaxpr", jp)
        for eqn in jp.eqns:
            sizes.extend(int(np.prod(v.aval.shape)) for v in eqn.outvars if hasattr(v.aval, "shape"))
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub)

    walk(jaxpr)
    full_scores = B * cfg.num_attention_heads * T * T
    assert max(sizes) < full_scores // 2, (max(sizes), full_scores)
    xla_jaxpr = jax.make_jaxpr(lambda p: Llama(cfg).apply(p, tokens, segment_ids=seg))(params)
    assert any(int(np.prod(v.aval.shape)) >= full_scores for e in xla_jaxpr.jaxpr.eqns for v in e.outvars)


def test_cached_prefill_and_decode_agree_across_backends(setup):
    """generate() prefills through the backend (chunked; splash falls back to chunked there): same greedy ids."""
    cfg, _, _, params, _ = setup
    prompts = [[i % 60 + 1 for i in range(139)], list(range(5, 40))]
    sampling = engine.SamplingConfig(max_new_tokens=6)
    ref, ref_logits = engine.generate(cfg, params["params"], prompts, sampling, return_logits=True, eos_id=-1)
    for backend in ("chunked", "splash"):
        got, got_logits = engine.generate(cfg.replace(attention=backend), params["params"], prompts, sampling,
                                          return_logits=True, eos_id=-1)
        assert got == ref, backend
        np.testing.assert_allclose(got_logits, ref_logits, atol=TOL, rtol=0)


def test_auto_picks_per_platform_and_bad_values_are_refused():
    assert attention.resolve_backend("auto", "tpu") == "splash"
    assert attention.resolve_backend("auto", "gpu") == "cudnn"
    assert attention.resolve_backend("auto", "cpu") == "xla"
    assert attention.resolve_backend("chunked", "tpu") == "chunked"
    with pytest.raises(ConfigError, match="attention must be one of"):
        _cfg(attention="flash")
    with pytest.raises(ConfigError, match="attention_block must be a positive"):
        _cfg(attention_block=0)


# ---------------------------------------------------------------------------------------- splash on a mesh

MESH = (2, 2, 2)  # (data, fsdp, tensor) on the 8 simulated CPU devices (conftest.py)
MB = 4  # rows: one per (data, fsdp) shard; 4 query heads / 2 kv heads: one kv group per tensor shard


@pytest.fixture(scope="module")
def mesh_setup(setup):
    cfg, _, seg, params, _ = setup
    tokens = jax.random.randint(jax.random.key(2), (MB, T), 0, cfg.vocab_size)
    seg = jnp.concatenate([seg, seg[:, ::-1]])  # rows 2-3: padding first, then two documents
    refs = {segments: _value_and_grad(cfg, params, tokens, seg if segments else None) for segments in (False, True)}
    return cfg, tokens, seg, params, refs


def _splash_shard_maps(fn, *args):
    """The shard_map equations (anywhere in the jaxpr of ``fn``) whose body holds a pallas_call."""
    from jax.extend import core as jex_core

    found = []

    def subjaxprs(eqn):
        for v in eqn.params.values():
            for s in (v if isinstance(v, (tuple, list)) else (v,)):
                j = getattr(s, "jaxpr", s)
                if isinstance(j, jex_core.Jaxpr):
                    yield j

    def has_pallas(jp):
        return any(e.primitive.name == "pallas_call" or any(has_pallas(s) for s in subjaxprs(e)) for e in jp.eqns)

    def walk(jp):
        for e in jp.eqns:
            if e.primitive.name == "shard_map" and any(has_pallas(s) for s in subjaxprs(e)):
                found.append(e)
            for s in subjaxprs(e):
                walk(s)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("segments", [False, True], ids=["causal", "packed"])
def test_splash_under_a_mesh_matches_einsum_forward_and_gradients(mesh_setup, segments):
    """splash inside shard_map on a (2, 2, 2) mesh (rows over data x fsdp, heads over tensor, per-shard
    kernel in interpret mode) equals the single-device xla backend: logits and every parameter's gradient."""
    from spiritlm_jax import sharding as shd

    cfg, tokens, seg, params, refs = mesh_setup
    seg = seg if segments else None
    ref_logits, ref_grads = refs[segments]
    mesh = shd.make_mesh(MESH)
    with shd.mesh_context(mesh):
        logits, grads = _value_and_grad(cfg.replace(attention="splash"), params, tokens, seg)
    np.testing.assert_allclose(logits, ref_logits, atol=TOL, rtol=0)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=TOL, rtol=0, err_msg=jax.tree_util.keystr(path))


def test_splash_shard_map_splits_rows_and_heads_and_keeps_kv_heads():
    """The kernel's shard_map takes q (B, H, T, D) split (data, fsdp) x tensor and k/v with their own KV
    heads (native GQA: never repeated to H); the forward and the backward are each one shard_map. Without
    a mesh (or on one device) there is no shard_map."""
    from jax.sharding import PartitionSpec as P

    from spiritlm_jax import sharding as shd

    q = jnp.zeros((MB, T, 4, 8))
    k = jnp.zeros((MB, T, 2, 8))
    seg = jnp.ones((MB, T), jnp.int32)
    loss = lambda q, k, v: jnp.sum(attention.splash_attention(q, k, v, seg, 128) ** 2)  # noqa: E731
    with shd.mesh_context(shd.make_mesh(MESH)):
        assert len(_splash_shard_maps(jax.grad(loss, (0, 1, 2)), q, k, k)) == 2  # forward, backward
        (fwd,) = _splash_shard_maps(loss, q, k, k)
    split = P(("data", "fsdp"), "tensor", None, None)
    # the operands (after the kernel's closed-over mask tables, replicated P()) and the result
    operands = [(v.aval.shape, s) for v, s in zip(fwd.invars, fwd.params["in_specs"]) if v.aval.ndim == 4]
    assert operands == [((MB, 4, T, 8), split), ((MB, 2, T, 8), split), ((MB, 2, T, 8), split)]
    assert [(v.aval.shape, s) for v, s in zip(fwd.outvars, fwd.params["out_specs"])] == [((MB, 4, T, 8), split)]
    assert not _splash_shard_maps(jax.grad(loss, (0, 1, 2)), q, k, k)  # no mesh
    with shd.mesh_context(shd.make_mesh((1, 1, 1), devices=jax.devices()[:1])):
        assert not _splash_shard_maps(jax.grad(loss, (0, 1, 2)), q, k, k)


def test_splash_picks_mosaic_or_interpret_when_lowered():
    """One traced program, two lowerings from this CPU host: for TPU it holds the Mosaic kernels (forward,
    dq, dkv: tpu_custom_call), for CPU none (interpret mode). The choice is made at lowering time, not from
    jax.default_backend() when tracing (what an AOT compile for a TPU target needs)."""
    from spiritlm_jax import sharding as shd
    from spiritlm_jax.train.aot import mosaic_calls

    q = jax.ShapeDtypeStruct((MB, T, 4, 128), jnp.bfloat16)
    k = jax.ShapeDtypeStruct((MB, T, 2, 128), jnp.bfloat16)
    seg = jax.ShapeDtypeStruct((MB, T), jnp.int32)
    loss = lambda q, k, v, s: jnp.sum(attention.splash_attention(q, k, v, s, 128).astype(jnp.float32) ** 2)  # noqa: E731
    with shd.mesh_context(shd.make_mesh(MESH)):
        traced = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k, seg)
        tpu = traced.lower(lowering_platforms=("tpu",)).as_text()
        cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert mosaic_calls(tpu) == 3 and mosaic_calls(cpu) == 0


def _kernel_dot_precisions(fn, *args):
    """The precision of every dot_general inside a pallas_call kernel in the jaxpr of ``fn``."""
    from jax.extend import core as jex_core

    out = []

    def walk(jp, inside):
        for e in jp.eqns:
            if e.primitive.name == "dot_general" and inside:
                out.append(e.params["precision"])
            for v in e.params.values():
                for s in (v if isinstance(v, (tuple, list)) else (v,)):
                    j = getattr(s, "jaxpr", s)
                    if isinstance(j, jex_core.Jaxpr):
                        walk(j, inside or e.primitive.name == "pallas_call")

    walk(jax.make_jaxpr(fn)(*args).jaxpr, False)
    return out


def test_splash_bf16_kernels_run_at_default_precision_forward_and_backward():
    """Under HIGHEST (the model's float32 precision_scope) the bf16 kernels' dots, forward and backward, are
    traced at DEFAULT precision (Mosaic refuses bf16 dots at fp32 contract precision: "Bad lhs type"), and
    the bf16 gradients still match the xla backend's at bf16 tolerance. fp32 keeps the caller's precision."""
    ks = jax.random.split(jax.random.key(3), 3)
    q = jax.random.normal(ks[0], (1, T, 4, 16))
    k, v = jax.random.normal(ks[1], (1, T, 2, 16)), jax.random.normal(ks[2], (1, T, 2, 16))
    seg = jnp.ones((1, T), jnp.int32)
    idx = jnp.broadcast_to(jnp.arange(T), (1, T))
    where = {"q_pos": idx, "kv_pos": idx, "q_seg": seg, "kv_seg": seg}

    def loss(f):
        return lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32) ** 2) / 1000

    splash = jax.grad(loss(lambda q, k, v: attention.splash_attention(q, k, v, seg, 128)), (0, 1, 2))
    xla = jax.grad(loss(lambda q, k, v: attention.xla_attention(q, k, v, where)), (0, 1, 2))
    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        precisions = set(_kernel_dot_precisions(splash, *bf16))
        assert precisions == {(lax.Precision.DEFAULT, lax.Precision.DEFAULT)}, precisions
        assert set(_kernel_dot_precisions(splash, q, k, v)) == {(lax.Precision.HIGHEST, lax.Precision.HIGHEST)}
        got, ref = jax.jit(splash)(*bf16), jax.jit(xla)(*bf16)
    for g, r in zip(got, ref):  # bf16: 8 mantissa bits; both round p and the products to bf16
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(r, np.float32), atol=2e-2, rtol=0)
