"""Safe, streaming readers for the original PyTorch checkpoint files.

Every converter reads its inputs through this module, so the safety policy lives in one place:

* ``torch.load`` only ever runs with ``weights_only=True``. A checkpoint whose pickle needs a class
  outside torch's safe set (plus the explicit, per-call allowlist) is refused with an error that
  names the class and the opt-in (``allow_classes=[...]`` in Python, ``--allow-pickle-class`` on the
  command line).
* Files are memory-mapped (``mmap=True``) where the format allows, and tensors are handed out one at
  a time as numpy arrays that VIEW the mapped storage (bfloat16 included, through ``ml_dtypes``), so a
  converter that writes tensor by tensor never holds a second full copy of the checkpoint.
* Truncated or non-checkpoint files give an error naming the file and what was expected.

torch is imported lazily: the rest of the library never needs it.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np


class CheckpointError(ValueError):
    """A checkpoint file or directory is unreadable, incomplete or inconsistent."""


class UnsafePickleError(CheckpointError):
    """The pickle needs a class that is not on the allowlist."""


def _require_torch():
    try:
        import torch  # noqa: F401
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError(
            "Reading PyTorch checkpoints needs torch. Install the converter extra: "
            "pip install 'spiritlm-jax[convert]' (it pins torch==2.13.0, the CPU build)."
        ) from e
    return torch


def _resolve_globals(names: Iterable[str]):
    """'module.Class' strings → the objects, for torch.serialization.safe_globals."""
    import importlib

    out = []
    for name in names:
        if _CODE_RUNNING.fullmatch(name) or name.split(".")[0] in ("os", "posix", "nt", "sys"):
            raise UnsafePickleError(f"refusing to allowlist '{name}': it can run code or touch files and "
                                    f"processes when a pickle calls it; no checkpoint needs it")
        mod, _, attr = name.rpartition(".")
        if not mod:
            raise ValueError(f"allowlisted class must be 'module.Class', got {name!r}")
        try:
            out.append(getattr(importlib.import_module(mod), attr))
        except (ImportError, AttributeError) as e:
            raise ValueError(f"cannot import allowlisted class {name!r}: {e}") from e
    return out


# torch's weights-only unpickler words a refused global two ways (torch 2.13):
#   "Unsupported global: GLOBAL mod.Class was not an allowed global by default. ..."  (allowlistable)
#   "Trying to load unsupported GLOBAL posix.system whose module posix is blocked."   (never allowlistable)
_UNSUPPORTED_GLOBAL = re.compile(r"Unsupported global: GLOBAL\s+([\w.]+)")
_BLOCKED_GLOBAL = re.compile(r"unsupported GLOBAL\s+([\w.]+)\s+whose module\s+(\w+)\s+is blocked")
# Globals torch does not block by module but that run code or touch the system when a pickle calls them:
# refused like the blocked ones, never offered for the allowlist.
_CODE_RUNNING = re.compile(r"((builtins\.)?(eval|exec|compile|__import__|getattr|open|breakpoint)|"
                           r"(subprocess|shutil|pty|socket|runpy|importlib|ctypes|webbrowser|pickle|marshal|"
                           r"code|multiprocessing|signal)(\..*)?)")


def _refusal(path: Path, msg: str) -> CheckpointError:
    """torch's UnpicklingError text → our error: which global was refused and why, or 'corrupt'."""
    blocked = _BLOCKED_GLOBAL.search(msg)
    if blocked:
        name, module = blocked.groups()
        return UnsafePickleError(
            f"{path}: REFUSED, not loaded: the pickle calls '{name}', a function of the module '{module}' "
            f"(process and system access), which torch's weights-only loader blocks outright because "
            f"unpickling it would run code on this machine. A real checkpoint never needs it: this file was "
            f"tampered with or is not a checkpoint. Do not load it; get the file again from the original "
            f"release.")
    unsupported = _UNSUPPORTED_GLOBAL.search(msg)
    if unsupported and _CODE_RUNNING.fullmatch(unsupported.group(1)):
        name = unsupported.group(1)
        return UnsafePickleError(
            f"{path}: REFUSED, not loaded: the pickle calls '{name}', which can run code or touch files and "
            f"processes on this machine; no checkpoint needs it, so it is never allowlisted. This file was "
            f"tampered with or is not a checkpoint; get it again from the original release.")
    if unsupported:
        cls = unsupported.group(1)
        return UnsafePickleError(
            f"{path}: the pickle needs the class '{cls}', which is not on the allowlist, so it was NOT "
            f"loaded (loading runs torch.load(weights_only=True), which constructs only known-safe types). "
            f"If you trust this file, allow that class explicitly: allow_classes=['{cls}'] in Python or "
            f"--allow-pickle-class {cls} on the command line.")
    # (torch's own text suggests weights_only=False, which is wrong advice for a damaged file)
    return CheckpointError(f"{path}: not a readable PyTorch checkpoint: the file is corrupt, truncated or "
                           f"not a torch.save file; re-copy it from the original release")


def torch_load(path: str | os.PathLike, *, allow_classes: Iterable[str] = (), mmap: bool = True) -> Any:
    """``torch.load(path, weights_only=True)`` with clear errors.

    ``allow_classes``: extra ``"module.Class"`` names the unpickler may construct. Only pass the
    names of classes you trust: they are exactly what ``weights_only`` exists to keep out.
    """
    torch = _require_torch()
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint file is empty: {path}")
    allowed = list(allow_classes)
    use_mmap = mmap and zipfile.is_zipfile(path)  # legacy (non-zip) torch.save files cannot be mapped
    safe = _resolve_globals(allowed)
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as e:
        raise _refusal(path, str(e)) from None
    except Exception as e:  # torch raises RuntimeError, EOFError, KeyError, ... on damaged files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(
            f"{path}: could not read the checkpoint ({first}). The file is truncated, corrupt or not a "
            f"torch.save file; re-copy it from the original release."
        ) from e


def to_numpy(t) -> np.ndarray:
    """A torch tensor → a numpy array viewing the same memory where possible (bf16 → ml_dtypes)."""
    torch = _require_torch()
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):  # pragma: no cover - not in any release
        raise CheckpointError(f"unsupported tensor dtype {t.dtype}")
    return t.numpy()


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_MADV_DONTNEED = 4
_libc = None


def release_pages(t) -> None:
    """Drop a FILE-memory-mapped tensor's pages from this process's resident set (``MADV_DONTNEED``).

    ``torch.load(mmap=True)`` maps the file privately and never writes to it, so the kernel simply
    re-reads a page from the file if it is touched again: correctness is unaffected, but a converter
    that streams tensor by tensor no longer accumulates the whole checkpoint in its RSS. Best effort:
    a no-op where madvise is unavailable.
    """
    global _libc
    import ctypes
    import ctypes.util

    try:
        if _libc is None:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        st = t.untyped_storage()
        ptr, n = st.data_ptr(), st.nbytes()
        if n == 0:
            return
        start = ptr - ptr % _PAGE
        end = ptr + n
        end += (-end) % _PAGE
        _libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED)
    except Exception:  # pragma: no cover
        pass


def state_dict_to_numpy(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return {k: to_numpy(v) for k, v in sd.items()}


# --------------------------------------------------------------------------------------------------
# Hugging Face model directories: pytorch_model.bin, sharded .bin + index, safetensors (+ index)
# --------------------------------------------------------------------------------------------------

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HF_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def hf_weight_files(model_dir: str | os.PathLike) -> list[Path]:
    """The weight files of an HF checkpoint directory, in a stable order; checks shards exist."""
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError(f"not a directory: {d}")
    for name in HF_INDEX_FILES:
        idx = d / name
        if idx.exists():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{idx}: not a valid shard index ({e})") from e
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (d / f).exists()]
            if missing:
                raise CheckpointError(
                    f"{d}: the index {name} lists shard(s) that are not in the directory: "
                    f"{', '.join(missing)}. Copy every shard of the checkpoint."
                )
            return [d / f for f in files]
    for name in HF_WEIGHT_FILES:
        if (d / name).exists():
            return [d / name]
    shards = sorted(d.glob("pytorch_model-*-of-*.bin")) + sorted(d.glob("model-*-of-*.safetensors"))
    if shards:
        raise CheckpointError(f"{d}: found shard files but no index JSON ({HF_INDEX_FILES[1]} or {HF_INDEX_FILES[0]})")
    raise CheckpointError(
        f"{d}: no weights found; expected one of {', '.join(HF_WEIGHT_FILES)} or a sharded checkpoint "
        f"with its index JSON"
    )


def iter_hf_tensors(model_dir: str | os.PathLike, *, allow_classes: Iterable[str] = ()) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, numpy array) for every tensor of an HF checkpoint directory, one file at a time."""
    for f in hf_weight_files(model_dir):
        if f.suffix == ".safetensors":
            yield from _iter_safetensors(f)
        else:
            sd = torch_load(f, allow_classes=allow_classes)
            mapped = zipfile.is_zipfile(f)  # torch_load memory-maps exactly these
            if not isinstance(sd, Mapping):
                raise CheckpointError(f"{f}: expected a state dict (a mapping of names to tensors), got {type(sd).__name__}")
            for k in list(sd.keys()):
                t = sd.pop(k)
                yield k, to_numpy(t)
                # The consumer has copied what it needs by now: drop the mapped pages from our RSS.
                # (Only for file mappings: on anonymous memory MADV_DONTNEED would zero the data.)
                if mapped:
                    release_pages(t)
                del t
            del sd


def _iter_safetensors(f: Path) -> Iterator[tuple[str, np.ndarray]]:
    try:
        from safetensors import safe_open
    except ImportError as e:  # pragma: no cover
        raise ImportError("reading .safetensors needs the 'safetensors' package (pip install 'spiritlm-jax[convert]')") from e
    try:
        handle = safe_open(str(f), framework="pt")
    except Exception as e:  # safetensors raises its own error types
        raise CheckpointError(f"{f}: could not read the safetensors file ({e}); it is truncated or corrupt") from e
    with handle:
        for k in handle.keys():
            try:
                t = handle.get_tensor(k)
            except Exception as e:
                raise CheckpointError(f"{f}: tensor {k!r} could not be read ({e}); the file is truncated or corrupt") from e
            yield k, to_numpy(t)


def check_keys(
    got: Iterable[str], expected: Iterable[str], *, where: str, ignore: Iterable[str | re.Pattern] = ()
) -> None:
    """Raise one error that lists every missing and every unexpected key."""
    pats = [re.compile(p) if isinstance(p, str) else p for p in ignore]
    got_s = {k for k in got if not any(p.fullmatch(k) for p in pats)}
    exp_s = set(expected)
    missing = sorted(exp_s - got_s)
    unexpected = sorted(got_s - exp_s)
    if missing or unexpected:
        lines = [f"{where}: the checkpoint's keys do not match the model."]
        if missing:
            lines.append(f"  missing ({len(missing)}): " + ", ".join(missing[:20]) + (" …" if len(missing) > 20 else ""))
        if unexpected:
            lines.append(f"  unexpected ({len(unexpected)}): " + ", ".join(unexpected[:20]) + (" …" if len(unexpected) > 20 else ""))
        lines.append("  Is this the right file for this converter, and is it complete?")
        raise CheckpointError("\n".join(lines))


def check_shape(name: str, arr: np.ndarray, expected: tuple[int, ...], *, where: str) -> None:
    if tuple(arr.shape) != tuple(expected):
        raise CheckpointError(
            f"{where}: tensor {name!r} has shape {tuple(arr.shape)} but the config implies {tuple(expected)}; "
            f"the config file and the weights do not belong together."
        )
