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

Limit: when process 0 itself dies, JAX's client in every other process sees its error poll to the
coordination service fail at once and aborts from C++ within a second ("the JAX distributed service
detected fatal errors ... another task died"), before this watchdog can speak. jaxlib's client takes a
``missed_heartbeat_callback``, but ``jax.distributed.initialize`` passes none, and a Python callable given
there cannot receive the C++ status (std::bad_cast in jaxlib 0.10.2).
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_PEER_LOST = 5
_PREFIX = "spiritlm_jax/watchdog"

_watchdog: "PeerWatchdog | None" = None


def initialize(timeout_s: float = 60.0, *, hint: str = "", coordinator_address: str | None = None,
               num_processes: int | None = None, process_id: int | None = None) -> "PeerWatchdog | None":
    """``jax.distributed.initialize`` + gloo CPU collectives + a started ``PeerWatchdog`` (None for one
    process). ``hint`` is appended to the lost-peer message (e.g. where training resumes from)."""
    global _watchdog
    import jax

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
            try:
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
