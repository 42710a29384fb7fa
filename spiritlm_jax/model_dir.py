"""The JAX-native model directory: one folder per component, a JSON config plus safetensors weights.

Why: the original checkpoints are PyTorch pickles (``.pt``/``.bin``) that need torch to read at every
load. ``spiritlm-jax convert all`` turns each component into this layout once; every loader then reads it
with numpy + safetensors only (no torch, no torchfcpe, no transformers), e.g. on a TPU VM.

A component folder (docs/model-format.md has the whole tree)::

    config.json        {"format": "spiritlm-jax/<kind>", "version": 1, "config": {...our dataclass...},
                        "original": {...the original's own config, kept verbatim for export...}, ...}
    model.safetensors  our parameter pytree, flattened: nested keys joined by "/", list items as "#<i>"

The LM is the exception: it stays an orbax checkpoint (``config.json`` + ``params/``, see
``converters/llama.py``) because orbax restores every array straight into its ``NamedSharding`` shards,
so a 7B model never has to fit on one host; safetensors has no sharded restore.

``read_component`` checks the folder's ``format`` against the kind the caller expects, so a component
in the wrong slot (a Base vocoder where the Expressive one belongs, a style encoder in the HuBERT
folder) is refused with both names, never loaded as the wrong model.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import typing
from pathlib import Path
from typing import Any, Mapping

import numpy as np

FORMAT_PREFIX = "spiritlm-jax/"
VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TREE_FILE = "spiritlm-jax-tree.json"  # at the root of a converted checkpoints/ tree


class ModelDirError(ValueError):
    """A model directory is missing, incomplete, of another kind, or not readable without torch."""


# ------------------------------------------------------------------------------------------------
# dataclass configs <-> JSON
# ------------------------------------------------------------------------------------------------

def config_to_json(cfg) -> dict:
    """A (nested) frozen dataclass config → a JSON-ready dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_json(cls, data: Mapping[str, Any], where: str = "config"):
    """Inverse of :func:`config_to_json`: lists become the tuples the field types declare."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ModelDirError(f"{where}: unknown {cls.__name__} field(s) {sorted(unknown)}; the folder was written by "
                            f"another version of spiritlm-jax")
    return cls(**{k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()})


def _coerce(hint, value, where: str):
    if value is None:
        return None
    if dataclasses.is_dataclass(hint):
        return config_from_json(hint, value, where)
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(args[0], v, where) for v in value)
        return tuple(_coerce(a, v, where) for a, v in zip(args, value))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", ())):
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, where) if len(inner) == 1 else value
    return value


# ------------------------------------------------------------------------------------------------
# parameter pytrees <-> flat safetensors keys
# ------------------------------------------------------------------------------------------------

def flatten_params(tree, prefix: str = "") -> dict[str, np.ndarray]:
    """{"a": {"b": x}, "c": [y, z]} → {"a/b": x, "c/#0": y, "c/#1": z}."""
    out: dict[str, np.ndarray] = {}
    if isinstance(tree, Mapping):
        for k in sorted(tree):
            if "/" in str(k) or str(k).startswith("#"):
                raise ModelDirError(f"parameter name {k!r} cannot be stored (contains '/' or starts with '#')")
            out.update(flatten_params(tree[k], f"{prefix}{k}/"))
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            out.update(flatten_params(v, f"{prefix}#{i}/"))
    else:
        out[prefix[:-1]] = np.ascontiguousarray(np.asarray(tree))
    return out


def unflatten_params(flat: Mapping[str, np.ndarray]):
    root: dict = {}
    for key, arr in flat.items():
        node = root
        parts = key.split("/")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = arr
    return _lists(root)


def _lists(node):
    if not isinstance(node, dict):
        return node
    if node and all(k.startswith("#") for k in node):
        return [_lists(node[f"#{i}"]) for i in range(len(node))]
    return {k: _lists(v) for k, v in node.items()}


def is_float_dtype(dtype) -> bool:
    """numpy's floats AND ml_dtypes' (bfloat16, float8_*), whose numpy ``kind`` is 'V', not 'f': a check on
    ``kind == "f"`` alone let NaN in a bfloat16 checkpoint through."""
    dtype = np.dtype(dtype)
    return dtype.kind == "f" or (dtype.kind == "V" and "float" in dtype.name)


def check_finite(flat: Mapping[str, np.ndarray], where: str) -> None:
    """Refuse NaN/Inf weights: they never come from a good checkpoint and silently poison every output."""
    bad = [k for k, a in flat.items()
           if is_float_dtype(np.asarray(a).dtype) and not np.all(np.isfinite(np.asarray(a, np.float32)))]
    if bad:
        raise ModelDirError(f"{where}: {len(bad)} tensor(s) hold NaN or Inf values, e.g. {bad[:3]}; the checkpoint "
                            f"is damaged (re-copy it from the release) and was not converted")


# ------------------------------------------------------------------------------------------------
# component folders
# ------------------------------------------------------------------------------------------------

def component_format(folder: str | os.PathLike) -> str | None:
    """The ``format`` of a folder written by us (``spiritlm-jax/<kind>``), or None for anything else
    (an original checkpoint folder, a missing one)."""
    p = Path(folder) / CONFIG_FILE
    if not p.is_file():
        return None
    try:
        meta = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    fmt = meta.get("format") if isinstance(meta, dict) else None
    return fmt if isinstance(fmt, str) and fmt.startswith(FORMAT_PREFIX) else None


def is_converted(folder: str | os.PathLike) -> bool:
    return component_format(folder) is not None


def write_component(folder: str | os.PathLike, kind: str, config: dict, params, *, original: Any = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (refusing non-finite weights)."""
    from safetensors.numpy import save_file

    folder = Path(folder)
    flat = flatten_params(params)
    check_finite(flat, str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": FORMAT_PREFIX + kind, "version": VERSION, "config": config}
    if original is not None:
        meta["original"] = original
    meta.update(extra or {})
    save_file(flat, str(folder / WEIGHTS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=1))
    return folder


def read_component(folder: str | os.PathLike, kind: str, *, slot: str | None = None) -> tuple[dict, Any]:
    """(config.json as a dict, params pytree of numpy arrays) of a converted component of ``kind``.

    ``slot``: what the caller wants it for, named in the error when the folder holds another kind."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    fmt = component_format(folder)
    want = FORMAT_PREFIX + kind
    if fmt != want:
        what = f"a {fmt!r} component" if fmt else "not a converted component"
        raise ModelDirError(f"{folder} is {what}, but {slot or 'this loader'} needs {want!r}")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    if meta.get("version") != VERSION:
        raise ModelDirError(f"{folder}/{CONFIG_FILE}: version {meta.get('version')!r}; this spiritlm-jax reads {VERSION}")
    w = folder / WEIGHTS_FILE
    if not w.is_file():
        raise ModelDirError(f"{folder}: {WEIGHTS_FILE} is missing; re-run spiritlm-jax convert all")
    try:
        flat = load_file(str(w))
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelDirError(f"{w}: unreadable ({e}); the file is truncated or corrupt, re-run the conversion") from e
    return meta, unflatten_params(flat)


def original_needs_torch(folder: str | os.PathLike, what: str) -> None:
    """Raise the clear error for an ORIGINAL (PyTorch) checkpoint folder when torch is not installed."""
    import importlib.util

    if _blocked("torch") or importlib.util.find_spec("torch") is None:
        raise ModelDirError(
            f"{folder} is an original PyTorch checkpoint ({what}) and torch is not installed. Run "
            f"`spiritlm-jax convert all ROOT DST` once (on a machine with the convert extra) and point "
            f"--checkpoints at DST, or install the convert extra: pip install 'spiritlm-jax[convert]'")


def _blocked(name: str) -> bool:
    import sys

    return name in sys.modules and sys.modules[name] is None


def replace_folder(tmp: Path, dst: Path) -> Path:
    """Put the finished folder ``tmp`` at ``dst`` by renames: an existing ``dst`` is moved aside first and
    deleted only once ``tmp`` is in place, so a failure never leaves ``dst`` missing or half written."""
    dst = Path(dst).absolute()
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.old-{os.getpid()}"
        dst.rename(old)
    Path(tmp).rename(dst)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return dst
