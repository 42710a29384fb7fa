"""Training checkpoints on orbax ``CheckpointManager``: async, keep-N, verified on restore.

One checkpoint (``<dir>/<step>/``) holds three items:

``state``  the train state pytree (fp32 master params, optimizer state, step), saved and restored
           sharded: every host writes and reads only its own shards (``StandardSave``/``StandardRestore``
           with the target's ``NamedSharding``s).
``data``   the data iterator's state, one JSON file per process (``process_<i>-of-<n>.json``) — every host
           reads its own slice of the data and resumes its own iterator.
``meta``   JSON: the step, an integrity fingerprint of ``state`` (per-leaf wrap-around uint32 sum of the
           raw bits — exact and independent of the sharding and of the reduction order), the run's config
           and the last metrics.

Completeness: orbax writes a step into a temporary directory and renames it into place only when every
item of every host is committed, so a run killed mid-save leaves no step directory that looks complete.
Corruption (a truncated or edited file) is caught on restore: orbax fails to decode it, or the
fingerprint differs. ``restore_latest`` then moves that step aside (``<dir>/corrupt/<step>-<time>``) and
tries the previous one, so training always resumes from the newest *good* checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint._src.futures import future as _future
from orbax.checkpoint._src.handlers import async_checkpoint_handler

from spiritlm_jax.converters.torch_io import CheckpointError

log = logging.getLogger("spiritlm_jax.train")


# ---------------------------------------------------------------------- per-process data state

class DataStateHandler(async_checkpoint_handler.AsyncCheckpointHandler):
    """Each process writes its own iterator state as ``process_<i>-of-<n>.json`` (captured at save time)."""

    @staticmethod
    def _name(directory) -> epath.Path:
        return epath.Path(directory) / f"process_{jax.process_index()}-of-{jax.process_count()}.json"

    async def _write(self, text: str, directory):
        self._name(directory).write_text(text)

    async def async_save(self, directory, args: "DataStateSave" = None, item=None):
        text = json.dumps((args.item if args is not None else item), sort_keys=True)  # captured now
        return [_future.CommitFutureAwaitingContractedSignals(self._write(text, directory), name="data_state_save")]

    def save(self, directory, args: "DataStateSave" = None, item=None):
        self._name(directory).write_text(json.dumps(args.item if args is not None else item, sort_keys=True))

    def restore(self, directory, args: "DataStateRestore" = None, item=None):
        f = self._name(directory)
        if not f.exists():
            raise FileNotFoundError(f"{f} missing: this checkpoint was written with a different number of "
                                    f"processes ({jax.process_count()} now), or is incomplete")
        return json.loads(f.read_text())

    def metadata(self, directory):
        return None

    def finalize(self, directory):
        pass

    def close(self):
        pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
    item: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
    item: Any = None


# ---------------------------------------------------------------------- integrity fingerprint

def _leaf_bits_sum(x):
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    width = x.dtype.itemsize
    if jnp.issubdtype(x.dtype, jnp.floating) or jnp.issubdtype(x.dtype, jnp.integer):
        bits = jax.lax.bitcast_convert_type(x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[width])
    else:
        raise TypeError(f"cannot fingerprint dtype {x.dtype}")
    # Integer addition mod 2**32 is associative and commutative: the same value under any sharding.
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32)


@jax.jit
def _fingerprint_leaves(tree):
    return jax.tree.map(_leaf_bits_sum, tree)


def fingerprint(tree) -> dict[str, int]:
    """Per-leaf uint32 sum of the raw bits, keyed by the leaf's path."""
    sums = jax.device_get(_fingerprint_leaves(tree))
    return {jax.tree_util.keystr(p): int(v) for p, v in jax.tree_util.tree_leaves_with_path(sums)}


# ---------------------------------------------------------------------- manager

class Checkpointer:
    """``save`` every N steps (async), keep the newest ``keep``, ``restore_latest`` with fallback."""

    def __init__(self, directory: str | Path, *, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True, exist_ok=True)
        self._keep = keep
        self._async = async_save
        self._open()

    def _open(self):
        opts = ocp.CheckpointManagerOptions(max_to_keep=self._keep, enable_async_checkpointing=self._async,
                                            create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=opts,
                                             item_handlers={"state": ocp.StandardCheckpointHandler(),
                                                            "data": DataStateHandler(),
                                                            "meta": ocp.JsonCheckpointHandler()})

    # -------------------------------------------------------------- save
    def save(self, step: int, state, data_state: Any, meta: dict | None = None) -> None:
        """Start saving ``state`` (non-blocking when async); the data state and meta are captured now."""
        meta = dict(meta or {})
        meta.update(step=int(step), fingerprint=fingerprint(state), saved_at=time.time())
        ok = self.manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=DataStateSave(data_state), meta=ocp.args.JsonSave(meta)),
            force=True)
        if not ok:
            raise CheckpointError(f"orbax refused to save step {step} in {self.directory}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    # -------------------------------------------------------------- restore
    def restore(self, step: int, abstract_state):
        """Restore one step into ``abstract_state`` (ShapeDtypeStructs with shardings) and verify it.

        Returns (state, data_state, meta). Raises CheckpointError if anything is missing or corrupt.
        """
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), data=DataStateRestore(), meta=ocp.args.JsonRestore()))
        except Exception as e:  # orbax/tensorstore raise many types for a damaged file
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                                  f"({type(e).__name__}: {str(e)[:300]})") from e
        state, data_state, meta = out["state"], out["data"], out["meta"]
        if meta.get("step") != step:
            raise CheckpointError(f"checkpoint step {step}: meta says step {meta.get('step')}")
        want = meta.get("fingerprint")
        got = fingerprint(state)
        if want != got:
            bad = sorted(k for k in set(want or {}) | set(got) if (want or {}).get(k) != got.get(k))
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: the fingerprint of "
                                  f"{len(bad)} array(s) differs from the one recorded at save time, e.g. {bad[:3]}")
        return state, data_state, meta

    def restore_latest(self, abstract_state) -> Optional[tuple[int, Any, Any, dict]]:
        """Newest good checkpoint as (step, state, data_state, meta); None if the directory has none.

        A damaged step is moved to ``<dir>/corrupt/`` (so a later save of the same step number works) and
        the previous one is tried. If checkpoints exist but none is good, that is an error: starting
        from scratch silently would throw the run away.
        """
        steps = self.all_steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            try:
                state, data_state, meta = self.restore(step, abstract_state)
            except CheckpointError as e:
                log.warning("%s; falling back to the previous checkpoint", e)
                errors.append(str(e))
                self._quarantine(step)
                continue
            return step, state, data_state, meta
        raise CheckpointError(f"no usable checkpoint in {self.directory} (all {len(steps)} are damaged; moved to "
                              f"{self.directory / 'corrupt'}):\n  " + "\n  ".join(errors))

    def _quarantine(self, step: int) -> None:
        self.manager.wait_until_finished()
        if jax.process_index() == 0:
            src = self.directory / str(step)
            if src.exists():
                dst = self.directory / "corrupt" / f"{step}-{int(time.time() * 1000)}"
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.move(str(src), str(dst))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"quarantine-{step}")
        self.manager.close()
        self._open()


def abstract_like(state, shardings=None):
    """ShapeDtypeStructs (with shardings) describing ``state``: the restore target."""
    if shardings is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), state)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def host_state_equal(a, b) -> bool:
    """Bitwise equality of two pytrees (testing helper)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
