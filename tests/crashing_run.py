"""Run the fedse CLI in this process and SIGKILL it at the N-th call of one function.

    python tests/crashing_run.py TARGET N WHEN -- <fedse arguments>

TARGET is `module:attribute` (`fedse.files:append_lines`, `os:fsync`,
`fedse.experiments.store:RunStore.prune_checkpoints`); every module that imported the function
by name sees the wrapper. WHEN is `before` (killed instead of the N-th call), `after` (killed
once it returns) or `torn` (append_lines only: half of the first line is written, then killed).
N = 0 never kills; with `--count FILE` the number of calls is written there at exit, which is
how the crash matrix learns how many kill points a run has. No hook in fedse itself: the
subject is the unmodified code.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from pathlib import Path


def kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def patch(target: str, n: int, when: str) -> list[int]:
    module_name, _, attr_path = target.partition(":")
    owner = importlib.import_module(module_name)
    *parents, attr = attr_path.split(".")
    for name in parents:
        owner = getattr(owner, name)
    real = getattr(owner, attr)
    count = [0]

    def wrapper(*args, **kwargs):
        count[0] += 1
        if count[0] == n:
            if when == "before":
                kill()
            if when == "torn":
                path, lines = Path(args[0]), list(args[1])
                with path.open("ab") as f:
                    first = (lines[0] + "\n").encode()
                    f.write(first[: max(1, len(first) // 2)])
                    f.flush()
                    os.fsync(f.fileno())
                kill()
        out = real(*args, **kwargs)
        if count[0] == n and when == "after":
            kill()
        return out

    setattr(owner, attr, wrapper)
    if not parents:  # functions imported by name elsewhere
        for module in list(sys.modules.values()):
            if module is not None and getattr(module, attr, None) is real:
                setattr(module, attr, wrapper)
    return count


def main() -> int:
    args = sys.argv[1:]
    count_file = None
    if args[0] == "--count":
        count_file, args = Path(args[1]), args[2:]
    target, n, when, sep, *fedse_args = args
    assert sep == "--" and when in ("before", "after", "torn"), "usage: see the module docstring"
    # Imported before patching, so that the names these modules imported are patched too.
    import fedse.cli
    import fedse.experiments.federation
    import fedse.experiments.store

    count = patch(target, int(n), when)
    try:
        return fedse.cli.main(fedse_args)
    finally:
        if count_file is not None:
            count_file.write_text(str(count[0]))


if __name__ == "__main__":
    sys.exit(main())
