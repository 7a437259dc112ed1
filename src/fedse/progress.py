"""One progress-bar helper for rollouts and training (tqdm), or nothing when no label is given.

The rule for `progress` arguments: a function that draws a bar takes its label (None: no bar); a
runtime (`Federation`, its transport) takes a bool, whether to show bars, and names them."""

from __future__ import annotations

from typing import Any


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **values: Any) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, label: str | None, unit: str):
    """A transient tqdm bar labelled `label`, or a bar that shows nothing when `label` is None."""
    if label is None:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit=unit, dynamic_ncols=True, leave=False)
