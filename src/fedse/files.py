"""Crash-safe file primitives: whole files replaced atomically, JSON lines appended durably.

Every file a run keeps (configuration, state, metrics, buffers, trajectories) is written
through these, so a crash at any instant leaves either the old or the new content of a
replaced file, and every appended line that was reported written is on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from fedse.errors import UserError


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory handles
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: str | Path) -> Path:
    """`directory` and any missing parents, each new folder's entry fsynced in its parent: a
    crash right after cannot leave a file fsynced inside a folder whose own entry was lost."""
    directory = Path(directory)
    missing = []
    while not directory.exists() and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    for folder in reversed(missing):
        folder.mkdir(exist_ok=True)
        _fsync_dir(folder.parent)
    return Path(missing[0]) if missing else directory


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text`: written to a temporary file, fsynced, renamed over `path`."""
    path = Path(path)
    make_dirs(path.parent)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    _fsync_dir(path.parent)


def atomic_write_json(path: str | Path, data: object) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))


def drop_torn_tail(path: str | Path) -> bool:
    """Cut a last line that lacks its newline (a kill mid-append), so that the next append does
    not glue onto it; returns whether there was one."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return False
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":  # the usual case: one byte read, nothing to cut
            return False
        f.seek(0)
        f.truncate(f.read().rfind(b"\n") + 1)
        os.fsync(f.fileno())
    return True


def append_lines(path: str | Path, lines: Iterable[str]) -> int:
    """Append the lines (a newline added to each) in one write, and fsync; returns how many.

    One write: a kill can then only cut the batch's end, never interleave partial lines; a torn
    last line left by an earlier kill is cut first (`drop_torn_tail`)."""
    path = Path(path)
    make_dirs(path.parent)
    lines = list(lines)
    if not lines:
        return 0
    drop_torn_tail(path)
    payload = "".join(line + "\n" for line in lines).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(payload)
        while view:  # a regular file takes it in one call; loop only on a partial write
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    _fsync_dir(path.parent)
    return len(lines)


def write_lines(path: str | Path, lines: Iterable[str]) -> None:
    """Replace `path` atomically with these lines."""
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_lines(path: str | Path) -> list[str]:
    """The non-blank complete lines of a text file ([] if it does not exist). A last line
    without its newline is a torn append (`append_lines` ends every line) and is left out."""
    path = Path(path)
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text at byte {error.start}; the file is corrupt") from None
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
    return [line for line in text.splitlines() if line.strip()]


def file_digest(path: str | Path, size: int | None = None) -> str:
    """SHA-256 (hex) of the file's first `size` bytes (all of it by default)."""
    h = hashlib.sha256()
    remaining = Path(path).stat().st_size if size is None else size
    with Path(path).open("rb") as f:
        while remaining > 0:
            chunk = f.read(min(remaining, 1 << 20))
            if not chunk:
                break
            h.update(chunk)
            remaining -= len(chunk)
    return h.hexdigest()


def fsync_tree(directory: str | Path, files: bool = True) -> None:
    """fsync every file under `directory` and the folders themselves (before renaming it into
    place); `files=False`: only `directory` itself (after a rename inside it)."""
    directory = Path(directory)
    if not files:
        _fsync_dir(directory)
        return
    for path in sorted(directory.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
        else:
            _fsync_dir(path)
    _fsync_dir(directory)


def write_folder(final: str | Path, write) -> None:
    """`write(tmp)` fills a temporary folder, which is fsynced and renamed to `final`, the
    rename fsynced too: a crash leaves the old folder or the new one, never a mix."""
    final = Path(final)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    make_dirs(tmp)
    write(tmp)
    fsync_tree(tmp)
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    fsync_tree(final.parent, files=False)
