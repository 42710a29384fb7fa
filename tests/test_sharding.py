"""Sharded init, sharded load and sharded forward/decode on 8 simulated CPU devices."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax import sharding as shd
from spiritlm_jax.converters.llama import convert_llama, load_converted
from spiritlm_jax.infer.engine import SamplingConfig, generate
from spiritlm_jax.models.llama import Llama

from llama_helpers import make_hf_model, save_hf

# Sharded vs single-device: same math, different reduction splits across devices; measured ≤ 3e-6.
TOL = 1e-5
MESHES = [(8, 1, 1), (1, 8, 1), (2, 2, 2), (1, 2, 4)]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    assert jax.device_count() == 8, "conftest must simulate 8 CPU devices"
    # heads 8 / kv 4 / hidden 64 / mlp 128 / vocab 256: every sharded dimension divides every mesh above
    model = make_hf_model(gqa=True, heads=8, hidden=64, inter=128, vocab=256)
    d = tmp_path_factory.mktemp("shard")
    out = convert_llama(save_hf(model, d / "hf", "bin"), d / "conv")
    cfg, params = load_converted(out)
    ids = np.random.default_rng(0).integers(3, 256, size=(8, 12))
    ref = np.asarray(Llama(cfg).apply({"params": params}, jnp.asarray(ids))[0])
    prompts = [ids[i, : 4 + i].tolist() for i in range(8)]
    ref_gen, ref_log = generate(cfg, params, prompts, SamplingConfig(max_new_tokens=6), return_logits=True, eos_id=-1)
    return out, ids, ref, prompts, ref_gen, ref_log


def _expected_spec(logical, shape, mesh):
    return shd.fit_spec(nn.logical_to_mesh_axes(logical, shd.LOGICAL_RULES), shape, mesh)


@pytest.mark.parametrize("mesh_shape", MESHES)
def test_sharded_load_forward_decode(converted, mesh_shape):
    out, ids, ref, prompts, ref_gen, ref_log = converted
    mesh = shd.make_mesh(mesh_shape)
    cfg, params = load_converted(out, mesh=mesh)

    # every parameter is laid out exactly as the rules table says
    abstract = jax.eval_shape(lambda: Llama(cfg).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))["params"]
    logical = nn.get_partition_spec(abstract)
    flat_p = jax.tree_util.tree_leaves_with_path(params)
    flat_l = dict(jax.tree_util.tree_leaves_with_path(logical, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)))
    n_sharded = 0
    for path, arr in flat_p:
        want = _expected_spec(tuple(flat_l[path]), arr.shape, mesh)
        assert arr.sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, want), arr.ndim), (path, arr.sharding.spec, want)
        n_sharded += any(a is not None for a in want)
    assert n_sharded > 0 or mesh_shape == (8, 1, 1)

    with shd.mesh_context(mesh):
        x = shd.put(jnp.asarray(ids), mesh, "batch", None)
        got = jax.jit(lambda p, t: Llama(cfg).apply({"params": p}, t)[0])(params, x)
    assert np.abs(np.asarray(got) - ref).max() <= TOL

    gen, log = generate(cfg, params, prompts, SamplingConfig(max_new_tokens=6), return_logits=True, eos_id=-1, mesh=mesh)
    assert gen == ref_gen
    assert np.abs(log - ref_log).max() <= TOL


def test_sharded_init_places_params_by_rules():
    from spiritlm_jax.config import LlamaConfig

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=4)
    mesh = shd.make_mesh((2, 2, 2))
    model = Llama(cfg)
    abstract = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32)))
    shardings = shd.logical_sharding(nn.get_partition_spec(abstract), mesh, nn.meta.unbox(abstract))
    with shd.mesh_context(mesh):
        params = jax.jit(lambda k: nn.meta.unbox(model.init(k, jnp.zeros((1, 1), jnp.int32))),
                         out_shardings=nn.meta.unbox(shardings))(jax.random.PRNGKey(0))
    q = params["params"]["layers"]["attn"]["q"]  # (layers, embed, heads, head_dim)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (2, 32, 4, 8)


def test_uneven_dimensions_are_replicated_not_rejected():
    mesh = shd.make_mesh((1, 2, 4))
    spec = shd.fit_spec(jax.sharding.PartitionSpec("tensor", "fsdp"), (32667, 64), mesh)
    assert spec == jax.sharding.PartitionSpec(None, "fsdp")


def test_mesh_shape_errors():
    with pytest.raises(ValueError, match="needs 16 devices"):
        shd.make_mesh((4, 4, 1))
    assert shd.make_mesh((2, -1, 2)).shape["fsdp"] == 2
    with pytest.raises(ValueError, match="unknown mesh axes"):
        shd.make_mesh({"model": 8})
