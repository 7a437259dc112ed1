"""Rollouts: playing episodes of text environments with a policy.

- `types`: what to play and what it cost (`RolloutRequest`, `Sampling`, `RolloutStats`);
- `episode`: one episode's life (start, tokens, turn end, trajectory), shared by both loops;
- `engine` + `block`: the batched engine (scheduling, and running the model for one pass);
- `reference`: AgentGym's one-episode-at-a-time loop, the engine's yardstick.
"""

from fedse.agent.rollout.block import MAX_DRAFT
from fedse.agent.rollout.engine import RolloutEngine, rollout
from fedse.agent.rollout.reference import naive_rollout
from fedse.agent.rollout.types import GREEDY, RolloutRequest, RolloutStats, Sampling, on_backends, sample_token

__all__ = [
    "GREEDY",
    "MAX_DRAFT",
    "RolloutEngine",
    "RolloutRequest",
    "RolloutStats",
    "Sampling",
    "naive_rollout",
    "on_backends",
    "rollout",
    "sample_token",
]
