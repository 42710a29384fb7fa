"""Prometheus metrics of the server (prometheus_client, one registry per app so several apps can live in one
process): queue depth, active slots, generated tokens and tokens/s, time to first token and to first audio,
prefix-cache lookups/hits and the token hit rate, requests by outcome."""
from __future__ import annotations

import collections
import time

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, engine, window_s: float = 10.0):
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.window_s = window_s
        self._samples: collections.deque = collections.deque()
        engine.observer = self
        Gauge("spiritlm_queue_depth", "requests waiting for a slot", registry=r).set_function(
            lambda: engine.queue_depth)
        Gauge("spiritlm_active_slots", "decode slots in use", registry=r).set_function(lambda: engine.active_slots)
        Gauge("spiritlm_slots", "decode slots", registry=r).set_function(lambda: engine.slots)
        Gauge("spiritlm_tokens_per_second", f"generated tokens per second over the last {window_s:g} s",
              registry=r).set_function(self._rate)
        Gauge("spiritlm_prefix_cache_hit_rate", "prompt tokens served from the prefix cache / prompt tokens",
              registry=r).set_function(lambda: engine.prefix.hit_tokens / max(1, engine.prefix.prompt_tokens))
        Gauge("spiritlm_prefix_cache_bytes", "device bytes held by the prefix cache", registry=r).set_function(
            lambda: engine.prefix.nbytes)
        self.generated = Counter("spiritlm_generated_tokens", "generated tokens", registry=r)
        self.prefix_lookups = Counter("spiritlm_prefix_cache_lookups", "prefix-cache lookups", registry=r)
        self.prefix_hits = Counter("spiritlm_prefix_cache_hits", "lookups that reused a cached prefix", registry=r)
        self.requests = Counter("spiritlm_requests", "finished engine requests by outcome", ["outcome"], registry=r)
        self.ttft = Histogram("spiritlm_time_to_first_token_seconds", "submit → first token", registry=r,
                              buckets=LATENCY_BUCKETS)
        self.ttfa = Histogram("spiritlm_time_to_first_audio_seconds", "submit → first audio block", registry=r,
                              buckets=LATENCY_BUCKETS)

    def _rate(self) -> float:
        now = time.monotonic()
        self._samples.append((now, self.engine.tokens_total))
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        t0, n0 = self._samples[0]
        return (self.engine.tokens_total - n0) / (now - t0) if now > t0 else 0.0

    # called by the engine thread (prometheus_client is thread-safe)
    def first_token(self, req) -> None:
        self.ttft.observe(req.first_token_at - req.submitted)

    def finished(self, req, reason: str) -> None:
        self.requests.labels(reason).inc()
        self.generated.inc(req.n_generated)
        if req.first_token_at is not None:  # a request that was prefilled looked the prefix cache up
            self.prefix_lookups.inc()
            if req.cached_tokens:
                self.prefix_hits.inc()

    def first_audio(self, req) -> None:
        if req.first_audio_at is None:
            req.first_audio_at = time.perf_counter()
            self.ttfa.observe(req.first_audio_at - req.submitted)

    def render(self) -> tuple[bytes, str]:
        self._rate()
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
