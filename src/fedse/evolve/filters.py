"""Which explored trajectories a client keeps (Fed-SE §2.1: only successes, R(τ) = 1)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from fedse.agent.trajectory import Trajectory


class TrajectoryFilter(Protocol):
    name: str

    def keep(self, trajectory: Trajectory) -> bool: ...


@dataclass(frozen=True)
class SuccessFilter:
    """Keep τ iff the environment reports success (Fed-SE, App. B.3)."""

    name: str = "success"

    def keep(self, trajectory: Trajectory) -> bool:
        return trajectory.success


@dataclass(frozen=True)
class RewardThresholdFilter:
    """Keep τ iff R(τ) ≥ threshold (AgentEvol-style reward filtering)."""

    threshold: float
    name: str = "reward_threshold"

    def keep(self, trajectory: Trajectory) -> bool:
        return trajectory.reward >= self.threshold


@dataclass(frozen=True)
class KeepAllFilter:
    """Keep everything (the paper's "w/o filtering" ablation)."""

    name: str = "none"

    def keep(self, trajectory: Trajectory) -> bool:
        return True


def make_filter(spec: str) -> TrajectoryFilter:
    """'success', 'none' or 'reward_threshold:<x>'."""
    if spec == "success":
        return SuccessFilter()
    if spec == "none":
        return KeepAllFilter()
    kind, _, value = spec.partition(":")
    if kind == "reward_threshold":
        try:
            return RewardThresholdFilter(float(value))
        except ValueError:
            pass
    raise ValueError(f"unknown filter {spec!r}; choose success, none or reward_threshold:<number>")
