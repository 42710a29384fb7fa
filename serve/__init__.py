"""spiritlm-jax serving: an OpenAI-compatible speech+text HTTP server (``spiritlm-jax serve``).

    engine.py     continuous batching over decode slots + the prefix cache
    audio.py      incremental vocoding of a growing unit stream (equals one-shot vocoding)
    app.py        the FastAPI app: /v1/completions, /v1/audio/speech, /v1/audio/transcriptions,
                  /v1/spiritlm/generate, /v1/models, /health, /metrics
    metrics.py    Prometheus metrics (prometheus_client)
    schemas.py    the request bodies (pydantic, unknown fields refused)
    cli.py        the ``serve`` subcommand
"""
