"""Write orbax checkpoints leaf by leaf (and slice by slice), so a converter never holds the whole model.

``orbax`` saves a pytree in one call, which needs every array in memory at once, plus its encode
buffers. ``StreamingWriter`` instead:

1. lets orbax itself write the checkpoint's structure (``_METADATA``, ``_CHECKPOINT_METADATA``, the
   commit marker) for a placeholder tree of tiny arrays, in orbax's plain per-leaf zarr layout
   (``use_ocdbt=False``);
2. replaces each leaf's zarr array with the full-size one through tensorstore (the same driver and
   compressor orbax uses), chunked one slice per layer for stacked leaves, and fills it as tensors
   arrive;
3. renames the directory into place only after every element of every leaf was written, so an
   interrupted conversion never leaves a checkpoint that looks complete.

The result is an ordinary orbax checkpoint: ``orbax.checkpoint.StandardCheckpointer().restore`` reads it,
including sharded restores straight into ``NamedSharding``s.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Sequence

import jax
import numpy as np

from .torch_io import CheckpointError


def leaf_items(tree, prefix=()):
    """(key path, leaf) pairs of a nested-dict pytree, in sorted key order."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from leaf_items(tree[k], prefix + (k,))
    else:
        yield prefix, tree


def save_tree_without_copy(path: Path, tree) -> None:
    """Plain orbax save of a pytree of numpy arrays, minus orbax's defensive deep copy of each array."""
    import orbax.checkpoint as ocp
    from orbax.checkpoint._src.serialization import type_handler_registry as thr, type_handlers as th

    registry = thr.create_type_handler_registry(
        (np.ndarray, th.NumpyHandler(deepcopy_host_arrays=False)), (jax.Array, th.ArrayHandler()))
    ckptr = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_ocdbt=False))
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns that a non-OCDBT save has no OCDBT parts to merge
    try:
        ckptr.save(Path(path).absolute(), args=ocp.args.PyTreeSave(tree))
    finally:
        absl_logger.setLevel(level)


class StreamingWriter:
    """``StreamingWriter(path, {("layers","attn","q"): (shape, dtype, stacked), ...})``.

    ``write(leaf, value, index=None)`` stores a whole leaf, or slice ``index`` of a stacked leaf's
    leading axis. ``close()`` checks that everything was written and moves the checkpoint into place.
    """

    def __init__(self, path: str | Path, leaves: dict[tuple[str, ...], tuple[Sequence[int], np.dtype, bool]]):
        import tensorstore as ts

        self.path = Path(path).absolute()
        self.tmp = self.path.with_name(self.path.name + ".partial")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.leaves = {k: (tuple(s), np.dtype(d), bool(st)) for k, (s, d, st) in leaves.items()}
        placeholder: dict = {}
        for keys, (shape, dtype, _) in self.leaves.items():
            node = placeholder
            for k in keys[:-1]:
                node = node.setdefault(k, {})
            node[keys[-1]] = np.zeros((1,) * len(shape), dtype)
        save_tree_without_copy(self.tmp, placeholder)
        self._arrays = {}
        self._todo = {}
        for keys, (shape, dtype, stacked) in self.leaves.items():
            chunks = ((1,) + shape[1:]) if stacked and shape else shape
            spec = {
                "driver": "zarr",
                "kvstore": {"driver": "file", "path": str(self.tmp / ".".join(keys))},
                "metadata": {"shape": list(shape), "chunks": [max(1, c) for c in chunks],
                             "compressor": {"id": "zstd", "level": 1}, "dimension_separator": "."},
            }
            self._arrays[keys] = ts.open(spec, create=True, delete_existing=True, dtype=ts.dtype(dtype.name)).result()
            self._todo[keys] = set(range(shape[0])) if stacked else {None}

    def write(self, keys: tuple[str, ...], value: np.ndarray, index: int | None = None) -> None:
        shape, dtype, stacked = self.leaves[keys]
        value = np.asarray(value)
        if value.dtype != dtype:
            value = value.astype(dtype)
        want = shape[1:] if index is not None else shape
        if tuple(value.shape) != tuple(want):
            raise CheckpointError(f"leaf {'/'.join(keys)}: got shape {value.shape}, expected {want}")
        arr = self._arrays[keys]
        (arr[index] if index is not None else arr).write(value).result()
        self._todo[keys].discard(index)

    def close(self) -> Path:
        missing = {"/".join(k): sorted(v, key=lambda x: -1 if x is None else x) for k, v in self._todo.items() if v}
        if missing:
            raise CheckpointError(f"conversion incomplete, not written: {missing}")
        self._arrays.clear()
        if self.path.exists():
            shutil.rmtree(self.path)
        self.tmp.rename(self.path)
        return self.path
