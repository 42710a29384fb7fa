"""spiritlm-jax: a JAX/Flax reimplementation of Meta's Spirit LM.

The repository's top-level folders ``converters/``, ``infer/``, ``evaluation/`` and ``train/`` are installed
as ``spiritlm_jax.converters``, ``spiritlm_jax.infer``, ``spiritlm_jax.evaluation`` and ``spiritlm_jax.train``.
"""

__version__ = "0.1.0"
