"""The one bucketing rule (spiritlm_jax.buckets) and that engine, scorer and vocoder all use it."""
from spiritlm_jax import buckets, vocoder
from spiritlm_jax.evaluation import scoring
from spiritlm_jax.infer import engine


def test_bucket_rule_bounds():
    seen = set()
    for n in range(1, 3000):
        b = buckets.bucket_length(n)
        seen.add(b)
        assert b >= n and b % 16 == 0
        assert b - n < max(16, 0.25 * n), (n, b)
    # few compiled shapes: 26 distinct lengths for 1 … 2999
    assert len(seen) == 26, sorted(seen)
    assert [buckets.bucket_length(n) for n in (1, 16, 17, 128, 129, 160, 161, 257)] == [16, 16, 32, 128, 160, 160, 192, 320]


def test_one_rule_everywhere():
    assert scoring.bucket_length is buckets.bucket_length
    assert vocoder.bucket_length is buckets.bucket_length
    assert engine.bucket_length is buckets.bucket_length
    assert not hasattr(engine, "_bucket")
