"""qwix int8 / int4 weight-only quantized inference (models/quantization.py) through generate() and
SpiritLM.from_pretrained(quantize=...).

Tolerances are measured on this tiny random model (first-step logits, max |fp32 logit| ≈ 0.68):
int8 max abs error 0.009 (1.4 %), int4 0.19 (28 %); the bounds below leave ~1.5x margin. Greedy
agreement is NOT asserted here: random weights give near-flat logits whose argmax flips under any
perturbation (bench/quant_bench.py reports agreement over 256 steps on the benchmark model).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax.config import ConfigError, LlamaConfig
from spiritlm_jax.infer import engine
from spiritlm_jax.models.llama import Llama
from spiritlm_jax.models.quantization import QuantizationError, quantize_params, weight_bytes

BOUND = {"int8": 0.02, "int4": 0.42}  # of max |logit|


@pytest.fixture(scope="module")
def model():
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, scan_layers=False)
    params = nn.meta.unbox(Llama(cfg).init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    return cfg, params


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_generate_logit_error_and_bytes(model, mode):
    cfg, params = model
    prompts = [list(range(1, 20)), list(range(30, 41))]
    sampling = engine.SamplingConfig(max_new_tokens=4)
    _, ref = engine.generate(cfg, params, prompts, sampling, return_logits=True, eos_id=-1)
    qcfg = cfg.replace(quantize=mode)
    qparams = quantize_params(qcfg, params)
    ids, got = engine.generate(qcfg, qparams, prompts, sampling, return_logits=True, eos_id=-1)
    assert [len(r) for r in ids] == [4, 4]
    err = np.abs(got[:, 0] - ref[:, 0]).max() / np.abs(ref[:, 0]).max()
    assert 0 < err <= BOUND[mode], err  # > 0: the quantized weights really are used
    # every matmul weight is stored as integers: int8 ≈ 1/4, int4 ≈ 1/8 of their fp32 bytes (+ scales, embedding)
    q_leaves = [x for x in jax.tree.leaves(qparams) if x.dtype in (jnp.int8, jnp.int4)]
    assert len(q_leaves) == 7 * cfg.num_hidden_layers + 1  # q k v o gate up down per layer + lm_head
    assert weight_bytes(qparams) < (0.4 if mode == "int8" else 0.3) * weight_bytes(params)


def test_from_pretrained_quantize_generates(golden_dir):
    from spiritlm_jax.spiritlm import SpiritLM

    lm = SpiritLM.from_pretrained(golden_dir / "checkpoints" / "spiritlm_model" / "spirit-lm-base-7b",
                                  with_speech=False, quantize="int8")
    assert lm.cfg.quantize == "int8"
    assert any(x.dtype == jnp.int8 for x in jax.tree.leaves(lm.params))
    _, ids = lm.generate_batch(prompts=["[Text]hello"], output_modality="text", max_new_tokens=3, return_ids=True)
    assert 1 <= len(ids[0]) <= 3 and all(0 <= t < lm.cfg.vocab_size for t in ids[0])


def test_bad_quantize_values_are_refused(model):
    cfg, params = model
    with pytest.raises(ConfigError, match="quantize must be None or one of"):
        cfg.replace(quantize="int2")
    with pytest.raises(QuantizationError, match="needs cfg.quantize"):
        quantize_params(cfg, params)
    with pytest.raises(QuantizationError, match="same dtype for both"):
        quantize_params(cfg.replace(quantize="int8", dtype="bfloat16"), params)
