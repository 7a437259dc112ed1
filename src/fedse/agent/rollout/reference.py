"""The reference loop (AgentGym's): one episode at a time, the whole history re-encoded every turn.

Within a turn the model keeps its own cache, as `generate` does; between turns nothing is
kept. It plays the same episodes as the engine (`fedse.agent.rollout.episode`: the same
start, the same turn end, the same trajectory) and feeds exactly the same token ids, so the
engine's results can be checked against it and its speed measured against it (bench/rollout.py).
"""

from __future__ import annotations

import time

import torch

from fedse.agent.chat import ChatLayout
from fedse.agent.policy import Policy
from fedse.agent.rollout.episode import Episode, Status, start_episode
from fedse.agent.rollout.types import RolloutRequest, RolloutStats, sample_token
from fedse.agent.trajectory import Trajectory


@torch.no_grad()
def naive_rollout(
    policy: Policy, requests: list[RolloutRequest], stats: RolloutStats | None = None, max_context: int = 4096
) -> list[Trajectory]:
    """Play each request alone, re-encoding its whole history every turn; request order kept."""
    stats = stats if stats is not None else RolloutStats()
    layout = ChatLayout(policy.tokenizer)
    max_context = min(max_context, policy.max_positions or max_context)
    start = time.perf_counter()
    out = []
    for index, request in enumerate(requests):
        e = start_episode(index, request, layout)
        e.context.extend(layout.encode(layout.prefix_text(e.env.instruction)))
        while e.status is not Status.FINISHED:
            e.context.extend(e.queue)
            e.queue, e.status = [], Status.GENERATING
            ids = list(e.context.tokens)
            e.prompt_tokens += len(ids)
            fed = _play_turn(policy, e, ids, layout.stop_ids)
            stats.processed_tokens += len(ids) + len(e.gen_ids)
            e.context.extend(fed)
            e.end_turn(layout, max_context, stats)
        out.append(e.trajectory(policy.hash_of(request.adapter)))
    stats.episodes += len(out)
    stats.seconds += time.perf_counter() - start
    return out


def _play_turn(policy: Policy, e: Episode, ids: list[int], stop_ids: set[int]) -> list[int]:
    """One turn, token by token with the model's own cache; returns the generated ids that were fed."""
    cache = policy.generation_cache()
    step = torch.tensor([ids], device=policy.device)
    fed: list[int] = []
    while True:
        keep = torch.zeros(step.shape, dtype=torch.bool, device=policy.device)
        keep[0, -1] = True
        logits = policy.logits([e.request.adapter], step, keep=keep, cache=cache, use_cache=True)
        token, logprob = sample_token(logits[0], e.request.sampling, e.generator)
        if e.take(token, logprob, stop_ids):
            return fed
        fed.append(token)
        step = torch.tensor([[token]], device=policy.device)
