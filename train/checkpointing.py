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

Two failures are NOT corruption and move nothing: a checkpoint whose arrays do not fit the run's model
(``CheckpointMismatchError``: resuming with a changed model or optimizer config, or with a different
number of processes) names the differing config fields and stops; a save that cannot be written
(``CheckpointSaveError``: disk full, permissions) stops the run at that save with the last complete
checkpoint intact and the half-written temporary folder removed.
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import shutil
import sys
import time
import traceback
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


class CheckpointMismatchError(CheckpointError):
    """A valid checkpoint that does not fit this run (other model shape, optimizer or process count)."""


class CheckpointSaveError(CheckpointError):
    """A checkpoint could not be written (disk full, permissions); the run must stop."""


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
        self._failed: CheckpointSaveError | None = None
        self._saving: int | None = None  # the step being written (for the failure message)
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
        """Start saving ``state`` (non-blocking when async); the data state and meta are captured now.

        An earlier asynchronous save that failed raises ``CheckpointSaveError`` here (see ``check``)."""
        self.wait()  # the previous save (had `every` steps to finish) must have committed, or its failure is named
        self._check_space(step, state)
        _drop_leftover_writes_into_a_closed_loop()
        meta = dict(meta or {})
        meta.update(step=int(step), fingerprint=fingerprint(state), saved_at=time.time())
        self._saving = int(step)
        try:
            ok = self.manager.save(int(step), args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=DataStateSave(data_state), meta=ocp.args.JsonSave(meta)),
                force=True)
        except Exception as e:  # orbax/tensorstore raise assorted types for a failed write
            raise self._save_failed(e) from None
        if not ok:
            raise CheckpointError(f"orbax refused to save step {step} in {self.directory}")
        if not self._async:
            self._saving = None

    def _check_space(self, step: int, state) -> None:
        """Refuse a save the file system cannot hold BEFORE writing anything: the run stops at this save
        with one message, no temporary folder, and every earlier checkpoint intact. (A failure while
        writing, e.g. a quota or a disk that fills meanwhile, is still caught by ``_save_failed``.)"""
        need = sum(int(np.prod(a.shape)) * a.dtype.itemsize for a in jax.tree.leaves(state))
        need = int(need * 1.05) + (64 << 10)  # orbax metadata, the data state and the meta JSON
        free = shutil.disk_usage(self.directory).free
        if free < need:
            self._saving = int(step)
            self._failed = CheckpointSaveError(
                f"checkpoint step {step} cannot be saved to {self.directory}: no space left on device (it needs "
                f"about {_human(need)}, {_human(free)} are free). Training stopped before writing it; "
                f"{self._last_complete(step)}. To continue, free disk "
                f"space or set checkpoint.dir to a larger disk and run the same command again (it resumes from "
                f"the last complete checkpoint).")
            raise self._failed

    def _last_complete(self, failed_step) -> str:
        try:
            good = [s for s in sorted(self.manager.all_steps()) if s != failed_step]
        except Exception:  # noqa: BLE001 - the listing is only for the message
            good = []
        return (f"the last complete checkpoint is {self.directory}/{good[-1]} and it is intact" if good
                else "no checkpoint was completed yet")

    def check(self) -> None:
        """Raise ``CheckpointSaveError`` if a background save failed (cheap; the trainer calls it every step)."""
        if self._failed is not None:
            raise self._failed
        try:
            self.manager.check_for_errors()
        except Exception as e:
            raise self._save_failed(e) from None

    def wait(self) -> None:
        if self._failed is not None:
            return  # already reported; nothing more is being written
        try:
            self.manager.wait_until_finished()
        except Exception as e:
            raise self._save_failed(e) from None
        self._saving = None

    def close(self) -> None:
        self.wait()
        if self._failed is None:  # after a failed save orbax's threads are in an error state: leave them be
            self.manager.close()
        else:
            self._remove_temporaries(self._saving)  # anything of the failed save written since it was reported

    def _save_failed(self, e: BaseException) -> CheckpointSaveError:
        """One clear error for a failed save; removes the step's temporary folder (nothing half-written stays)."""
        if self._failed is not None:
            return self._failed
        step = self._saving
        text = f"{type(e).__name__}: {e}"
        full = _is_disk_full(e)
        self._remove_temporaries(step)
        last = self._last_complete(step)
        free = shutil.disk_usage(self.directory).free if self.directory.exists() else 0
        why = (f"no space left on device ({_human(free)} free on the file system of {self.directory})" if full
               else f"the write failed ({text.splitlines()[0][:300]})")
        fix = ("free disk space or set checkpoint.dir to a larger disk" if full
               else "check that checkpoint.dir is writable")
        self._failed = CheckpointSaveError(
            f"checkpoint step {step} could not be saved to {self.directory}: {why}. Training stopped; {last}. "
            f"To continue, {fix} and run the same command again (it resumes from the last complete checkpoint).")
        return self._failed

    def _remove_temporaries(self, step) -> None:
        """Every ``<step>.orbax-checkpoint-tmp*`` folder: uncommitted by definition (orbax renames a step
        into place only once complete), and this run is the directory's only writer."""
        if jax.process_index() != 0:
            return
        # Writes of the failed save that were still in flight when the first one failed can go on once our
        # removal frees space, re-creating the folder (seen with a real full tmpfs): remove until it stays gone.
        deadline = time.monotonic() + 10
        while True:
            found = list(self.directory.glob("*.orbax-checkpoint-tmp*"))
            for tmp in found:
                shutil.rmtree(tmp, ignore_errors=True)
            if not found or time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    # -------------------------------------------------------------- restore
    def restore(self, step: int, abstract_state, *, data: bool = True):
        """Restore one step into ``abstract_state`` (ShapeDtypeStructs with shardings) and verify it.

        Returns (state, data_state, meta). Raises CheckpointError if anything is missing or corrupt.
        """
        try:
            items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
            if data:
                items["data"] = DataStateRestore()
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax/tensorstore raise many types for a damaged file
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable "
                                  f"({type(e).__name__}: {str(e)[:300]})") from e
        state, data_state, meta = out["state"], (out["data"] if data else None), out["meta"]
        if meta.get("step") != step:
            raise CheckpointError(f"checkpoint step {step}: meta says step {meta.get('step')}")
        want = meta.get("fingerprint")
        got = fingerprint(state)
        if want != got:
            bad = sorted(k for k in set(want or {}) | set(got) if (want or {}).get(k) != got.get(k))
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is corrupt: the fingerprint of "
                                  f"{len(bad)} array(s) differs from the one recorded at save time, e.g. {bad[:3]}")
        return state, data_state, meta

    def restore_latest(self, abstract_state, config: dict | None = None, *,
                       data: bool = True) -> Optional[tuple[int, Any, Any, dict]]:
        """Newest good checkpoint as (step, state, data_state, meta); None if the directory has none.

        A damaged step is moved to ``<dir>/corrupt/`` (so a later save of the same step number works) and
        the previous one is tried. If checkpoints exist but none is good, that is an error: starting
        from scratch silently would throw the run away. A readable checkpoint that does not fit
        ``abstract_state`` raises ``CheckpointMismatchError`` naming the differing fields of ``config``
        (this run's ``TrainConfig.to_dict()``) against the checkpoint's; nothing is moved. ``data=False``
        restores the arrays only (no data-iterator state: any number of processes, e.g. for evaluation).
        """
        steps = self.all_steps()
        if not steps:
            return None
        errors = []
        for step in reversed(steps):
            try:
                self.check_fits(step, abstract_state, config, data=data)
                state, data_state, meta = self.restore(step, abstract_state, data=data)
            except CheckpointMismatchError:
                raise
            except CheckpointError as e:
                log.warning("%s; falling back to the previous checkpoint", e)
                errors.append(str(e))
                self._quarantine(step)
                continue
            return step, state, data_state, meta
        raise CheckpointError(f"no usable checkpoint in {self.directory} (all {len(steps)} are damaged; moved to "
                              f"{self.directory / 'corrupt'}):\n  " + "\n  ".join(errors))

    def check_fits(self, step: int, abstract_state, config: dict | None = None, *, data: bool = True) -> None:
        """``CheckpointMismatchError`` if step's arrays (names, shapes, dtypes) or its per-process data files
        do not fit this run; ``CheckpointError`` if its metadata is unreadable (an integrity failure)."""
        try:
            saved_tree = self.manager.item_metadata(step)["state"]
            if saved_tree is None:
                raise FileNotFoundError(f"{self.directory / str(step) / 'state'} has no array metadata")
            saved = {_path_name(p): (tuple(m.shape), np.dtype(m.dtype).name)
                     for p, m in jax.tree_util.tree_leaves_with_path(saved_tree)}
        except Exception as e:  # noqa: BLE001 - a damaged metadata file is an integrity failure
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: its array metadata "
                                  f"cannot be read ({type(e).__name__}: {str(e)[:200]})") from e
        want = {_path_name(p): (tuple(a.shape), np.dtype(a.dtype).name)
                for p, a in jax.tree_util.tree_leaves_with_path(abstract_state)}
        differ = sorted(k for k in set(saved) | set(want) if saved.get(k) != want.get(k))
        where = self.directory / str(step)
        if differ:
            fields = _config_diff(_saved_config(where), config)
            shown = "; ".join(f"{k}: checkpoint {saved.get(k, 'absent')} vs this run {want.get(k, 'absent')}"
                              for k in differ[:3])
            named = (", ".join(fields) if fields else
                     "no config field differs: the starting weights (model.init) have another shape")
            raise CheckpointMismatchError(
                f"checkpoint {where} was written by a run with a different model or optimizer: {named}. "
                f"{len(differ)} array(s) do not fit, e.g. {shown}. Nothing was moved or deleted. To resume it, "
                f"run with the checkpoint's settings (its config is in {where}/meta); to start a new run, use "
                f"another checkpoint.dir.")
        if not data:
            return
        data_dir = where / "data"
        mine = data_dir / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
        others = sorted(f.name for f in data_dir.glob("process_*-of-*.json")) if data_dir.is_dir() else []
        if others and not mine.exists():
            raise CheckpointMismatchError(
                f"checkpoint {where} was written by {others[0].split('-of-')[1][:-5]} process(es), this run has "
                f"{jax.process_count()}: every process resumes its own data shard, so resume it with the same "
                f"number of processes (the arrays themselves restore onto any mesh). Nothing was moved.")

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


def _path_name(path) -> str:
    """'opt_state/1/0/mu/embed/embedding': one spelling for a leaf path whether the tree came from orbax's
    metadata (named tuples stored as dicts) or from the live state (named tuples: attribute keys)."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def _saved_config(step_dir: Path) -> dict | None:
    """The run config recorded in a step's meta item (None if unreadable: the message just names less)."""
    try:
        return json.loads((step_dir / "meta" / "metadata").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


# Fields that shape the train state (model arrays, optimizer-state tree); the others may change on resume.
_STATE_SECTIONS = ("model.", "optim.", "lora.")


def _config_diff(saved: dict | None, now: dict | None) -> list[str]:
    """``["model.hidden_size 64 -> 128", ...]``: state-shaping fields whose value differs."""
    if not saved or not now:
        return []
    a, b = _flatten(saved), _flatten(now)
    keys = sorted(k for k in set(a) | set(b) if k.startswith(_STATE_SECTIONS) and a.get(k) != b.get(k))
    return [f"{k} {a.get(k)!r} in the checkpoint vs {b.get(k)!r} now" for k in keys]


def _drop_leftover_writes_into_a_closed_loop() -> None:
    """Keep a failed save's leftover writes from printing tracebacks (installed once, before any save).

    When one write of an asynchronous save fails (ENOSPC on a disk that filled after the space check), orbax's
    event loop for that save ends at once; the save's other tensorstore writes, still in flight, complete
    afterwards and their callbacks raise ``RuntimeError('Event loop is closed')`` inside
    ``loop.call_soon_threadsafe``, which tensorstore reports as unraisable (``sys.unraisablehook``): dozens
    of tracebacks before our one message (seen on a full tmpfs in about 2 runs of 3). Those writes belong to
    the save that is reported as failed anyway; exactly that exception is dropped, anything else still
    reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_spiritlm_closed_loop_filter", False):
        return

    def hook(unraisable):
        frames = traceback.extract_tb(unraisable.exc_traceback)
        if (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                and frames and frames[-1].name == "_check_closed"
                and any(f.name == "call_soon_threadsafe" for f in frames)):
            return
        previous(unraisable)

    hook._spiritlm_closed_loop_filter = True
    sys.unraisablehook = hook
    # The same writes, once their task is garbage-collected, reach asyncio's "Task exception was never
    # retrieved" log with the disk-full error itself: that record goes too (only when it is a disk-full error).
    logging.getLogger("asyncio").addFilter(_unretrieved_disk_full_write)


def _unretrieved_disk_full_write(record: logging.LogRecord) -> bool:
    """A logging filter: False (drop) for asyncio's report of a never-retrieved disk-full write."""
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and str(record.msg).startswith("Task exception was never retrieved")
                and _is_disk_full(exc))


def _is_disk_full(e: BaseException) -> bool:
    """ENOSPC anywhere in the exception chain, or tensorstore's RESOURCE_EXHAUSTED write error."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(e)
        if "No space left" in text or "RESOURCE_EXHAUSTED" in text or "Disk quota exceeded" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def abstract_like(state, shardings=None):
    """ShapeDtypeStructs (with shardings) describing ``state``: the restore target."""
    if shardings is None:
        return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, "sharding", None)), state)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, shardings)


def host_state_equal(a, b) -> bool:
    """Bitwise equality of two pytrees (testing helper)."""
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb))
