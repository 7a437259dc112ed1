"""What a model reveals of the trajectories it was trained on: canary exposure and membership
inference (`bench/privacy.py` runs them on federations with and without DP).

- Exposure (Carlini et al., "The Secret Sharer", arXiv 1802.08232): a canary sentence holding a
  random secret is planted in training data; the secret's rank r by log-perplexity among R random
  candidates gives exposure log2(R + 1) − log2 r bits (at most log2(R + 1), reached when the
  secret scores best). The paper's §4.3 extends it past that cap by fitting the candidates'
  scores: −log2 P(a random secret scores at least as well), here under a normal fit.
- Membership inference: the AUC of a per-example score (−NLL per token) telling trained-on
  examples from others of the same kind (0.5: no signal).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace

from fedse.agent.policy import Policy
from fedse.agent.trajectory import Trajectory
from fedse.evolve.sft import episode_nll


def canary_text(secret: str) -> str:
    return f"The access code is {secret}. "


def plant(demos: list[Trajectory], secrets: list[str]) -> list[Trajectory]:
    """The demonstrations with a canary sentence opening each one's first agent turn (messages[3])."""
    planted = []
    for demo, secret in zip(demos, secrets, strict=True):
        messages = [dict(m) for m in demo.messages]
        messages[3]["content"] = canary_text(secret) + messages[3]["content"]
        planted.append(replace(demo, messages=messages))
    return planted


def with_secret(canary: Trajectory, secret: str, candidate: str) -> Trajectory:
    """The canary episode up to its planted turn, with `candidate` in place of `secret`."""
    messages = [dict(m) for m in canary.messages[:4]]
    messages[3]["content"] = messages[3]["content"].replace(canary_text(secret), canary_text(candidate), 1)
    return replace(canary, messages=messages)


def exposure_of(secret_nll: float, candidate_nlls: list[float]) -> dict:
    """Rank exposure and its normal-fit extension of a secret scoring `secret_nll` among candidates."""
    rank = 1 + sum(s < secret_nll for s in candidate_nlls)
    mu, sd = statistics.fmean(candidate_nlls), statistics.pstdev(candidate_nlls) or 1e-12
    tail = 0.5 * math.erfc((mu - secret_nll) / (sd * math.sqrt(2)))  # P(normal draw ≤ the secret's NLL)
    return {
        "rank": rank,
        "exposure": math.log2(len(candidate_nlls) + 1) - math.log2(rank),
        "exposure_fit": -math.log2(max(tail, 1e-300)),
    }


def exposure(policy: Policy, name: str | None, canary: Trajectory, secret: str, candidates: list[str]) -> dict:
    """`exposure_of` the canary's secret under adapter `name` (None: the base model), each candidate
    scored by the summed NLL of the agent tokens of the canary episode carrying it."""
    episodes = [with_secret(canary, secret, c) for c in [secret, *candidates]]
    scores = [nll for nll, _ in episode_nll(policy, name, episodes)]
    return exposure_of(scores[0], scores[1:])


def auc(members: list[float], others: list[float]) -> float:
    """P(a member's score > a non-member's), ties counting half (the Mann-Whitney AUC)."""
    wins = sum((m > o) + 0.5 * (m == o) for m in members for o in others)
    return wins / (len(members) * len(others))


def membership_auc(policy: Policy, name: str | None, members: list[Trajectory], others: list[Trajectory]) -> float:
    """`auc` of −(NLL per agent token) under adapter `name`, members against others."""
    score = [-nll / max(n, 1) for nll, n in episode_nll(policy, name, members + others)]
    return auc(score[: len(members)], score[len(members) :])
