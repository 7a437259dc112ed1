"""One progress helper for rollouts and training, or nothing when no label is given.

The rule for `progress` arguments: a function that draws a bar takes its label (None: no bar); a
runtime (`Federation`, its transport) takes a bool, whether to show bars, and names them.

On a terminal the bar is tqdm's, redrawn in place and cleared when done. Where stderr is a file
or a pipe (a CI log, `make demo > demo.log 2>&1`) redrawing would leave one carriage-return
fragment per update, so the phase writes one summary line when it ends instead.
"""

from __future__ import annotations

import sys
import time
from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


class _SummaryLine:
    """Counts like a bar; on close, one line: `label: n/total unit in s (last postfix)`."""

    def __init__(self, total: int, label: str, unit: str) -> None:
        self.total, self.label, self.unit = total, label, unit
        self.done, self.postfix, self.start = 0, {}, time.perf_counter()

    def update(self, n: int = 1) -> None:
        self.done += n

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values

    def close(self) -> None:
        seconds = time.perf_counter() - self.start
        shown = ", ".join(f"{k}={v}" for k, v in self.postfix.items())
        tail = f" ({shown})" if shown else ""
        print(
            f"{self.label}: {self.done}/{self.total} {self.unit} in {seconds:.0f} s{tail}", file=sys.stderr, flush=True
        )


def progress_bar(total: int, label: str | None, unit: str):
    """A transient tqdm bar labelled `label` on a terminal, a summary line elsewhere, or nothing
    when `label` is None."""
    if label is None:
        return _NoBar()
    if not sys.stderr.isatty():
        return _SummaryLine(total, label, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit=unit, dynamic_ncols=True, leave=False)
