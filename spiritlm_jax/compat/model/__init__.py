"""``spiritlm.model`` of the original (see :mod:`spiritlm_jax.compat`)."""
