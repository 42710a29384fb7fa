"""Return values shaped like the original's torch tensors, without importing torch.

The original's components return torch tensors that callers ``.cpu().numpy()`` or iterate with
``.item()``. When the caller has imported torch we hand back a real tensor; otherwise a numpy array
that also answers ``.cpu()``, ``.detach()`` and ``.numpy()``.
"""
from __future__ import annotations

import sys

import numpy as np


class TensorLikeArray(np.ndarray):
    """A numpy array with the torch methods the original's callers use on returned tensors."""

    def cpu(self):
        return self

    def detach(self):
        return self

    def numpy(self):
        return self.view(np.ndarray)


def like_torch(a) -> "TensorLikeArray":
    a = np.asarray(a)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "from_numpy"):
        return torch.from_numpy(np.array(a, copy=True))  # writable: torch refuses read-only buffers
    return np.ascontiguousarray(a).view(TensorLikeArray)


def as_audio(content):
    """Paths (str / Path), bytes, numpy, jax and torch tensors of any float dtype (bf16 included) →
    what our loaders take. torch tensors are read by duck typing (``detach``/``float``)."""
    if hasattr(content, "detach") and hasattr(content, "float"):
        return content.detach().cpu().float().numpy()
    return content
