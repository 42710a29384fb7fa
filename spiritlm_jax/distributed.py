"""Multi-host start-up and the peer watchdog: when one process of a job dies, every other one stops soon,
with a message naming the lost process, instead of running on blind.

``initialize(timeout_s)`` calls ``jax.distributed.initialize`` (auto-detects TPU pods and SLURM, or reads
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``), picks gloo for CPU collectives
(the only cross-process CPU implementation), and starts a ``PeerWatchdog``.

Why our own watchdog: without it, a process whose peer was killed waits inside a collective until JAX's
coordination service notices the missing heartbeats (``heartbeat_timeout_seconds``, 100 s by default) and
then aborts it from C++ (SIGABRT, exit 134, a fatal log that names nothing useful). On a pod slice that burns
every other host's time. The watchdog is a daemon thread: every ``timeout_s / 20`` it bumps this process's
counter in the coordination service's key-value store and reads the others'. A peer whose counter has not
moved for ``timeout_s`` is lost (killed, crashed, or hung); a coordination service that cannot be reached
for ``timeout_s`` means process 0, which hosts it, is gone. Either way the watchdog prints one line naming
the lost process and what to do, and ends this process with exit code ``EXIT_PEER_LOST`` right away
(``os._exit``: the main thread may be blocked in a collective that will never finish, and JAX's shutdown
barrier would wait for the dead peer). JAX's own heartbeat timeout is set well above ours so that JAX never
aborts first. A process that finishes normally marks itself done first, so a peer that is still saving
its last checkpoint does not mistake the finished one for a dead one.

Process 0 may die too. JAX hosts its coordination service inside process 0, so when process 0 dies the
others' clients lose their connection to it at once and JAX aborts them from C++ within a second (SIGABRT,
"the JAX distributed service detected fatal errors ... another task died"), before any watchdog can speak;
jaxlib's ``missed_heartbeat_callback`` cannot replace that abort with Python (a Python callable there cannot
receive the C++ status: std::bad_cast, itself an abort, in jaxlib 0.10.2). So process 0 hosts the service in
a small child process instead (``CoordinatorProcess``; the service and its arguments are JAX's own, only the
process differs): when process 0 dies, the service lives on, process 0's heartbeats stop like any other
peer's, and the others' watchdogs name it and stop. The child ends when process 0 shuts down normally, or,
after process 0 died, when no process is connected any more (Linux: ``/proc/net/tcp``) or at the latest
``2 * timeout_s + 10`` s later. What remains: if the whole machine of process 0 goes (child included), JAX
still aborts the others from C++ within a second.
"""
from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time

EXIT_PEER_LOST = 5
TIMEOUT_RANGE_S = (1, 3600)  # a peer silent this long is lost: below 1 s heartbeats misfire, above an hour nobody waits
_PREFIX = "spiritlm_jax/watchdog"

_watchdog: "PeerWatchdog | None" = None


def initialize(timeout_s: float = 60.0, *, hint: str = "", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> "PeerWatchdog | None":
    """``jax.distributed.initialize`` + gloo CPU collectives + a started ``PeerWatchdog`` (None for one
    process). ``hint`` is appended to the lost-peer message (e.g. where training resumes from). Called again
    in the same process (e.g. generation after training), it keeps the running job and its watchdog."""
    global _watchdog
    import jax

    if jax.distributed.is_initialized():
        return _watchdog

    kwargs = {}
    address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address:
        kwargs["coordinator_address"] = address
    if num_processes is not None or os.environ.get("JAX_NUM_PROCESSES"):
        kwargs["num_processes"] = int(num_processes if num_processes is not None else os.environ["JAX_NUM_PROCESSES"])
    if process_id is not None or os.environ.get("JAX_PROCESS_ID"):
        kwargs["process_id"] = int(process_id if process_id is not None else os.environ["JAX_PROCESS_ID"])
    if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's own detection must come later than ours: its abort is the failure mode this module replaces.
    backstop = int(3 * timeout_s + 30)
    with _service_in_a_child_process(grace_s=2 * timeout_s + 10):
        jax.distributed.initialize(heartbeat_timeout_seconds=backstop, shutdown_timeout_seconds=backstop, **kwargs)
    if jax.process_count() == 1:
        return None
    from jax._src import distributed as jax_distributed

    _watchdog = PeerWatchdog(jax_distributed.global_state.client, jax.process_index(), jax.process_count(),
                             timeout_s, coordinator=address or "the coordinator", hint=hint)
    _watchdog.start()
    return _watchdog


def finish() -> None:
    """Mark this process as done (peers stop watching it) and stop its watchdog. Call before exiting."""
    global _watchdog
    if _watchdog is not None:
        _watchdog.finish()
        _watchdog = None


def lost_peer_message(wait_s: float | None = None) -> str | None:
    """If the watchdog has found (or, within ``wait_s``, finds) a lost peer, its message; else None. For a
    main thread whose collective just failed: was it because a peer died?"""
    return _watchdog.wait_for_verdict(wait_s) if _watchdog is not None else None


def exit_if_a_peer_was_lost() -> None:
    """For a main thread whose collective, barrier or save just failed: if that was because a peer died,
    report THAT (the watchdog decides within its timeout) and exit ``EXIT_PEER_LOST``, skipping JAX's
    shutdown barrier, which would wait for the dead peer and then abort. Otherwise return (re-raise yours)."""
    if lost_peer_message() is not None:
        _watchdog.report_and_exit()


class PeerWatchdog(threading.Thread):
    def __init__(self, client, process_id: int, num_processes: int, timeout_s: float, *,
                 coordinator: str = "the coordinator", hint: str = "", exit_on_loss: bool = True):
        super().__init__(name="spiritlm-peer-watchdog", daemon=True)
        self.client, self.me, self.n = client, process_id, num_processes
        self.timeout_s = float(timeout_s)
        self.interval_s = max(0.1, self.timeout_s / 20)
        self.coordinator, self.hint, self.exit_on_loss = coordinator, hint, exit_on_loss
        self.verdict: str | None = None
        self._found = threading.Event()
        self._halt = threading.Event()
        self._report_lock = threading.Lock()
        self._reported = False

    # ------------------------------------------------------------------ thread
    def run(self) -> None:
        beat = 0
        now = time.monotonic()
        seen = {p: (None, now) for p in range(self.n) if p != self.me}
        reached = now
        while not self._halt.is_set():
            beat += 1
            now = time.monotonic()
            try:
                self.client.key_value_set(f"{_PREFIX}/alive/{self.me}", str(beat), allow_overwrite=True)
                reached = now
                for p in list(seen):
                    if self._try_get(f"{_PREFIX}/done/{p}") is not None:
                        del seen[p]  # finished normally: no longer watched
                        continue
                    value = self._try_get(f"{_PREFIX}/alive/{p}")
                    if value != seen[p][0]:
                        seen[p] = (value, now)
                    elif now - seen[p][1] > self.timeout_s:
                        return self._lost(f"lost contact with process {p} of {self.n}: no heartbeat for "
                                          f"{now - seen[p][1]:.0f} s (it was killed, crashed or hangs)")
            except Exception as e:  # noqa: BLE001 - the coordination service itself is unreachable
                if now - reached > self.timeout_s:
                    first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                    return self._lost(f"lost contact with process 0 of {self.n}, which hosts the coordination "
                                      f"service at {self.coordinator}: unreachable for {now - reached:.0f} s "
                                      f"(it was killed, crashed or hangs; {first})")
            self._halt.wait(self.interval_s)

    def _try_get(self, key: str) -> str | None:
        try:
            return self.client.key_value_try_get(key)
        except Exception as e:  # NOT_FOUND for a key not written yet; anything else is a service problem
            if "NOT_FOUND" in str(e) or "not found" in str(e).lower():
                return None
            raise

    def _lost(self, what: str) -> None:
        self.verdict = (f"error: process {self.me} of {self.n}: {what}. Stopping this process too (exit "
                        f"{EXIT_PEER_LOST}) instead of waiting on it; restart every process with the same "
                        f"command{'. ' + self.hint if self.hint else ''}.")
        self._found.set()
        if self.exit_on_loss:
            self.report_and_exit()

    def report_and_exit(self) -> None:
        """Print the verdict once (the main thread may be here too) and end the process."""
        with self._report_lock:
            try:
                if not self._reported:
                    self._reported = True
                    print(self.verdict, file=sys.stderr, flush=True)
            finally:
                os._exit(EXIT_PEER_LOST)

    # ------------------------------------------------------------------ control
    def wait_for_verdict(self, wait_s: float | None = None) -> str | None:
        self._found.wait(self.timeout_s * 1.5 if wait_s is None else wait_s)
        return self.verdict

    def finish(self) -> None:
        self._halt.set()
        try:
            self.client.key_value_set(f"{_PREFIX}/done/{self.me}", "1", allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may already be gone at the very end
            pass


# --------------------------------------------------------------------------- the coordination service's process
@contextlib.contextmanager
def _service_in_a_child_process(grace_s: float):
    """While ``jax.distributed.initialize`` runs, its ``_jax.get_distributed_runtime_service`` (called in
    process 0 only) starts the service in a ``CoordinatorProcess`` instead of in this process; everything else
    JAX does there (cluster auto-detection, the client, the preemption manager) is unchanged."""
    from jax._src import distributed as jax_distributed

    real = jax_distributed._jax

    class _Lib:
        def __getattr__(self, name):
            return getattr(real, name)

        @staticmethod
        def get_distributed_runtime_service(address, num_nodes, **options):
            return CoordinatorProcess(address, num_nodes, grace_s=grace_s, **options)

    jax_distributed._jax = _Lib()
    try:
        yield
    finally:
        jax_distributed._jax = real


class CoordinatorProcess:
    """JAX's coordination service (``get_distributed_runtime_service``) in a child process that outlives a
    crash of its parent by a bounded grace period. Duck-types ``DistributedRuntimeService`` (``shutdown()``),
    so ``jax.distributed.shutdown()`` ends it. The parent's stdin pipe is its lifeline: ``done`` = normal
    shutdown; end of file without it = the parent died."""

    def __init__(self, address: str, num_nodes: int, *, grace_s: float, start_timeout_s: float = 120.0, **options):
        options = {k: v for k, v in options.items() if v is not None}
        self.address = address
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spiritlm_jax.distributed", "serve", address, str(num_nodes), str(grace_s),
             json.dumps(options)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], start_timeout_s)
        line = self.proc.stdout.readline().strip() if ready else ""
        if line != "ready":
            self.proc.kill()
            self.proc.wait()
            raise RuntimeError(f"could not start the JAX coordination service on {address}: "
                               f"{line or f'no answer within {start_timeout_s:.0f} s'}")

    def shutdown(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("done\n")
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


def _established_connections(port: int) -> int | None:
    """TCP connections to our port that are still open (Linux's /proc/net/tcp{,6}); None where unreadable."""
    count, seen = 0, False
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = open(table).read().splitlines()[1:]
        except OSError:
            continue
        seen = True
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[3] == "01" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                count += 1
    return count if seen else None


def _serve(address: str, num_nodes: int, grace_s: float, options: dict) -> int:
    """The child's main: host the service until the parent says ``done``, or, when the parent died, until
    nobody is connected or ``grace_s`` has passed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C to the job is the parent's to handle
    from jaxlib import _jax  # not `import jax`: the service needs the C++ library only

    try:
        service = _jax.get_distributed_runtime_service(address, num_nodes, **options)
    except Exception as e:  # noqa: BLE001 - the reason goes to the parent, which raises it
        print(str(e).splitlines()[0] if str(e) else type(e).__name__, flush=True)
        return 1
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "done":  # the parent died: the others' watchdogs need the service
        port = int(address.rsplit(":", 1)[1])
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and _established_connections(port) != 0:
            time.sleep(0.5)
    service.shutdown()
    return 0


if __name__ == "__main__" and len(sys.argv) == 6 and sys.argv[1] == "serve":
    sys.stdout.flush()
    os._exit(_serve(sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), json.loads(sys.argv[5])))
