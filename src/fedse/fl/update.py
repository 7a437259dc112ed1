"""What a client sends the server each round, and the server's checks on it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch

from fedse.agent.lora import tensor_bytes


@dataclass
class Update:
    """Adapter tensors, the number of training examples and scalar metrics; and, for a rule that
    reads inputs (`Aggregator.reads_inputs`), the summary of the client's layer inputs it asks for.
    Nothing else."""

    client: str
    tensors: dict[str, torch.Tensor]
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    members: tuple[str, ...] = ()
    """The clients a securely aggregated update stands for (SecAgg+: the server holds only the mean
    of their uploads, never one of them); empty for one client's own update."""

    def __post_init__(self) -> None:
        bad = [k for k, v in self.metrics.items() if not isinstance(v, int | float) or isinstance(v, bool)]
        if bad:
            raise TypeError(f"update from {self.client}: metrics must be numbers, not {bad}")

    @property
    def num_bytes(self) -> int:
        return tensor_bytes(self.tensors) + tensor_bytes(self.inputs)


MAX_FACTOR_ABS = 1e3
"""Largest magnitude accepted in a LoRA factor. Trained factors of the models fedse runs are
O(0.01-1); a finite but huge update (one client's factors x 1e20) would otherwise reach the
global adapter and make the next round's sampling fail, in every resume too."""
MAX_INPUT_ABS = 1e12
"""Largest magnitude accepted in an input summary (`Update.inputs`: square roots of a layer input's
second moment and its diagonal): far above any model's activations, and low enough that the
server's float64 solve cannot overflow."""
MAX_EXAMPLES = 10**7
"""Largest num_examples accepted: FedIT weights by it and cannot check it, so a client claiming
10**15 would own the mean. Far above any buffer fedse keeps; the claim is still trusted below."""


def update_problems(
    update: Update, expected: dict[str, torch.Tensor], expected_inputs: dict[str, torch.Tensor] | None = None
) -> list[str]:
    """Why `update` cannot be aggregated against the expected tensors and input summary (empty
    list: it can)."""
    who = f"client {update.client}"
    problems = tensor_problems(who, "tensor", update.tensors, expected, MAX_FACTOR_ABS)
    problems += tensor_problems(who, "input summary", update.inputs, expected_inputs or {}, MAX_INPUT_ABS)
    n = update.num_examples
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= MAX_EXAMPLES:
        problems.append(f"{who}: num_examples must be an integer in 0..{MAX_EXAMPLES}, got {n!r}")
    if any(not math.isfinite(v) for v in update.metrics.values()):
        problems.append(f"{who}: a metric is NaN or Inf")
    return problems


def tensor_problems(who: str, what: str, got: dict, expected: dict[str, torch.Tensor], max_abs: float) -> list[str]:
    """Missing, unexpected, misshapen, mistyped or non-finite tensors of `got`, and entries above
    `max_abs`, named."""
    not_tensors = sorted(k for k, v in got.items() if not isinstance(v, torch.Tensor))
    if not_tensors:
        kind = type(got[not_tensors[0]]).__name__
        return [f"{who}: {what} {not_tensors[0]} is a {kind}, not a tensor"]
    on_meta = sorted(k for k, v in got.items() if v.device.type == "meta")
    if on_meta:
        return [f"{who}: {what} {on_meta[0]} is on the meta device (it holds no values)"]
    problems = []
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing:
        problems.append(
            f"{who}: missing {what} {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    if extra:
        problems.append(
            f"{who}: unexpected {what} {extra[0]}" + (f" (+{len(extra) - 1} more)" if len(extra) > 1 else "")
        )
    for name in sorted(set(expected) & set(got)):
        tensor, want = got[name], expected[name]
        if tuple(tensor.shape) != tuple(want.shape):
            problems.append(f"{who}: {what} {name} has shape {tuple(tensor.shape)}, expected {tuple(want.shape)}")
        elif tensor.dtype != want.dtype:
            problems.append(f"{who}: {what} {name} has dtype {tensor.dtype}, expected {want.dtype}")
        elif tensor.numel():
            peak = float(tensor.abs().max())  # NaN propagates through max, Inf is the max
            if not math.isfinite(peak):
                problems.append(f"{who}: {what} {name} contains NaN or Inf")
            elif peak > max_abs:
                problems.append(f"{who}: {what} {name} has an entry of magnitude {peak:.3g}, above {max_abs:g}")
    return problems


DEFAULT_MAX_UPDATE_NORM = 100.0
"""Default bound on ‖uploaded factors − global factors‖_F: several times above the largest move
of an honest client measured in the demo (results/measurements.md; each round's
`update_norm` records it), and far below what a client sending entries near
MAX_FACTOR_ABS produces."""

Bound = Literal["clip", "reject", "off"]


def update_norm(update: Update, current: dict[str, torch.Tensor]) -> float:
    """‖update − current‖_F over the tensors the client uploaded."""
    return math.sqrt(sum(float((t.double() - current[k].double()).square().sum()) for k, t in update.tensors.items()))


def bound_update(
    update: Update, current: dict[str, torch.Tensor], max_norm: float, mode: Bound
) -> tuple[Update | None, float]:
    """Enforce the norm bound on a (validated) update; returns (the update to aggregate, its norm).

    clip: an update farther than `max_norm` from the global factors is moved back onto that
    sphere, θ + (u − θ)·max_norm/‖u − θ‖ (the clipping of DP-FedAvg, McMahan et al., ICLR 2018),
    so one client moves the aggregate at most max_norm/K; reject: it is dropped (None);
    off: it passes as it is."""
    norm = update_norm(update, current)
    if mode == "off" or norm <= max_norm:
        return update, norm
    if mode == "reject":
        return None, norm
    factor = max_norm / norm
    tensors = {
        k: (current[k].double() + (t.double() - current[k].double()) * factor).to(t.dtype)
        for k, t in update.tensors.items()
    }
    return replace(update, tensors=tensors), norm
