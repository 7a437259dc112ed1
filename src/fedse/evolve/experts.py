"""The experts' demonstrations: each environment's scripted expert replayed into a trajectory
(the seed a client's buffer starts from). AgentGym's file format lives in `fedse.evolve.agenttraj`."""

from __future__ import annotations

from fedse.agent.chat import episode_messages
from fedse.agent.trajectory import Trajectory
from fedse.envs import make_env


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
