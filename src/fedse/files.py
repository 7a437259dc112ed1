"""Crash-safe file primitives: whole files replaced atomically, JSON lines appended durably.

Every file a run keeps (configuration, state, metrics, buffers, trajectories) is written
through these, so a crash at any instant leaves either the old or the new content of a
replaced file, and every appended line that was reported written is on disk.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text`: written to a temporary file, fsynced, renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def append_lines(path: str | Path, lines: Iterable[str]) -> int:
    """Append each line (a newline is added) and fsync; returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a", encoding="utf-8") as f:
        for line in lines:
            f.write(line + "\n")
            n += 1
        f.flush()
        os.fsync(f.fileno())
    return n


def write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Replace `path` atomically with these lines."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_lines(path: str | Path) -> list[str]:
    """The non-blank lines of a text file ([] if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def fsync_tree(directory: str | Path) -> None:
    """fsync every file under `directory` and the folders themselves (before renaming it into place)."""
    directory = Path(directory)
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(directory)
