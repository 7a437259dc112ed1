"""Process-wide set-up that fedse's entry points make once, at start (`fedse` CLI, benchmarks)."""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager

from fedse.errors import UserError

THREADS_ENV = "FEDSE_THREADS"


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameter numbers (glibc's malloc.h)
ROLLOUT_MMAP_THRESHOLD = 4 << 20
TRAINING_MMAP_THRESHOLD = 32 << 20  # glibc's ceiling for this setting on 64-bit
TRAINING_TRIM_THRESHOLD = 1 << 30  # keep freed heap memory for the next step
GLIBC_TRIM_THRESHOLD = 128 << 10  # glibc's default


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (e.g. musl): nothing to tune
        return None


@functools.cache
def return_large_buffers_to_the_os() -> None:
    """Have glibc serve allocations of 4 MB and more with mmap, so that freeing returns them.

    A rollout allocates attention buffers whose sizes drift from pass to pass. With glibc's
    adaptive threshold those come from the heap, each a little larger than the freed one
    before it, and the heap fragments: a long evaluation's resident memory grows round after
    round until the process is killed (results/measurements.md has the figures).
    A library user driving long rollouts from their own program should call this once too.
    """
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, ROLLOUT_MMAP_THRESHOLD)


@contextmanager
def keeping_freed_memory() -> Iterator[None]:
    """Inside: glibc serves allocations up to 32 MB from its heap and keeps what is freed.
    On exit: large buffers from mmap again (`return_large_buffers_to_the_os`, what rollouts
    need), and the freed heap handed back to the OS (malloc_trim).

    Why, for training: each step allocates and frees its activations (about 2 GB for a
    1,500-token episode). Served by mmap, each step page-faults them in again, zeroed and cold
    in cache, hundreds of thousands of page faults a step and a fifth or more of training time
    (results/measurements.md); from the heap, few. The heap's
    fragmentation costs resident memory while training, which exit hands back before the next
    rollout.
    """
    libc = _glibc()
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, TRAINING_MMAP_THRESHOLD)
    libc.mallopt(M_TRIM_THRESHOLD, TRAINING_TRIM_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_TRIM_THRESHOLD, GLIBC_TRIM_THRESHOLD)
        libc.mallopt(M_MMAP_THRESHOLD, ROLLOUT_MMAP_THRESHOLD)
        libc.malloc_trim(0)


def thread_count(requested: int | None = None) -> int | None:
    """The torch thread count asked for: `requested` (the CLI's --threads), else $FEDSE_THREADS,
    else None (torch's default: one per core).

    Why a knob: with 2 cores and torch's 2 spinning OpenMP threads, another busy process slows
    fedse several times more than its share, while one thread (or OMP_WAIT_POLICY=PASSIVE) loses
    less there. On an idle machine the default is fastest, so it stays the default (results/measurements.md).
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
