"""Trajectories on a client's disk (JSON lines) and the expert's demonstrations.
AgentGym's file format lives in `fedse.evolve.agenttraj`."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from fedse.agent.chat import episode_messages
from fedse.agent.trajectory import Trajectory
from fedse.envs import make_env
from fedse.files import append_lines, read_lines


def append_jsonl(path: Path, trajectories: Iterable[Trajectory]) -> int:
    """Append and fsync; returns how many were written."""
    return append_lines(path, (t.to_json() for t in trajectories))


def read_jsonl(path: Path) -> list[Trajectory]:
    out = []
    for number, line in enumerate(read_lines(path), start=1):
        try:
            out.append(Trajectory.from_json(line))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a trajectory record ({error})") from None
    return out


def expert_trajectory(env_name: str, task_id: int) -> Trajectory:
    """Replay the environment's expert on `task_id` into a trajectory (a seed demonstration)."""
    env = make_env(env_name)
    outputs = env.expert(task_id)
    observations = [env.reset(task_id)]
    result = None
    for output in outputs:
        result = env.step(output)
        observations.append(result.observation)
    messages = episode_messages(env.instruction, observations, outputs)
    return Trajectory(env_name, task_id, messages, result.reward, result.success, len(outputs), None, "expert")
