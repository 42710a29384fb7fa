"""Checkpoints: kill + resume is bit-identical (params and data order), damaged checkpoints fall back to
the previous one, NaN stops the run with the last good checkpoint intact."""
from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spiritlm_jax import sharding as shd
from spiritlm_jax.converters.torch_io import CheckpointError
from spiritlm_jax.train.checkpointing import Checkpointer, CheckpointMismatchError
from spiritlm_jax.train.config import TrainConfig
from spiritlm_jax.train.trainer import SyntheticIterator, Trainer, TrainingDivergedError

TINY = ["model.vocab_size=256", "model.hidden_size=64", "model.intermediate_size=128", "model.num_hidden_layers=2",
        "model.num_attention_heads=8", "model.num_key_value_heads=4", "model.vocab_layout=none",
        "model.dtype=float32", "model.remat=none", "data.batch_size=8", "data.seq_len=16", "optim.lr=1e-2",
        "optim.warmup_steps=2", "progress=false", "tensorboard=false", "log_every=1", "checkpoint.every=2",
        "checkpoint.keep=3"]
STEPS = 6


class Killed(Exception):
    pass


class RecordingIterator(SyntheticIterator):
    """Records which global batch index each step consumed; raises ``Killed`` at a given batch."""

    def __init__(self, *a, kill_at=None, **kw):
        super().__init__(*a, **kw)
        self.kill_at, self.served = kill_at, []

    def __next__(self):
        if self.kill_at is not None and self.n == self.kill_at:
            raise Killed(f"simulated kill before batch {self.n}")
        self.served.append(self.n)
        return super().__next__()


def cfg_for(d: Path, *extra):
    return TrainConfig().override(*TINY, f"steps={STEPS}", f"checkpoint.dir={d}", *extra)


def mesh():
    return shd.make_mesh((2, 2, 2))


def host(tree):
    return jax.tree.map(np.asarray, jax.device_get(tree))


def bit_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return len(la) == len(lb) and all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(la, lb))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    d = tmp_path_factory.mktemp("full")
    it = RecordingIterator(8, 16, 256, seed=4)
    tr = Trainer(cfg_for(d), it, mesh=mesh())
    tr.train()
    tr.close()
    return host(tr.state), it.served, d


def test_kill_and_resume_is_bit_identical(tmp_path, uninterrupted):
    ref_state, ref_order, _ = uninterrupted
    # Run 1 dies while fetching the batch of step 4, after checkpoint 2 was saved and step 3 was done.
    it1 = RecordingIterator(8, 16, 256, seed=4, kill_at=3)
    tr1 = Trainer(cfg_for(tmp_path), it1, mesh=mesh())
    with pytest.raises(Killed):
        tr1.train()
    tr1.close()
    assert Checkpointer(tmp_path).all_steps() == [2]
    # Run 2: a fresh process-like trainer resumes from step 2 and replays step 3 onwards.
    it2 = RecordingIterator(8, 16, 256, seed=4)
    tr2 = Trainer(cfg_for(tmp_path), it2, mesh=mesh())
    assert tr2.initialize() == 2
    tr2.train()
    tr2.close()
    assert it1.served == [0, 1, 2]
    assert it2.served == ref_order[2:]  # the data order continues exactly where checkpoint 2 left it
    assert bit_equal(host(tr2.state), ref_state)
    assert Checkpointer(tmp_path).all_steps() == [2, 4, 6]


def test_restore_onto_another_mesh_is_exact(uninterrupted):
    # A checkpoint written on a (2,2,2) mesh restores onto (1,8,1): orbax reads each new shard from the
    # stored arrays, so the values are bit-identical and laid out by the rules table for the new mesh.
    ref_state, _, full_dir = uninterrupted
    m = shd.make_mesh((1, 8, 1))
    tr = Trainer(cfg_for(full_dir), RecordingIterator(8, 16, 256), mesh=m)
    step, state, data_state, _ = Checkpointer(full_dir).restore_latest(tr.layout.abstract)
    assert step == STEPS and data_state == {"batch": STEPS}
    assert bit_equal(host(state), ref_state)
    for got, want in zip(jax.tree.leaves(state), jax.tree.leaves(tr.layout.shardings)):
        assert got.sharding.is_equivalent_to(want, got.ndim)


def _largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "missing_item"])
def test_damaged_latest_checkpoint_falls_back(tmp_path, uninterrupted, damage, caplog):
    import shutil

    _, _, full = uninterrupted
    d = tmp_path / "ck"
    shutil.copytree(full, d)
    assert Checkpointer(d).all_steps() == [2, 4, 6]
    victim = d / "6"
    if damage == "truncate":
        f = _largest_file(victim / "state")
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "bitflip":  # same size, one byte changed: only the fingerprint can tell
        f = _largest_file(victim / "state")
        b = bytearray(f.read_bytes())
        b[len(b) // 2] ^= 0x10
        f.write_bytes(bytes(b))
    else:  # a partial copy: the data-iterator state never arrived
        shutil.rmtree(victim / "data")
    it = RecordingIterator(8, 16, 256, seed=4)
    tr = Trainer(cfg_for(d, "steps=8"), it, mesh=mesh())
    with caplog.at_level("WARNING", logger="spiritlm_jax.train"):
        assert tr.initialize() == 4
    assert "checkpoint step 6" in caplog.text and "falling back" in caplog.text
    assert list((d / "corrupt").iterdir())[0].name.startswith("6-")
    assert it.n == 4  # the data iterator is back at checkpoint 4's position
    if damage == "truncate":
        tr.train()  # and training continues, re-saving step 6 (its old directory was moved aside) and 8
        assert Checkpointer(d).all_steps() == [4, 6, 8]
    tr.close()


def test_all_checkpoints_damaged_is_an_error(tmp_path, uninterrupted):
    import shutil

    _, _, full = uninterrupted
    d = tmp_path / "ck"
    shutil.copytree(full, d)
    for s in (2, 4, 6):
        shutil.rmtree(d / str(s) / "data")
    ck = Checkpointer(d)
    tr = Trainer(cfg_for(d), RecordingIterator(8, 16, 256), mesh=mesh())
    with pytest.raises(CheckpointError, match="no usable checkpoint"):
        ck.restore_latest(tr.layout.abstract)


def test_nan_stops_run_and_keeps_last_good_checkpoint(tmp_path):
    tr = Trainer(cfg_for(tmp_path), RecordingIterator(8, 16, 256, seed=4), mesh=mesh())
    tr.train(until=4)
    saved = host(tr.state)
    # Poison the weights, as a blow-up would: the next loss is NaN.
    p = tr.state["params"]
    p["final_norm"]["scale"] = jnp.full_like(p["final_norm"]["scale"], jnp.nan)
    with pytest.raises(TrainingDivergedError, match=r"non-finite training signal at step 5: loss=nan.*"
                                                    r"last good checkpoint is .*/4"):
        tr.train()
    tr.close()
    ck = Checkpointer(tmp_path)
    assert ck.all_steps() == [2, 4]
    step, state, _, _ = ck.restore_latest(tr.layout.abstract)
    assert step == 4 and bit_equal(host(state), saved)


@pytest.mark.parametrize("change", [("model.hidden_size=32",), ("model.num_hidden_layers=3",),
                                    ("optim.clip_norm=0",)])
def test_resume_with_changed_config_names_the_fields_and_moves_nothing(tmp_path, uninterrupted, change):
    # A valid checkpoint of another model (or optimizer-state layout) is a user mistake, not corruption:
    # before, every such checkpoint was moved to corrupt/ and the next correct run silently restarted at 1.
    import shutil

    _, _, full = uninterrupted
    d = tmp_path / "ck"
    shutil.copytree(full, d)
    before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
    tr = Trainer(cfg_for(d, "steps=8", *change), RecordingIterator(8, 16, 256, seed=4), mesh=mesh())
    with pytest.raises(CheckpointMismatchError) as e:
        tr.initialize()
    msg = str(e.value)
    field = change[0].split("=")[0]
    assert f"checkpoint {d}/6 was written by a run with a different model or optimizer" in msg
    assert field in msg and "Nothing was moved" in msg, msg
    assert sorted(str(p.relative_to(d)) for p in d.rglob("*")) == before  # nothing moved or deleted
    # and the correct config still resumes from the newest step
    tr2 = Trainer(cfg_for(d, "steps=8"), RecordingIterator(8, 16, 256, seed=4), mesh=mesh())
    assert tr2.initialize() == 6
    tr2.close()


def test_resume_with_changed_config_through_the_cli(tmp_path, uninterrupted, capsys):
    import shutil

    from spiritlm_jax.cli import main

    _, _, full = uninterrupted
    d = tmp_path / "ck"
    shutil.copytree(full, d)
    assert main(["train", *TINY, "steps=8", f"checkpoint.dir={d}", "model.intermediate_size=96"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") <= 2 and "Traceback" not in err
    assert "model.intermediate_size 128 in the checkpoint vs 96 now" in err
    assert not (d / "corrupt").exists() and Checkpointer(d).all_steps() == [2, 4, 6]


def test_metrics_rows_are_not_repeated_after_a_resume(tmp_path):
    # A run killed after step 3's row but before checkpoint 4 replays step 3 on resume: its row is
    # dropped first, so metrics.jsonl holds every step exactly once.
    import json

    it1 = RecordingIterator(8, 16, 256, seed=4, kill_at=4)
    tr1 = Trainer(cfg_for(tmp_path), it1, mesh=mesh())
    with pytest.raises(Killed):
        tr1.train()
    tr1.close()
    rows = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]  # step 4's row was written, its checkpoint too; nothing past it
    (tmp_path / "metrics.jsonl").open("a").write('{"step": 5, "loss"')  # a row half-written by a crash
    tr2 = Trainer(cfg_for(tmp_path), RecordingIterator(8, 16, 256, seed=4), mesh=mesh())
    tr2.train()
    tr2.close()
    rows = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4, 5, 6]


def test_resume_from_an_older_checkpoint_drops_the_replayed_rows(tmp_path, uninterrupted):
    import json
    import shutil

    _, _, full = uninterrupted
    d = tmp_path / "ck"
    shutil.copytree(full, d)
    shutil.rmtree(d / "6")  # resume must come from 4 and replay 5 and 6
    tr = Trainer(cfg_for(d), RecordingIterator(8, 16, 256, seed=4), mesh=mesh())
    assert tr.initialize() == 4
    rows = [json.loads(x)["step"] for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3, 4]
    tr.close()


def _train_on_a_small_disk(tmp_path, *, preflight: bool):
    """`spiritlm-jax train` with checkpoints on a REAL 2200 KiB tmpfs, mounted in a private mount namespace
    (`unshare --map-root-user --mount`, no root needed where user namespaces are allowed): it holds exactly
    one checkpoint of this model (1.4 MB measured), so the save of step 4 cannot fit. Everything runs inside
    the namespace (the mount vanishes with it); the run folder is copied out for the checks.
    ``preflight=False`` turns the free-space check into a pass (as when the disk fills, or a quota bites,
    after it): the write itself then hits ENOSPC in orbax's background thread."""
    import shlex
    import shutil
    import subprocess
    import sys

    disk, out = tmp_path / "disk", tmp_path / "copied"
    disk.mkdir()
    args = ["train", *TINY, "steps=8", "checkpoint.keep=5", f"checkpoint.dir={disk}/run"]
    code = ("import sys; from spiritlm_jax.cli import main; from spiritlm_jax.train.checkpointing import Checkpointer; "
            + ("" if preflight else "Checkpointer._check_space = lambda self, step, state: None; ")
            + f"sys.exit(main({args!r}))")
    script = (f"mount -t tmpfs -o size=2200k tmpfs {disk} && {shlex.join([sys.executable, '-c', code])} 2>{tmp_path}/err; "
              f"echo $? > {tmp_path}/rc; ls -a {disk}/run > {tmp_path}/listing; cp -a {disk}/run {out}")
    assert shutil.which("unshare"), "util-linux's unshare is needed to mount a private tmpfs"
    subprocess.run(["unshare", "--map-root-user", "--mount", "sh", "-c", script], check=True, timeout=300,
                   env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    err = (tmp_path / "err").read_text()
    assert (tmp_path / "rc").read_text().strip() == "4", err
    assert "Traceback" not in err, err
    msg = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(msg) == 1, err
    assert "no space left on device" in msg[0] and f"the last complete checkpoint is {disk}/run/2 and it is intact" in msg[0]
    listing = (tmp_path / "listing").read_text().split()
    assert "2" in listing and "4" not in listing and not [n for n in listing if "tmp" in n], listing  # nothing half-written
    # the copied checkpoint 2 restores and verifies (fingerprint) in a fresh trainer
    tr = Trainer(cfg_for(out), RecordingIterator(8, 16, 256, seed=4), mesh=mesh())
    assert tr.initialize() == 2
    tr.close()
    return msg[0], err


def test_disk_full_stops_at_the_save_with_the_last_checkpoint_intact(tmp_path):
    msg, err = _train_on_a_small_disk(tmp_path, preflight=True)
    assert "checkpoint step 4 cannot be saved" in msg and "Training stopped before writing it" in msg
    assert "step 5:" not in err  # it stopped at the failed save, not later


def test_disk_full_during_the_write_after_the_space_check_passed(tmp_path):
    # The fallback: the ENOSPC comes from tensorstore in orbax's background thread while steps 5-6 train;
    # the trainer's per-step check, or at the latest the next save (step 6) which waits for this one, names
    # it, removes the temporary folder (also what in-flight writes put back after that) and stops.
    msg, err = _train_on_a_small_disk(tmp_path, preflight=False)
    assert "checkpoint step 4 could not be saved" in msg and "Training stopped" in msg
    assert "step 7:" not in err  # stopped no later than the next save


def test_only_a_failed_saves_writes_into_the_closed_loop_are_silenced(monkeypatch):
    """The unraisable-hook filter behind the disk-full test: a tensorstore callback's 'Event loop is closed'
    (raised in loop.call_soon_threadsafe after a failed save ended orbax's loop) is dropped; every other
    unraisable exception still reaches the previous hook."""
    import asyncio
    import sys

    from spiritlm_jax.train import checkpointing

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    checkpointing._drop_leftover_writes_into_a_closed_loop()
    checkpointing._drop_leftover_writes_into_a_closed_loop()  # installed once, not stacked

    def unraisable(call):
        try:
            call()
        except Exception as e:  # noqa: BLE001 - captured to hand to the hook, as CPython does
            return type("U", (), {"exc_type": type(e), "exc_value": e, "exc_traceback": e.__traceback__,
                                  "err_msg": None, "object": None})()

    loop = asyncio.new_event_loop()
    loop.close()
    closed = unraisable(lambda: loop.call_soon_threadsafe(print))
    other = unraisable(lambda: 1 / 0)
    sys.unraisablehook(closed)
    assert seen == []
    sys.unraisablehook(other)
    assert seen == [other]


def test_asyncio_report_of_a_never_retrieved_disk_full_write_is_dropped_and_nothing_else():
    import errno
    import logging

    from spiritlm_jax.train.checkpointing import _unretrieved_disk_full_write

    def record(msg, exc):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, msg, None, (type(exc), exc, None))

    full = ValueError('RESOURCE_EXHAUSTED: Error writing "k/0.0" ... No space left on device')
    assert not _unretrieved_disk_full_write(record("Task exception was never retrieved\nfuture: <Task>", full))
    assert not _unretrieved_disk_full_write(record("Task exception was never retrieved", OSError(errno.ENOSPC, "x")))
    assert _unretrieved_disk_full_write(record("Task exception was never retrieved", ValueError("other")))
    assert _unretrieved_disk_full_write(record("Unclosed event loop", full))
