"""Process-wide set-up that fedse's entry points make once, at start (`fedse` CLI, benchmarks)."""

from __future__ import annotations

import ctypes
import functools
import os
import sys

from fedse.errors import UserError

THREADS_ENV = "FEDSE_THREADS"


@functools.cache
def return_large_buffers_to_the_os() -> None:
    """Have glibc serve allocations of 4 MB and more with mmap, so that freeing returns them.

    A rollout allocates attention buffers whose sizes drift from pass to pass. With glibc's
    adaptive threshold those come from the heap, each a little larger than the freed one
    before it, and the heap fragments: a 30-episode evaluation at 4k tokens reached 12 GB of
    resident memory (24 GB, killed, in a later round) against 4.9 GB with a fixed threshold.
    A library user driving long rollouts from their own program should call this once too.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 4 << 20)


def thread_count(requested: int | None = None) -> int | None:
    """The torch thread count asked for: `requested` (the CLI's --threads), else $FEDSE_THREADS,
    else None (torch's default: one per core).

    Why a knob: with 2 cores and torch's 2 spinning OpenMP threads, another busy process slows
    fedse several times more than its share (measured on a Zen 4: a 32x576x1536 linear 0.81 ms
    idle, 3.6 ms beside a 2-thread neighbour; 1.4 ms with 1 thread or OMP_WAIT_POLICY=PASSIVE).
    On an idle machine the default is fastest (PASSIVE cost 31 % there), so it stays the default.
    """
    raw = requested if requested is not None else os.environ.get(THREADS_ENV)
    if raw is None or raw == "":
        return None
    try:
        count = int(raw)
    except ValueError:
        count = 0
    if count < 1:
        raise UserError(f"{THREADS_ENV} / --threads must be a positive whole number of threads, got {raw!r}")
    return count


def set_up_process(threads: int | None = None) -> None:
    """Everything a fedse process sets once before it loads a model."""
    return_large_buffers_to_the_os()
    count = thread_count(threads)
    if count is not None:
        import torch

        torch.set_num_threads(count)
