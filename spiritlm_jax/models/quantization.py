"""Post-training weight quantization of the Llama backbone with qwix (int8 or int4).

qwix (Google's JAX quantization library) intercepts the einsums of a linen module and, with
``PtqProvider``, feeds them weights stored as ``QArray`` (integer values + per-channel fp32 scales,
absmax calibration). Every matmul weight of a layer (attn q/k/v/o, mlp gate/up/down) and the untied
LM head is quantized; embeddings and norms stay in their dtype. Activations are not quantized
(weight-only), so the math is ``x · (q · scale)``: at batch 1 decode is bound by the bytes of
weights read, which fall 4x (int8) or 8x (int4) on hardware and kernels that read the integers.

Use: ``cfg = cfg.replace(quantize="int8")``; ``params = quantize_params(cfg, params)``; then every
entry point that builds the model through :func:`llama_module` (generation, scoring, serving)
runs the quantized model. ``SpiritLM.from_pretrained(..., quantize="int8")`` does both.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

QUANTIZE_MODES = ("int8", "int4")


class QuantizationError(ValueError):
    """A quantization mode we do not support, or params that do not fit the config."""


def _rules(mode: str):
    import qwix

    if mode not in QUANTIZE_MODES:
        raise QuantizationError(f"quantize={mode!r} is not supported; use one of {list(QUANTIZE_MODES)} or None")
    # every einsum of the model, whatever its path (layers_i/attn, layers_i/mlp, lm_head)
    return [qwix.QtRule(module_path=".*", weight_qtype=mode)]


def llama_module(cfg) -> nn.Module:
    """``Llama(cfg)``, wrapped by qwix when ``cfg.quantize`` is set (params must then come from
    :func:`quantize_params`)."""
    from spiritlm_jax.models.llama import Llama

    if cfg.quantize is None:
        return Llama(cfg)
    import qwix

    return qwix.quantize_model(Llama(cfg), qwix.PtqProvider(_rules(cfg.quantize)))


def quantize_params(cfg, params):
    """fp params (the ``params`` collection of ``Llama(cfg without quantize)``) → the quantized
    pytree ``llama_module(cfg)`` takes. ``cfg.quantize`` names the mode."""
    import qwix

    if cfg.quantize is None:
        raise QuantizationError("quantize_params needs cfg.quantize ('int8' or 'int4')")
    if cfg.dtype != cfg.param_dtype:
        raise QuantizationError(
            f"quantized inference keeps the activations in the params' dtype; got dtype={cfg.dtype!r} with "
            f"param_dtype={cfg.param_dtype!r}: load with the same dtype for both")
    tokens = jnp.zeros((1, 1), jnp.int32)
    abstract = jax.eval_shape(llama_module(cfg).init, jax.random.PRNGKey(0), tokens)["params"]
    return qwix.quantize_params(nn.meta.unbox(params), abstract)


def weight_bytes(params) -> int:
    """Bytes of every array in a (possibly quantized) params pytree: int4 counted at half a byte."""
    total = 0
    for leaf in jax.tree.leaves(params):
        n = int(leaf.size)
        total += n // 2 if leaf.dtype == jnp.int4 else n * leaf.dtype.itemsize
    return total
