"""Shared helpers for the HuBERT and style-encoder benchmarks (not a test).

* loading single modules of the ORIGINAL code from an export outside the repository, with a tiny
  stand-in ``torchaudio`` (``load`` via soundfile; ``functional.resample`` refuses, the benchmarks
  run at 16 kHz) put on ``sys.path`` for this process only;
* timing ours, the original and transformers alternately so machine noise hits all alike;
* writing a section of bench/RESULTS.md without touching the others.
"""
from __future__ import annotations

import os
import platform
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

PEAK_FLOPS = 180e9  # fp32 matmul limit of this machine, 2 threads (shared/spec/BASELINES.md)

_TA_STUB = '''
import numpy as _np, soundfile as _sf, torch as _torch
def load(path, *a, **k):
    d, sr = _sf.read(str(path), dtype="float32", always_2d=True)
    return _torch.from_numpy(_np.ascontiguousarray(d.T)), sr
class _F:
    @staticmethod
    def resample(*a, **k):
        raise RuntimeError("benchmark torchaudio stand-in: resampling is not needed at 16 kHz")
functional = _F()
'''


def install_torchaudio_stub() -> None:
    d = Path(tempfile.mkdtemp(prefix="ta_stub_")) / "torchaudio"
    d.mkdir()
    (d / "__init__.py").write_text(_TA_STUB)
    sys.path.insert(0, str(d.parent))


def load_original_package(orig_root: Path, rel: str, name: str) -> types.ModuleType:
    """Import the folder ``orig_root/rel`` as a package called ``name`` WITHOUT running the
    original's ``speech_tokenizer/__init__`` (which would import every other tokenizer)."""
    folder = orig_root / rel
    if not folder.is_dir():
        sys.exit(f"original not found at {folder}; export it first:\n  mkdir -p /tmp/orig && git --git-dir="
                 f"/work/.mirror/facebookresearch+spiritlm/repo archive HEAD | tar -x -C /tmp/orig")
    pkg = types.ModuleType(name)
    pkg.__path__ = [str(folder)]
    sys.modules[name] = pkg
    return pkg


def alternate(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Call each fn once per round, in turn; return the timings per name."""
    out = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t)
    return out


def machine_info(threads: int) -> str:
    import jax
    import torch

    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({threads} threads), jax {jax.__version__}, load avg at start {os.getloadavg()[0]:.1f}")


def write_section(path: Path, heading: str, body: str) -> None:
    """Replace (or append) the ``## heading`` section of RESULTS.md, leaving every other section alone."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, l in enumerate(lines) if l.strip() == f"## {heading}"), None)
    block = f"## {heading}\n\n{body.rstrip()}\n\n"
    if start is None:
        if not text.endswith("\n\n"):
            text = text.rstrip("\n") + "\n\n"
        path.write_text(text + block)
        return
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    path.write_text("".join(lines[:start]) + block + "".join(lines[end:]))


def best_median(ts: list[float]) -> tuple[float, float]:
    return min(ts), statistics.median(ts)
