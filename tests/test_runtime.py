"""spiritlm_jax.runtime: the inference commands re-execute themselves once with glibc's malloc huge pages."""
import os
import subprocess
import sys

import pytest

from spiritlm_jax import runtime

GLIBC = ("glibc", "2.36")


def test_the_tunable_is_added_once_and_only_where_it_applies():
    env = runtime.malloc_hugepages_environment({"PATH": "/bin"}, GLIBC)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}
    # a user's own tunables are kept, ours appended with glibc's ':' separator
    env = runtime.malloc_hugepages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, GLIBC)
    assert env["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"
    # nothing to do: already chosen (also what ends the re-exec), opted out, not glibc, a glibc without it
    assert runtime.malloc_hugepages_environment({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, GLIBC) is None
    assert runtime.malloc_hugepages_environment({runtime.OPT_OUT_VARIABLE: "0"}, GLIBC) is None
    assert runtime.malloc_hugepages_environment({}, ("", "")) is None
    assert runtime.malloc_hugepages_environment({}, ("glibc", "2.31")) is None
    assert runtime.malloc_hugepages_environment({}, ("glibc", "weird")) is None


# the console entry point with its main replaced: prints the PID and the tunables main would run under
_PROBE = ("import os, sys; import spiritlm_jax.cli as cli; print('pid', os.getpid(), flush=True); "
          "cli.main = lambda: print('tunables', os.environ.get('GLIBC_TUNABLES')) or 0; "
          "sys.argv = ['spiritlm-jax', *sys.argv[1:]]; sys.exit(cli.entry())")


def _probe(*argv: str, **env: str) -> list[str]:
    environ = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", runtime.OPT_OUT_VARIABLE)}
    proc = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True, text=True, timeout=120,
                          env={**environ, **env})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout.split("\n")[:-1]


@pytest.mark.skipif(runtime.malloc_hugepages_environment({}) is None,
                    reason="needs glibc >= 2.35 (CI's Linux has it)")
def test_serve_and_generate_reexecute_themselves_with_the_tunable_in_the_same_process():
    first, again, tunables = _probe("serve", "--help")
    assert first.startswith("pid ") and again == first  # re-executed in place: same PID, same arguments
    assert tunables == "tunables glibc.malloc.hugetlb=1"
    # opted out, or another command: run as started, once
    assert _probe("generate", **{runtime.OPT_OUT_VARIABLE: "0"})[1:] == ["tunables None"]
    assert _probe("parity", "--help")[1:] == ["tunables None"]
