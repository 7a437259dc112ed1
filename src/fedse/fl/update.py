"""What a client sends the server each round, and the server's checks on it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from fedse.agent.lora import tensor_bytes


@dataclass
class Update:
    """Adapter tensors, the number of training examples and scalar metrics. Nothing else."""

    client: str
    tensors: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = [k for k, v in self.metrics.items() if not isinstance(v, int | float) or isinstance(v, bool)]
        if bad:
            raise TypeError(f"update from {self.client}: metrics must be numbers, not {bad}")

    @property
    def num_bytes(self) -> int:
        return tensor_bytes(self.tensors)


def update_problems(update: Update, expected: dict[str, torch.Tensor]) -> list[str]:
    """Why `update` cannot be aggregated against the expected tensors (empty list: it can)."""
    who = f"client {update.client}"
    problems = []
    missing, extra = sorted(set(expected) - set(update.tensors)), sorted(set(update.tensors) - set(expected))
    if missing:
        problems.append(
            f"{who}: missing tensor {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra:
        problems.append(
            f"{who}: unexpected tensor {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for name in sorted(set(expected) & set(update.tensors)):
        got, want = update.tensors[name], expected[name]
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"{who}: tensor {name} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.dtype != want.dtype:
            problems.append(f"{who}: tensor {name} has dtype {got.dtype}, expected {want.dtype}")
        elif not torch.isfinite(got).all():
            problems.append(f"{who}: tensor {name} contains NaN or Inf")
    if not isinstance(update.num_examples, int) or update.num_examples < 0:
        problems.append(f"{who}: num_examples must be a non-negative integer, got {update.num_examples!r}")
    if any(not math.isfinite(v) for v in update.metrics.values()):
        problems.append(f"{who}: a metric is NaN or Inf")
    return problems
