"""One converter schema for every checkpoint kind, run both ways.

A kind's table is a list of :class:`Row`: our parameter path, the original key(s), the expected
original shape(s) (from the config) and a :class:`~spiritlm_jax.converters.transforms.Transform` (forward
and inverse). :func:`import_state_dict` reads an original state dict through the table (every key
accounted for, every shape checked) and :func:`export_state_dict` writes it back, row by row, so
``export(import(x)) == x`` (weight-norm pairs: equal after folding).

Paths: a ``str`` element is a dict key; an ``int`` element indexes the leading (layer) axis of a stacked
leaf (HuBERT's and the scanned Llama's layers); ``"#<i>"`` is item i of a list leaf (the VQ-VAE codebooks).

Keys the model never uses (training-only tensors, see each kind's ``unused`` patterns) are kept
verbatim under the top-level ``original_only`` group when ``keep_unused`` is set, so an export gives
back the original's complete state dict.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Iterable, Iterator, Mapping

import numpy as np

from .torch_io import CheckpointError, check_keys, check_shape
from .transforms import Transform

UNUSED = "original_only"


@dataclasses.dataclass(frozen=True)
class Row:
    path: tuple  # our parameter path (str keys, int layer index, "#i" list item)
    keys: tuple[str, ...]  # the original key(s) it is built from (two for a weight-norm pair)
    shapes: tuple[tuple[int, ...], ...]  # their expected original shapes
    transform: Transform

    @classmethod
    def one(cls, path, key: str, shape, transform: Transform) -> "Row":
        return cls(tuple(path), (key,), (tuple(shape),), transform)


def _leaf_path(path: tuple) -> tuple[tuple, int | None]:
    """(path without the layer index, layer index or None)."""
    ints = [i for i, p in enumerate(path) if isinstance(p, int)]
    if not ints:
        return path, None
    i = ints[0]
    return path[:i] + path[i + 1:], path[i]


def _set(tree: dict, path: tuple, value) -> None:
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _get(tree, path: tuple, where: str):
    node = tree
    for k in path:
        if isinstance(node, list) and isinstance(k, str) and k.startswith("#"):
            node = node[int(k[1:])]
        elif isinstance(node, Mapping) and k in node:
            node = node[k]
        else:
            raise CheckpointError(f"{where}: our parameters have no {'/'.join(map(str, path))}")
    return node


def _lists(node):
    if not isinstance(node, dict):
        return node
    if node and all(isinstance(k, str) and k.startswith("#") for k in node):
        return [_lists(node[f"#{i}"]) for i in range(len(node))]
    return {k: _lists(v) for k, v in node.items()}


def import_state_dict(rows: list[Row], sd: Mapping[str, Any], *, where: str, unused: Iterable[str] = (),
                      keep_unused: bool = False) -> dict:
    """Original state dict (numpy arrays) → our nested params, checking every key and shape."""
    pats = [re.compile(p) for p in unused]
    check_keys(sd.keys(), [k for r in rows for k in r.keys], where=where, ignore=pats)
    params: dict = {}
    stacks: dict[tuple, dict[int, np.ndarray]] = {}
    for r in rows:
        arrs = []
        for key, shape in zip(r.keys, r.shapes):
            a = np.asarray(sd[key])
            check_shape(key, a, shape, where=where)
            arrs.append(a)
        value = r.transform.forward(*arrs)
        leaf, layer = _leaf_path(r.path)
        if layer is None:
            _set(params, leaf, value)
        else:
            stacks.setdefault(leaf, {})[layer] = value
    for leaf, by_layer in stacks.items():
        _set(params, leaf, np.stack([by_layer[i] for i in range(len(by_layer))]))
    params = _lists(params)
    if keep_unused:
        extra = {k: np.asarray(v) for k, v in sd.items() if any(p.fullmatch(k) for p in pats)}
        if extra:
            params[UNUSED] = extra
    return params


def export_state_dict(rows: list[Row], params: Mapping[str, Any], *, where: str = "parameters") -> Iterator[tuple[str, np.ndarray]]:
    """Our params → (original key, array) pairs, row by row (then the kept ``original_only`` tensors)."""
    for r in rows:
        leaf, layer = _leaf_path(r.path)
        value = np.asarray(_get(params, leaf, where))
        if layer is not None:
            value = value[layer]
        arrs = r.transform.inverse(value)
        for key, shape, a in zip(r.keys, r.shapes, arrs):
            check_shape(key, a, shape, where=where)
            yield key, a
    for key, a in (params.get(UNUSED) or {}).items():
        yield key, np.asarray(a)


def rows_by_key(rows: list[Row]) -> dict[str, Row]:
    return {k: r for r in rows for k in r.keys}
