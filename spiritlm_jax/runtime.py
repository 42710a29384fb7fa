"""Process settings that only take effect when a process starts: glibc's malloc huge pages for inference.

Why. An XLA:CPU program gets fresh output and temporary buffers on every call, and for large buffers glibc's
malloc maps new memory each time, which the kernel fills 4 KiB page by page on first touch. In a serving
decode step (135 M model, 16 slots × 1,152 positions) the KV-window copies ran at 1.6–3.4 GB/s for that
reason (`perf stat` on a microbenchmark of the same copies: 1.02 M minor faults, 2.0 of 2.8 s in the kernel).
glibc ≥ 2.35 has a tunable, ``glibc.malloc.hugetlb=1``, that asks for transparent huge pages on malloc's
large chunks (``madvise``; no system setting, no root). Measured on 2026-12-03 (bench/RESULTS.md, session 6):
the 16-row serving step 95–120 → 68 ms, serve_bench at 16 clients 31.7 → 36.8 tok/s, one request at a time
29.2 → 38.0 tok/s, batch-1 decode 60.1 → 66.0 tok/s; the HifiGAN vocoder did not change.

glibc reads its tunables once, at process start, so ``spiritlm-jax serve`` and ``spiritlm-jax generate``
re-execute themselves once with the tunable added to ``GLIBC_TUNABLES`` (same PID, same arguments, before
anything else is imported). Set ``SPIRITLM_JAX_MALLOC_HUGEPAGES=0`` to run as started; a
``GLIBC_TUNABLES`` that already sets ``glibc.malloc.hugetlb`` is left as it is. Elsewhere (not glibc, an
older glibc) nothing happens. Library users set the variable themselves:
``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 python my_script.py``.
"""
from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping

HUGETLB_TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT_VARIABLE = "SPIRITLM_JAX_MALLOC_HUGEPAGES"
MIN_GLIBC = (2, 35)  # the first glibc with glibc.malloc.hugetlb


def _glibc_version(libc: tuple[str, str]) -> tuple[int, ...] | None:
    name, version = libc
    if name != "glibc":
        return None
    try:
        return tuple(int(part) for part in version.split(".")[:2])
    except ValueError:
        return None


def malloc_hugepages_environment(environ: Mapping[str, str],
                                 libc: tuple[str, str] | None = None) -> dict[str, str] | None:
    """The environment to re-execute with, or None when there is nothing to do (opted out, not glibc ≥ 2.35,
    or ``glibc.malloc.hugetlb`` already chosen in ``GLIBC_TUNABLES``)."""
    if environ.get(OPT_OUT_VARIABLE, "1").strip() == "0":
        return None
    version = _glibc_version(platform.libc_ver() if libc is None else libc)
    if version is None or version < MIN_GLIBC:
        return None
    current = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb" in current:
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{current}:{HUGETLB_TUNABLE}" if current else HUGETLB_TUNABLE
    return env


def reexec_with_malloc_hugepages() -> None:
    """Replace this process by itself with the tunable set (returns only when there is nothing to do)."""
    env = malloc_hugepages_environment(os.environ)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, sys.orig_argv, env)
