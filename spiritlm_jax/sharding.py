"""Meshes and THE table of logical-axis → mesh-axis rules.

Every parameter and main activation of every model carries logical axis names (``embed``,
``vocab``, ``heads``, …) through ``flax.linen.with_logical_partitioning`` /
``with_logical_constraint``. ``LOGICAL_RULES`` below is the only place that says how those names map
onto the mesh axes ``data``, ``fsdp`` and ``tensor``; sharding a new model is adding names, not code.

Mesh axes:
  data    pure data parallelism: the batch is split, parameters are replicated across it
  fsdp    the batch is split AND parameters are sharded along their ``embed`` axis (ZeRO-3 style)
  tensor  Megatron-style tensor parallelism: heads, MLP width and vocabulary are split

Speech models (HuBERT, wav2vec2, FCPE, VQ-VAE, HifiGAN) are small (≤ 100 M parameters): their
parameters are replicated (their logical names map to ``None``) and only their batch is split over
``data``/``fsdp``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical axis name -> mesh axis (or tuple of mesh axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, Any], ...] = (
    # ---- Llama parameters
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("layers", None),  # the nn.scan stacking axis
    ("norm", None),
    # ---- activations
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("cache_length", None),
    # ---- speech models: parameters replicated, batch split
    ("conv_in", None),
    ("conv_out", None),
    ("conv_kernel", None),
    ("speech_embed", None),
    ("speech_mlp", None),
    ("speech_heads", None),
    ("codebook", None),
    ("time", None),
)


def rules() -> tuple[tuple[str, Any], ...]:
    return LOGICAL_RULES


def make_mesh(shape: Sequence[int] | dict[str, int] = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh. ``shape`` may be a tuple, a dict, or None (all devices on data).

    One entry may be -1 (filled from the device count). The product must equal the number of
    devices used.
    """
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if shape is None:
        shape = (n, 1, 1)
    if isinstance(shape, dict):
        unknown = set(shape) - set(MESH_AXES)
        if unknown:
            raise ValueError(f"unknown mesh axes {sorted(unknown)}; the axes are {MESH_AXES}")
        shape = tuple(shape.get(a, 1) for a in MESH_AXES)
    shape = list(shape)
    if len(shape) != 3:
        raise ValueError(f"mesh shape must have 3 entries (data, fsdp, tensor), got {shape}")
    if shape.count(-1) > 1:
        raise ValueError("at most one mesh axis may be -1")
    if -1 in shape:
        rest = math.prod(s for s in shape if s != -1)
        if n % rest:
            raise ValueError(f"{n} devices cannot be split into mesh {shape}")
        shape[shape.index(-1)] = n // rest
    if math.prod(shape) != n:
        raise ValueError(
            f"mesh {tuple(shape)} needs {math.prod(shape)} devices but {n} are available; "
            f"on CPU simulate more with XLA_FLAGS=--xla_force_host_platform_device_count=N"
        )
    axis_types = (jax.sharding.AxisType.Auto,) * 3
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=axis_types, devices=devices)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
    """Drop the mesh axes of any dimension they do not divide evenly (that dimension is replicated).

    JAX refuses uneven shardings of stored arrays; e.g. a 32667-row vocabulary cannot be split 4 ways.
    Spirit LM's real vocabularies (32512, 32768) divide evenly by any power of two up to 256.
    """
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = axes if isinstance(axes, tuple) else (axes,)
        size = math.prod(mesh.shape[a] for a in names)
        out.append(axes if shape[i] % size == 0 else None)
    return P(*out)


def logical_sharding(logical_tree, mesh: Mesh, shapes=None):
    """A pytree of logical PartitionSpecs (from ``nn.get_partition_spec``) → NamedShardings.

    ``shapes``: a matching pytree of arrays / ShapeDtypeStructs; dimensions the mesh does not divide
    are replicated (``fit_spec``).
    """
    mesh_specs = nn.logical_to_mesh(logical_tree, LOGICAL_RULES)
    if shapes is None:
        return jax.tree.map(lambda s: NamedSharding(mesh, s), mesh_specs, is_leaf=lambda x: isinstance(x, P))
    return jax.tree.map(lambda s, a: NamedSharding(mesh, fit_spec(s, a.shape, mesh)), mesh_specs, shapes,
                        is_leaf=lambda x: isinstance(x, P))


@contextlib.contextmanager
def mesh_context(mesh: Mesh | None):
    """Activate a mesh and the logical rules, so ``with_logical_constraint`` inside models applies."""
    if mesh is None:
        yield
        return
    with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_RULES):
        yield


def logical_spec(*names: str | None) -> P:
    """Logical names → the mesh PartitionSpec the rules give (for activations and inputs)."""
    return nn.logical_to_mesh_axes(names, LOGICAL_RULES)


def named(mesh: Mesh, *names: str | None) -> NamedSharding:
    return NamedSharding(mesh, logical_spec(*names))


def put(x, mesh: Mesh, *names: str | None):
    """device_put ``x`` sharded by logical names (dimensions the mesh does not divide are replicated).

    On a mesh that spans several processes, every process passes the same full ``x`` and keeps only the
    shards of its own devices (``make_array_from_callback``)."""
    sharding = NamedSharding(mesh, fit_spec(logical_spec(*names), x.shape, mesh))
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())
