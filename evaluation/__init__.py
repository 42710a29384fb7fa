"""Evaluation harness: benchmark data readers, batched continuation scoring, metrics, tasks and the
``spiritlm-jax eval`` CLI. Installed as ``spiritlm_jax.evaluation``; it depends on the library and the
generation engine, never on serving internals."""
