"""One process of the two-process tests in test_multihost.py (run as a script, never collected by pytest).

    python tests/multihost_worker.py OUT_DIR [--kill-at-step N --kill-process P] [--generate JSON] -- key=value ...
    python tests/multihost_worker.py OUT_DIR --idle TIMEOUT_S

Runs ``spiritlm-jax train distributed=true ...`` through the real CLI entry point (``spiritlm_jax.cli.main``)
in this process, with two probes that do not change what is trained:

* every record the grain loader reads from the prepared dataset is logged (``reads-<process>.jsonl``), to
  prove the per-host shards are disjoint and cover the data;
* ``--kill-at-step N``: process P (default 1) SIGKILLs itself when the trainer asks for the batch of step N
  (after the checkpoint of step N-2 has been committed), as a crashed host would.

After a run that ends normally, in the same processes: the newest checkpoint is restored onto ANOTHER mesh
(2, 2, 2) and gathered (``params-restored.npz``, process 0), and the restored model generates greedily from
fixed prompts with the batch sharded over both processes (``generated.json``, process 0); with
``--generate '[ARGS]'``, ``spiritlm-jax generate --distributed ARGS`` then runs in both processes (its stdout
in ``generate-<process>.txt``).

``--idle TIMEOUT_S``: no training; ``distributed.initialize(TIMEOUT_S)``, write ``ready-<process>``, then
wait (up to 120 s) to be killed or to lose a peer: the cheapest run of the peer watchdog in both directions.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path


def _record_reads(log_file: Path):
    from spiritlm_jax.train import loader

    real = loader.open_sources
    log = open(log_file, "a", buffering=1)  # line-buffered: a killed process keeps what it read

    class Logged:
        def __init__(self, name, source):
            self.name, self.source = name, source

        def __len__(self):
            return len(self.source)

        def __getitem__(self, i):
            log.write(json.dumps([self.name, int(i)]) + "\n")
            return self.source[i]

    def open_sources(data_dir):
        sources, meta = real(data_dir)
        return {k: Logged(k, v) for k, v in sources.items()}, meta

    loader.open_sources = open_sources


def _kill_at(step: int, ckpt_dir: Path):
    from spiritlm_jax.train import cli

    real = cli.make_data_iterator

    class Killing:
        def __init__(self, it):
            self.it, self.n = it, 0

        def __next__(self):
            self.n += 1
            if self.n == step:
                deadline = time.time() + 60
                while not (ckpt_dir / str(step - 2)).is_dir() and time.time() < deadline:
                    time.sleep(0.05)
                (ckpt_dir.parent / "killed_at").write_text(repr(time.time()))
                os.kill(os.getpid(), signal.SIGKILL)
            return next(self.it)

        def get_state(self):
            return self.it.get_state()

        def set_state(self, state):
            self.it.set_state(state)

    cli.make_data_iterator = lambda cfg, vocab_size: Killing(real(cfg, vocab_size))


def _restore_and_generate(cfg, out: Path):
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from spiritlm_jax import sharding as shd
    from spiritlm_jax.infer.engine import SamplingConfig, generate
    from spiritlm_jax.train.checkpointing import Checkpointer
    from spiritlm_jax.train.trainer import Trainer

    mesh = shd.make_mesh((2, 2, 2))
    tr = Trainer(cfg, data=None, mesh=mesh)
    step, state, _, _ = Checkpointer(cfg.checkpoint.dir).restore_latest(tr.layout.abstract)
    params = multihost_utils.process_allgather(state["params"], tiled=True)
    prompts = [[1 + (7 * r + 3 * j) % 500 for j in range(3 + r)] for r in range(8)]
    ids, _ = generate(tr.llama_cfg, state["params"], prompts, SamplingConfig(max_new_tokens=6), mesh=mesh)
    if jax.process_index() == 0:
        flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_leaves_with_path(params)}
        np.savez(out / "params-restored.npz", **flat)
        (out / "generated.json").write_text(json.dumps({"step": int(step), "prompts": prompts, "ids": ids}))


def _generate_cli(argv: list[str], out: Path, pid: int) -> int:
    import contextlib

    from spiritlm_jax.cli import main as cli_main

    with open(out / f"generate-{pid}.txt", "w") as f, contextlib.redirect_stdout(f):
        return cli_main(["generate", "--distributed", *argv])


def _idle(timeout_s: float, out: Path, pid: int) -> int:
    from spiritlm_jax import distributed

    distributed.initialize(timeout_s)
    from jax._src import distributed as jax_distributed

    service = jax_distributed.global_state.service  # process 0: the child hosting the coordination service
    if service is not None:
        (out / "coordinator-pid").write_text(str(service.proc.pid))
    (out / f"ready-{pid}").write_text(repr(time.time()))
    time.sleep(120)  # killed, or the watchdog ends this process when its peer is killed
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("out")
    p.add_argument("--kill-at-step", type=int, default=None)
    p.add_argument("--kill-process", type=int, default=1)
    p.add_argument("--generate", default=None, metavar="JSON", help="generate arguments, a JSON list")
    p.add_argument("--idle", type=float, default=None, metavar="TIMEOUT_S")
    cut = sys.argv.index("--") if "--" in sys.argv else len(sys.argv)
    a = p.parse_args(sys.argv[1:cut])
    a.overrides = sys.argv[cut + 1:]
    out = Path(a.out)
    pid = int(os.environ["JAX_PROCESS_ID"])
    (out / f"started-{pid}").write_text(repr(time.time()))
    if a.idle is not None:
        return _idle(a.idle, out, pid)
    _record_reads(out / f"reads-{pid}.jsonl")
    ckpt = next(Path(o.split("=", 1)[1]) for o in a.overrides if o.startswith("checkpoint.dir="))
    if a.kill_at_step and pid == a.kill_process:
        _kill_at(a.kill_at_step, ckpt)
    from spiritlm_jax.cli import main as cli_main

    argv = ["train", "distributed=true", *a.overrides]
    t0 = time.perf_counter()
    rc = cli_main(argv)
    wall = {"train_wall_s": time.perf_counter() - t0}  # where the pair's time goes, for the test's report
    if rc == 0:
        from spiritlm_jax.train.config import TrainConfig

        t0 = time.perf_counter()
        _restore_and_generate(TrainConfig.load(None, a.overrides), out)
        wall["restore_and_generate_s"] = time.perf_counter() - t0
        if a.generate:
            t0 = time.perf_counter()
            rc = _generate_cli(json.loads(a.generate), out, pid)
            wall["generate_cli_s"] = time.perf_counter() - t0
    (out / f"wall-{pid}.json").write_text(json.dumps(wall))
    from spiritlm_jax import distributed

    distributed.finish()
    return rc


if __name__ == "__main__":
    sys.exit(main())
