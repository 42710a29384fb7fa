"""The one length-bucketing rule: every padded length the generation engine, the scorer and the
vocoder compile comes from :func:`bucket_length`, so a new input length rarely means a new compile.

Rule: up to ``8 · base`` (128), multiples of ``base`` (16); above, four buckets per octave — round
up to a multiple of ``base · p / 8`` where ``p`` is the power of two with
``base · p / 2 < n ≤ base · p``. Every bucket is a multiple of ``base``; padding is below
``base`` or 25 % of ``n``, whichever is larger; lengths 1 … 3000 compile 26 shapes.
"""
from __future__ import annotations

import math


def bucket_length(n: int, base: int = 16) -> int:
    """The padded length for a sequence of ``n`` (≥ 1) positions; always ≥ n."""
    if n <= base:
        return base
    p = 1 << math.ceil(math.log2(n / base))
    step = base * max(1, p // 8)
    return int(math.ceil(n / step) * step)
