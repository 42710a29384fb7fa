"""Llama backbone: parity with transformers' LlamaForCausalLM, KV-cache decode, padded batches, layouts."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax.config import ConfigError, LlamaConfig
from spiritlm_jax.converters.llama import convert_llama, load_converted, load_hf_params
from spiritlm_jax.infer.engine import SamplingConfig, generate
from spiritlm_jax.models.llama import Llama, init_cache, stack_layers, tiered_cache, unstack_layers

from llama_helpers import VARIANTS, hf_logits, make_hf_model, save_hf

# fp32 logits tolerance (the target). Measured max |Δ| on these tiny models: ~2e-6.
TOL = 1e-5

MODEL_KINDS = {
    "mha_untied_theta1e4": dict(gqa=False, tied=False, theta=1e4),
    "gqa_tied_theta1e5": dict(gqa=True, tied=True, theta=1e5),
    "gqa_untied_theta1e5": dict(gqa=True, tied=False, theta=1e5),
    "mha_tied_theta1e4": dict(gqa=False, tied=True, theta=1e4),
}


@pytest.fixture(scope="module")
def ids():
    return np.random.default_rng(0).integers(0, 256, size=(2, 19)).astype(np.int64)


def _apply(cfg, params, tokens, **kw):
    return np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(tokens), **kw)[0])


@pytest.mark.parametrize("kind", list(MODEL_KINDS))
@pytest.mark.parametrize("variant", VARIANTS)
def test_convert_every_variant_matches_transformers(tmp_path, kind, variant, ids):
    model = make_hf_model(seed=hash(kind) % 1000, **MODEL_KINDS[kind])
    src = save_hf(model, tmp_path / "hf", variant)
    ref = hf_logits(model, ids)
    scan = variant in ("bin", "safetensors")  # cover both stored layouts
    out = convert_llama(src, tmp_path / "conv", scan_layers=scan)
    cfg, params = load_converted(out)
    assert cfg.scan_layers == scan
    got = _apply(cfg, params, ids)
    assert np.abs(got - ref).max() <= TOL


def test_both_layouts_and_relayout_agree(tmp_path, ids):
    model = make_hf_model(**MODEL_KINDS["gqa_untied_theta1e5"])
    src = save_hf(model, tmp_path / "hf", "bin")
    cfg_s, p_s = load_hf_params(src, scan_layers=True)
    cfg_u, p_u = load_hf_params(src, scan_layers=False)
    a = _apply(cfg_s, p_s, ids)
    b = _apply(cfg_u, p_u, ids)
    assert np.abs(a - b).max() <= TOL
    restacked = stack_layers(jax.tree.map(jnp.asarray, p_u), cfg_u.num_hidden_layers)
    np.testing.assert_array_equal(np.asarray(restacked["layers"]["attn"]["q"]), p_s["layers"]["attn"]["q"])
    un = unstack_layers(restacked, cfg_s.num_hidden_layers)
    np.testing.assert_array_equal(np.asarray(un["layers_1"]["mlp"]["down"]), p_u["layers_1"]["mlp"]["down"])
    # load_converted can switch layout at restore time
    out = convert_llama(src, tmp_path / "conv", scan_layers=True)
    cfg_r, p_r = load_converted(out, scan_layers=False)
    assert "layers_0" in p_r and not cfg_r.scan_layers
    assert np.abs(_apply(cfg_r, p_r, ids) - a).max() <= TOL


@pytest.mark.parametrize("scan", [True, False])
def test_kv_cache_decode_equals_full_forward(tmp_path, scan, ids):
    model = make_hf_model(**MODEL_KINDS["gqa_untied_theta1e5"])
    cfg, params = load_hf_params(save_hf(model, tmp_path / "hf", "bin"), scan_layers=scan)
    full = _apply(cfg, params, ids)
    B, T = ids.shape
    cache = init_cache(cfg, B, 32)
    m = Llama(cfg)
    # prefill 7 tokens, then 3 at once, then one by one
    outs = []
    pos = 0
    for n in [7, 3] + [1] * (T - 10):
        chunk = jnp.asarray(ids[:, pos:pos + n])
        positions = jnp.broadcast_to(jnp.arange(pos, pos + n), (B, n))
        lg, cache = m.apply({"params": params}, chunk, positions=positions, cache=cache)
        outs.append(np.asarray(lg))
        pos += n
    assert np.abs(np.concatenate(outs, axis=1) - full).max() <= TOL


@pytest.mark.parametrize("scan", [True, False])
def test_tiered_cache_rows_equal_each_row_alone(tmp_path, scan):
    """A tiered cache (one long row, two short ones, each tier its own length) gives every row what the same
    row gives alone on a one-tier cache, through prefill and decode; a step over a batch that the tiers do
    not cover is refused."""
    model = make_hf_model(**MODEL_KINDS["gqa_untied_theta1e5"])
    cfg, params = load_hf_params(save_hf(model, tmp_path / "hf", "bin"), scan_layers=scan)
    ids = np.random.default_rng(1).integers(0, 256, size=(3, 14)).astype(np.int64)
    m = Llama(cfg)

    def run(cache, rows):
        outs, pos = [], 0
        for n in (9, 1, 1, 1, 1, 1):
            chunk = jnp.asarray(ids[rows, pos:pos + n])
            positions = jnp.broadcast_to(jnp.arange(pos, pos + n), chunk.shape)
            lg, cache = m.apply({"params": params}, chunk, positions=positions, cache=cache)
            outs.append(np.asarray(lg))
            pos += n
        return np.concatenate(outs, axis=1), cache

    tiered, cache = run(tiered_cache([init_cache(cfg, 1, 32), init_cache(cfg, 2, 16)]), [0, 1, 2])
    assert [jax.tree.leaves(t)[0].shape[-2] for t in cache["tiers"]] == [32, 16]
    for r in range(3):
        alone, _ = run(init_cache(cfg, 1, 32), [r])
        assert np.abs(tiered[r] - alone[0]).max() <= TOL, r
    with pytest.raises(ValueError, match="tiered cache holds 3 rows but the batch has 2"):
        m.apply({"params": params}, jnp.zeros((2, 1), jnp.int32), positions=jnp.zeros((2, 1), jnp.int32),
                cache=tiered_cache([init_cache(cfg, 1, 32), init_cache(cfg, 2, 16)]))


def test_padded_batch_equals_each_prompt_alone(tmp_path):
    model = make_hf_model(**MODEL_KINDS["gqa_untied_theta1e5"])
    cfg, params = load_hf_params(save_hf(model, tmp_path / "hf", "bin"))
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, 256, size=n).tolist() for n in (5, 17, 11)]
    s = SamplingConfig(max_new_tokens=9)
    batched, blog = generate(cfg, params, prompts, s, return_logits=True, eos_id=-1)
    for i, p in enumerate(prompts):
        alone, alog = generate(cfg, params, [p], s, return_logits=True, eos_id=-1)
        assert batched[i] == alone[0]
        assert np.abs(blog[i] - alog[0]).max() <= TOL
        # and the first step's logits equal transformers' last-position logits of the prompt alone
        ref = hf_logits(model, np.asarray([p]))[0, -1]
        assert np.abs(alog[0, 0] - ref).max() <= TOL
    # full-sequence path with a padding mask (segment_ids) equals transformers with attention_mask
    T = max(map(len, prompts))
    toks = np.zeros((3, T), np.int64)
    mask = np.zeros((3, T), np.int64)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
        mask[i, : len(p)] = 1
    got = _apply(cfg, params, toks, segment_ids=jnp.asarray(mask))
    ref = hf_logits(model, toks, attention_mask=mask)
    valid = mask.astype(bool)
    assert np.abs(got[valid] - ref[valid]).max() <= TOL


def test_packed_segments_do_not_attend_across(tmp_path):
    model = make_hf_model(**MODEL_KINDS["mha_untied_theta1e4"])
    cfg, params = load_hf_params(save_hf(model, tmp_path / "hf", "bin"))
    a = np.arange(3, 10)
    b = np.arange(20, 31)
    packed = np.concatenate([a, b])[None]
    seg = np.concatenate([np.ones_like(a), 2 * np.ones_like(b)])[None]
    pos = np.concatenate([np.arange(len(a)), np.arange(len(b))])[None]
    got = _apply(cfg, params, packed, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg))
    assert np.abs(got[0, : len(a)] - hf_logits(model, a[None])[0]).max() <= TOL
    assert np.abs(got[0, len(a):] - hf_logits(model, b[None])[0]).max() <= TOL


def test_sampling_processors_follow_hf_order():
    from spiritlm_jax.infer.engine import process_logits

    logits = jnp.asarray(np.random.default_rng(0).normal(size=(4, 100)).astype(np.float32))
    banned = np.zeros((4, 100), bool)
    banned[:, :10] = True
    s = SamplingConfig(do_sample=True, temperature=0.7, top_k=20, top_p=0.8)
    x = np.asarray(process_logits(logits, jnp.asarray(banned), s))
    # compare with transformers' own processors applied in the same order
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    t = torch.tensor(np.asarray(logits))
    t[torch.tensor(banned)] = -float("inf")
    for w in (TemperatureLogitsWarper(0.7), TopKLogitsWarper(20), TopPLogitsWarper(0.8)):
        t = w(None, t)
    ref = t.numpy()
    assert np.array_equal(np.isinf(x), np.isinf(ref))
    fin = np.isfinite(ref)
    assert np.abs(x[fin] - ref[fin]).max() <= 1e-6  # same fp32 division


def test_generation_errors(tmp_path):
    model = make_hf_model(**MODEL_KINDS["mha_untied_theta1e4"])
    cfg, params = load_hf_params(save_hf(model, tmp_path / "hf", "bin"))
    from spiritlm_jax.infer.engine import GenerationError

    with pytest.raises(GenerationError, match="context"):
        generate(cfg, params, [[1] * 120], SamplingConfig(max_new_tokens=20))
    with pytest.raises(GenerationError, match="empty"):
        generate(cfg, params, [[]], SamplingConfig())
    with pytest.raises(GenerationError, match="outside"):
        generate(cfg, params, [[1, 999]], SamplingConfig())
    with pytest.raises(GenerationError, match="bans every token"):
        generate(cfg, params, [[1, 2]], SamplingConfig(), banned=np.ones(256, bool))


def test_config_reads_hf_and_rejects_unsupported(tmp_path):
    base = make_hf_model(**MODEL_KINDS["gqa_tied_theta1e5"]).config.to_dict()
    cfg = LlamaConfig.from_hf(base)
    assert (cfg.num_key_value_heads, cfg.tie_word_embeddings, cfg.rope_theta) == (2, True, 1e5)
    with pytest.raises(ConfigError, match="rope_scaling"):
        LlamaConfig.from_hf({**base, "rope_scaling": {"rope_type": "linear", "factor": 2.0}})
    with pytest.raises(ConfigError, match="rope_type"):
        LlamaConfig.from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}})
    with pytest.raises(ConfigError, match="hidden_act"):
        LlamaConfig.from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConfigError, match="attention_bias"):
        LlamaConfig.from_hf({**base, "attention_bias": True})
    # transformers-5 style rope_parameters
    c5 = LlamaConfig.from_hf({**{k: v for k, v in base.items() if k != "rope_theta"},
                              "rope_parameters": {"rope_type": "default", "rope_theta": 5e4}})
    assert c5.rope_theta == 5e4


# The o projection reads its (heads, head_dim, embed) weight in place (models/llama.py, Attention): heads 4,
# head_dim 6, embed 24 make the weight's shape distinct from every activation's.
O_CFG = dict(vocab_size=64, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _o_contractions(jaxpr, o_shape) -> list:
    """(lhs, rhs) contracting dims of every dot_general whose rhs is an o weight, sub-jaxprs included."""
    found = []

    def walk(jp):
        jp = getattr(jp, "jaxpr", jp)
        for eqn in jp.eqns:
            if eqn.primitive.name == "dot_general" and tuple(eqn.invars[1].aval.shape) == o_shape:
                found.append(tuple(map(tuple, eqn.params["dimension_numbers"][0])))
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None), "eqns"):
                        walk(sub)

    walk(jaxpr)
    return found


@pytest.mark.parametrize("scan", [True, False])
def test_o_projection_reads_its_weight_without_a_copy(scan):
    """A decode step contracts the o weight over (heads, head_dim) in its stored order, and the compiled
    step has no transpose/copy of it: 'bthd,hde' made jnp.einsum contract (head_dim, heads) (it sorts the
    contracted letters), which XLA:CPU served by transposing the whole weight on every call."""
    import re

    cfg = LlamaConfig(**O_CFG, scan_layers=scan)
    H, D, E = cfg.num_attention_heads, cfg.head_dim_, cfg.hidden_size
    assert len({H, D, E}) == 3
    params = Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))
    B = 2

    def step(params, tok, pos, cache):
        return Llama(cfg).apply(params, tok, positions=pos, cache=cache)

    args = (params, jnp.zeros((B, 1), jnp.int32), jnp.full((B, 1), 3, jnp.int32), init_cache(cfg, B, 8))
    found = _o_contractions(jax.make_jaxpr(step)(*args), (H, D, E))
    assert len(found) == (1 if scan else cfg.num_hidden_layers), found
    assert all(rhs == (0, 1) for _, rhs in found), f"o weight contracted out of its stored order: {found}"
    hlo = jax.jit(step).lower(*args).compile().as_text()
    moved = [line.strip() for line in hlo.splitlines()
             if (m := re.search(r"= f32\[([\d,]+)\]\S* (?:transpose|copy)\(", line))
             and sorted(map(int, m.group(1).split(","))) == sorted((H, D, E))]
    assert not moved, f"the compiled decode step moves the o weight: {moved[:3]}"
