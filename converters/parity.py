"""``spiritlm-jax parity GOLDEN_DIR``: run golden cases made by the ORIGINAL PyTorch code against our
converted JAX models.

A golden set is laid out as ``checkpoints/`` (the original's checkpoint tree), ``cases/*.npz|json``
(inputs and the original's outputs) and ``MANIFEST.md``. Nothing about a set's architecture is
assumed: every runner converts the checkpoints it needs with our converters and reads all shapes
from them.

Runners register by case-file prefix in ``RUNNERS`` as ``"module:function"`` strings, imported
lazily, so a component that is not built yet shows up as ``not-implemented`` (which fails the run)
rather than breaking the command. A runner has the signature ``fn(gs: GoldenSet, case: str) ->
Iterable[Result]`` and yields one ``Result`` per quantity it checks; helpers ``compare_close`` and
``compare_exact`` build them. All the code that checks one case file lives in its runner's module.

Every key is accounted for. ``GoldenSet.npz`` / ``GoldenSet.json`` hand out tracking views: a runner
declares what it checks by reading it (``z[key]``, ``z.get(key)``, ``d.items()``; listing names or
``key in z`` reads nothing). After the run, every key of every case file that no runner read is one
``not-implemented`` result (a failure), so a new key in another golden set cannot pass unchecked. A
runner that leaves keys to the runner of another file says so with ``gs.leave_to(case, keys, owner)``;
if ``--only`` leaves that owner out, the table says which keys were left unchecked and why.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np

# (case-file prefix, "module:function"); the first matching prefix wins, so longer prefixes first.
RUNNERS: list[tuple[str, str]] = [
    ("lm_wrapper", "spiritlm_jax.converters.parity_e2e:run_lm_wrapper"),
    ("lm_", "spiritlm_jax.converters.parity_lm:run_lm_npz"),
    ("hubert_", "spiritlm_jax.converters.hubert:parity_cases"),
    ("quantizer_", "spiritlm_jax.converters.quantizer:parity_cases"),
    ("f0_", "spiritlm_jax.converters.f0_vqvae:parity_cases"),
    ("style_", "spiritlm_jax.converters.style:parity_cases"),
    ("hifigan_", "spiritlm_jax.converters.hifigan:parity_cases"),
    ("tokenizer_", "spiritlm_jax.converters.parity_e2e:run_tokenizer"),
    ("units_string_pairs", "spiritlm_jax.converters.parity_e2e:run_units_string"),
    ("model_utils", "spiritlm_jax.converters.parity_e2e:run_model_utils"),
]
# Files in cases/ that only hold shared inputs for other cases.
INPUT_FILES = {"inputs.npz"}

STATUSES = ("pass", "fail", "not-implemented")


@dataclasses.dataclass
class Result:
    case: str
    quantity: str
    max_abs_error: float | None
    tolerance: float | None
    status: str  # pass | fail | not-implemented
    detail: str = ""

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def to_json(self) -> dict:
        return {
            "case": self.case,
            "quantity": self.quantity,
            "max_abs_error": self.max_abs_error,
            "tolerance": self.tolerance,
            "pass": self.passed,
            "status": self.status,
            "detail": self.detail,
        }


class TrackedDict(dict):
    """A read-only view of a case file's mapping that records which keys were read (see the module doc).

    Keys are recorded as dotted paths from the file (``base.wrapper_generate[].call``; list elements
    share one ``[]`` path). Nested dicts and lists come back wrapped too."""

    def __init__(self, data: dict, path: str, seen: set[str]):
        super().__init__(data)
        self._path, self._seen = path, seen

    def _key(self, k) -> str:
        return f"{self._path}.{k}" if self._path else str(k)

    def _wrap(self, k, v):
        return _track(v, self._key(k), self._seen)

    def __getitem__(self, k):
        v = super().__getitem__(k)
        self._seen.add(self._key(k))
        return self._wrap(k, v)

    def get(self, k, default=None):
        return self[k] if k in self else default

    def items(self):  # reading every value (json.dumps of a dict subclass goes through items())
        return [(k, self[k]) for k in super().keys()]

    def values(self):
        return [v for _, v in self.items()]


class TrackedList(list):
    def __init__(self, data: list, path: str, seen: set[str]):
        super().__init__(_track(v, path + "[]", seen) for v in data)


def _track(v, path: str, seen: set[str]):
    if isinstance(v, dict) and not isinstance(v, TrackedDict):
        return TrackedDict(v, path, seen)
    if isinstance(v, list) and not isinstance(v, TrackedList):
        return TrackedList(v, path, seen)
    return v


def key_paths(data, path: str = "") -> set[str]:
    """Every dict key of a (JSON) structure as the dotted paths TrackedDict records."""
    out: set[str] = set()
    if isinstance(data, dict):
        for k, v in data.items():
            p = f"{path}.{k}" if path else str(k)
            out.add(p)
            out |= key_paths(v, p)
    elif isinstance(data, list):
        for v in data:
            out |= key_paths(v, path + "[]")
    return out


class GoldenSet:
    """A golden directory, with cached case files (handed out as tracking views) and a cache for
    converted models."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self.cases_dir = self.root / "cases"
        self.checkpoints = self.root / "checkpoints"
        if not self.cases_dir.is_dir() or not self.checkpoints.is_dir():
            raise FileNotFoundError(
                f"{self.root} is not a golden set: expected the folders cases/ and checkpoints/ "
                f"(the layout of ../shared/golden)"
            )
        self._npz: dict[str, Any] = {}
        self._json: dict[str, Any] = {}
        self._cache: dict[str, Any] = {}
        self._seen: dict[str, set[str]] = {}  # case file -> key paths read so far
        self._left: dict[str, dict[str, str]] = {}  # case file -> {key: owner file that checks it}

    def case_files(self) -> list[str]:
        return sorted(p.name for p in self.cases_dir.iterdir() if p.suffix in (".npz", ".json"))

    def npz(self, name: str) -> TrackedDict:
        if not name.endswith(".npz"):
            name += ".npz"
        if name not in self._npz:
            with np.load(self.cases_dir / name, allow_pickle=False) as z:
                self._npz[name] = {k: z[k] for k in z.files}
        return TrackedDict(self._npz[name], "", self._seen.setdefault(name, set()))

    def json(self, name: str) -> TrackedDict:
        if not name.endswith(".json"):
            name += ".json"
        if name not in self._json:
            self._json[name] = json.loads((self.cases_dir / name).read_text())
        return _track(self._json[name], "", self._seen.setdefault(name, set()))

    def leave_to(self, case: str, keys: Iterable[str], owner: str) -> None:
        """Declare that ``keys`` of ``case`` are checked by the runner of the case file ``owner``."""
        self._left.setdefault(case, {}).update({k: owner for k in keys})

    def unread_keys(self, case: str) -> set[str]:
        """Keys (dotted paths) of a loaded case file that no runner has read."""
        if case.endswith(".npz"):
            every = set(self._npz.get(case, {}))
        else:
            every = key_paths(self._json.get(case, {}))
        return every - self._seen.get(case, set())

    def left_to(self, case: str) -> dict[str, str]:
        return dict(self._left.get(case, {}))

    def inputs(self) -> dict[str, np.ndarray]:
        return self.npz("inputs.npz")

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """Convert/build once per run (e.g. a converted model shared by several case files)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]


def _err(got, ref) -> float:
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    if got.size == 0:
        return 0.0
    return float(np.max(np.abs(got - ref)))


def compare_close(case: str, quantity: str, got, ref, tol: float) -> Result:
    """Float comparison: shapes must match exactly, then max |got − ref| ≤ tol."""
    got = np.asarray(got)
    ref = np.asarray(ref)
    if got.shape != ref.shape:
        return Result(case, quantity, None, tol, "fail", f"shape {got.shape} != reference {ref.shape}")
    e = _err(got, ref)
    ok = bool(np.isfinite(e) and e <= tol)
    return Result(case, quantity, e, tol, "pass" if ok else "fail")


def compare_exact(case: str, quantity: str, got, ref) -> Result:
    """Discrete outputs (ids, units, strings, durations): identical or fail."""
    if isinstance(ref, (str, np.str_)) or (isinstance(ref, np.ndarray) and ref.dtype.kind == "U"):
        g, r = np.asarray(got).astype(str), np.asarray(ref).astype(str)
        if g.shape != r.shape:
            return Result(case, quantity, None, 0.0, "fail", f"shape {g.shape} != reference {r.shape}")
        n = int(np.sum(g != r))
        detail = "" if n == 0 else f"{n} string(s) differ; first: got {str(g.ravel()[np.argmax(g.ravel() != r.ravel())])[:80]!r}"
        return Result(case, quantity, float(n), 0.0, "pass" if n == 0 else "fail", detail)
    got = np.asarray(got)
    ref = np.asarray(ref)
    if got.shape != ref.shape:
        return Result(case, quantity, None, 0.0, "fail", f"shape {got.shape} != reference {ref.shape}")
    e = _err(got, ref)
    n = int(np.sum(got != ref))
    return Result(case, quantity, e, 0.0, "pass" if n == 0 else "fail", "" if n == 0 else f"{n} of {ref.size} differ")


def not_implemented(case: str, quantity: str, why: str) -> Result:
    return Result(case, quantity, None, None, "not-implemented", why)


def _load_runner(case_file: str):
    for prefix, target in RUNNERS:
        if case_file.startswith(prefix):
            mod_name, fn_name = target.split(":")
            try:
                mod = importlib.import_module(mod_name)
            except ModuleNotFoundError as e:
                if e.name and (e.name == mod_name or mod_name.startswith(e.name + ".")):
                    return None, f"no runner yet ({mod_name} is not built)"
                raise
            fn = getattr(mod, fn_name, None)
            if fn is None:
                return None, f"no runner yet ({target} is missing)"
            return fn, ""
    return None, "no runner knows this case file"


def run_parity(golden: str | os.PathLike, only: Iterable[str] | None = None, progress: bool = True) -> list[Result]:
    gs = GoldenSet(golden)
    prefixes = [p for p in (only or []) if p]
    results: list[Result] = []
    ran: list[str] = []
    for case_file in gs.case_files():
        if case_file in INPUT_FILES:
            continue
        if prefixes and not any(case_file.startswith(p) for p in prefixes):
            continue
        fn, why = _load_runner(case_file)
        t0 = time.perf_counter()
        if fn is None:
            results.append(not_implemented(case_file, "*", why))
        else:
            try:
                got = list(fn(gs, case_file))
                if not got:
                    got = [Result(case_file, "*", None, None, "fail", "runner checked nothing")]
                results.extend(got)
            except Exception as e:  # a runner crash is a failure of that case file, not of the command
                tb = traceback.format_exc(limit=3)
                results.append(Result(case_file, "*", None, None, "fail", f"{type(e).__name__}: {e}"[:500]))
                if os.environ.get("SPIRITLM_PARITY_DEBUG"):
                    print(tb, file=sys.stderr)
        if progress:
            n_bad = sum(1 for r in results if r.case == case_file and not r.passed)
            print(f"  {case_file}: {'ok' if n_bad == 0 else f'{n_bad} not passing'} ({time.perf_counter() - t0:.1f} s)",
                  file=sys.stderr, flush=True)
        ran.append(case_file)
    results.extend(unread_key_results(gs, ran, crashed={r.case for r in results if r.quantity == "*"}))
    return results


def unread_key_results(gs: GoldenSet, ran: list[str], crashed: set[str] = frozenset()) -> list[Result]:
    """One not-implemented result per case file with keys that no runner read (a crashed runner's file
    is already a failure and is not reported twice). Keys left to a runner that ``--only`` did not
    select are named on stderr, not counted as checked."""
    out = []
    for case in ran:
        if case in crashed:
            continue
        unread = gs.unread_keys(case)
        left = gs.left_to(case)
        not_run = sorted(k for k in unread if k in left and left[k] not in ran)
        unknown = sorted(k for k in unread if k not in left or left[k] in ran)
        if unknown:
            out.append(not_implemented(case, f"{len(unknown)} key(s) no runner reads",
                                       ", ".join(unknown[:12]) + (" …" if len(unknown) > 12 else "")))
        if not_run:  # not a result: nothing was checked; the user narrowed the run with --only
            owners = sorted({left[k] for k in not_run})
            print(f"note: {case}: {len(not_run)} key(s) are checked by the runner of {', '.join(owners)}, which "
                  f"--only left out: {', '.join(not_run[:6])}{' …' if len(not_run) > 6 else ''}", file=sys.stderr)
    return out


def format_table(results: list[Result]) -> str:
    rows = [("case", "quantity", "max abs error", "tolerance", "status")]
    for r in results:
        e = "—" if r.max_abs_error is None else f"{r.max_abs_error:.3g}"
        t = "—" if r.tolerance is None else ("exact" if r.tolerance == 0 else f"{r.tolerance:.3g}")
        s = r.status + (f" ({r.detail})" if r.detail and not r.passed else "")
        rows.append((r.case, r.quantity, e, t, s))
    w = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = []
    for j, row in enumerate(rows):
        lines.append(" | ".join(c.ljust(w[i]) if i < 4 else c for i, c in enumerate(row)))
        if j == 0:
            lines.append("-+-".join("-" * x for x in w) + "-+-" + "-" * 6)
    n = {s: sum(r.status == s for r in results) for s in STATUSES}
    lines.append(f"\n{n['pass']} passed, {n['fail']} failed, {n['not-implemented']} not implemented "
                 f"({len({r.case for r in results})} case files)")
    return "\n".join(lines)


def main(args) -> int:
    golden = args.golden
    only = args.only.split(",") if args.only else None
    try:
        results = run_parity(golden, only=only)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not results:
        print(f"error: no case file in {golden}/cases matched --only {args.only!r}", file=sys.stderr)
        return 2
    print(format_table(results))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps([r.to_json() for r in results], indent=1, allow_nan=False
                                              if all(r.max_abs_error is None or math.isfinite(r.max_abs_error) for r in results) else True))
    return 0 if all(r.passed for r in results) else 1
