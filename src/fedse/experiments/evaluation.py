"""Evaluation on the AgentEval test splits: greedy rollouts, per-environment success, Fed-SE's Avg."""

from __future__ import annotations

from fedse.agent.policy import Policy
from fedse.agent.rollout import RolloutRequest, Sampling, on_backends, rollout
from fedse.envs import EnvBackend, make_env
from fedse.experiments.records import EvalAvgRecord, EvalRecord


def evaluation_tasks(env_name: str, count: int | None, split: str = "test") -> list[int]:
    """`count` ids spread evenly over the env's `split` (None: all of it).

    The split is ordered by difficulty for some envs (TextCraft's depth bands), so a prefix
    would not be representative.

    >>> evaluation_tasks("maze", 5)
    [0, 5, 10, 15, 20]
    """
    ids = make_env(env_name).splits[split]
    if count is None or count >= len(ids):
        return list(ids)
    return [ids[i * len(ids) // count] for i in range(count)]


def evaluate(
    policy: Policy,
    adapters: dict[str, str],
    round_: int,
    *,
    tasks: int | None,
    max_new_tokens: int,
    max_batch: int,
    progress: str | None = None,
    backends: dict[str, EnvBackend] | None = None,
    split: str = "test",
) -> list[EvalRecord]:
    """Greedy rollouts on each environment's `split` (the test split, except for a diagnostic that
    compares models on what they trained on); `adapters` maps env -> adapter name."""
    sampling = Sampling(temperature=0.0, max_new_tokens=max_new_tokens)
    requests = []
    for env_name, adapter in adapters.items():
        requests += [
            RolloutRequest(env_name, i, adapter=adapter, sampling=sampling)
            for i in evaluation_tasks(env_name, tasks, split)
        ]
    trajectories = rollout(policy, on_backends(requests, backends or {}), max_batch=max_batch, progress=progress)
    out = []
    for env_name in adapters:
        mine = [t for t in trajectories if t.env == env_name]
        successes = sum(t.success for t in mine)
        reward = sum(t.reward for t in mine) / len(mine)
        ids, outcomes = [t.task_id for t in mine], [int(t.success) for t in mine]
        out.append(EvalRecord(round_, env_name, len(mine), successes, successes / len(mine), reward, ids, outcomes))
    return out


def averages(evals: list[EvalRecord], seconds: float) -> EvalAvgRecord:
    """Fed-SE's "Avg" (weighted by test-task count) and the plain mean over environments."""
    tasks = sum(e.tasks for e in evals)
    return EvalAvgRecord(
        round=evals[0].round,
        avg_weighted=sum(e.successes for e in evals) / tasks,
        avg_mean=sum(e.success for e in evals) / len(evals),
        seconds=seconds,
    )
