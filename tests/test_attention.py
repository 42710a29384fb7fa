"""Attention backends (LlamaConfig.attention, models/attention.py) against the einsum ("xla") path.

Tolerance 1e-5 (fp32), the issue's bound: measured on this config, logits differ by ≤ 2e-7 and
gradients by ≤ 6e-8 (largest gradient entry ≈ 0.14) for chunked, cudnn (XLA implementation off GPU)
and splash (Pallas interpret mode); only the summation order of the softmax differs. Queries that
are padding (segment 0) are excluded: their outputs are unspecified on every backend.
"""
import jax
import jax.numpy as jnp
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
