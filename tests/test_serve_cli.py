"""`spiritlm-jax serve` as a user starts it: a subprocess on 127.0.0.1 that serves the demo model, drains
the request in flight on SIGTERM and exits 0; bad flags exit 1 with a message naming the fix."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from spiritlm_jax import runtime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_cli_serves_and_sigterm_drains_the_request_in_flight(tmp_path):
    port = free_port()
    log = open(tmp_path / "serve.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "spiritlm_jax.cli", "serve", "--demo", "--no-speech", "--slots", "2",
                             "--max-len", "128", "--short-slots", "1", "--short-len", "64", "--precompile", "--port", str(port)], stdout=log, stderr=subprocess.STDOUT,
                            env={**os.environ, "JAX_PLATFORMS": "cpu"})
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, open(tmp_path / "serve.log").read()
            try:
                health = json.loads(urllib.request.urlopen(base + "/health", timeout=1).read())
                break
            except OSError:
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
        assert health["status"] == "ok" and health["slots"] == 2
        # the server runs with malloc huge pages (spiritlm_jax/runtime.py): it re-executed itself in place
        if runtime.malloc_hugepages_environment({}) is not None:  # glibc >= 2.35, as on CI's Linux
            environ = open(f"/proc/{proc.pid}/environ", "rb").read().split(b"\0")
            assert b"GLIBC_TUNABLES=glibc.malloc.hugetlb=1" in environ
        body = json.dumps({"model": "spirit-lm-base-7b", "prompt": "Once upon a time", "max_tokens": 60,
                           "temperature": 0, "stream": True}).encode()
        req = urllib.request.Request(base + "/v1/completions", body, {"Content-Type": "application/json"})
        events = []
        with urllib.request.urlopen(req, timeout=120) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 2:
                    proc.send_signal(signal.SIGTERM)  # mid-stream: the request must still finish
        assert events[-1] == "[DONE]"
        finals = [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-1]]
        assert finals[-1] in ("length", "stop")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    text = open(tmp_path / "serve.log").read()
    assert "serving 'spirit-lm-base-7b' on http://127.0.0.1:" in text and "(2 slots: 1 × 128 + 1 × 64 positions" in text
    assert "precompiled " in text and " prefill shapes, decode windows [128])" in text  # --precompile ran first


@pytest.mark.parametrize("flags, message", [
    (["--mesh", "rows=2"], "expected AXIS=N pairs"),
    (["--slots", "0"], "--slots must be ≥ 1"),
    (["--slots", "2", "--short-slots", "2"], "short_slots must be in [0, slots - 1] = [0, 1]"),
    (["--slots", "2", "--max-len", "128", "--short-slots", "1", "--short-len", "128"],
     "short_len must be in [2, max_len) = [2, 128), got 128"),
    (["--model", "/nonexistent/model"], "cannot load"),
])
def test_serve_cli_bad_flags_exit_1_with_the_fix(flags, message, capsys):
    from spiritlm_jax.cli import main

    assert main(["serve", "--demo", "--no-speech", "--no-warmup", *flags]) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
