"""Output paths, checked BEFORE any model is loaded or any work is done: one rule for every command.

A command that runs for minutes and then fails because ``--out`` names an existing file, a folder, or a
folder that does not exist wastes the run (and a traceback at the end tells the user little). Every
command that writes calls one of these first; each raises ``OutputPathError`` with the flag, the path and
the fix. Nothing here creates or deletes anything: an existing output file is only replaced when the user
asked for it (``overwrite``).
"""
from __future__ import annotations

import os
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that cannot be written as asked."""


def check_output_file(path: str | os.PathLike, flag: str, *, overwrite: bool = True) -> Path:
    """A file to be written: its folder must exist and be writable, and it must not be a folder.
    ``overwrite=False`` also refuses an existing non-empty file (valid earlier results are not replaced)."""
    p = Path(path)
    if p.is_dir():
        raise OutputPathError(f"{flag} {p} is a folder; give a file name (e.g. {p / 'out.jsonl'})")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        what = "is a file, not a folder" if parent.exists() else "does not exist"
        raise OutputPathError(f"{flag} {p}: the folder {parent} {what}; create it first or pick another path")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"{flag} {p}: the folder {parent} is not writable")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputPathError(f"{flag} {p} exists and is not writable")
    if not overwrite and p.is_file() and p.stat().st_size > 0:
        raise OutputPathError(f"{flag} {p} already exists; pass --overwrite to replace it or pick another path")
    return p


def check_output_dir(path: str | os.PathLike, flag: str) -> Path:
    """A folder to write into (created later if missing): it must not be a file, nor lie under one."""
    p = Path(path)
    for q in (p, *p.parents):
        if q.exists():
            if not q.is_dir():
                where = "" if q == p else f" ({q} is a file)"
                raise OutputPathError(f"{flag} {p} is not a folder{where}; give a folder for the outputs")
            if not os.access(q, os.W_OK):
                raise OutputPathError(f"{flag} {p}: {q} is not writable")
            break
    return p
