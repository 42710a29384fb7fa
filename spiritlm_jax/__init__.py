"""spiritlm-jax: a JAX/Flax reimplementation of Meta's Spirit LM.

The repository's top-level folders ``converters/``, ``infer/`` and ``train/`` are installed as
``spiritlm_jax.converters``, ``spiritlm_jax.infer`` and ``spiritlm_jax.train``.
"""

__version__ = "0.1.0"
