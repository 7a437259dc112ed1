"""The rollout engine's value types: what to play (`RolloutRequest`, `Sampling`) and what it cost (`RolloutStats`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fedse.envs import EnvBackend, TextEnv, make_env


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    max_new_tokens: int = 96


GREEDY = Sampling(temperature=0.0)


@dataclass
class RolloutRequest:
    env: str | Callable[[], TextEnv]
    task_id: int
    adapter: str | None = None
    sampling: Sampling = GREEDY
    seed: int = 0
    max_turns: int | None = None
    """Defaults to the environment's own limit."""
    backend: EnvBackend | None = None
    """Where a named environment's games run (None: in process)."""

    def make_env(self) -> TextEnv:
        return make_env(self.env, self.backend) if isinstance(self.env, str) else self.env()


def on_backends(requests: list[RolloutRequest], backends: dict[str, EnvBackend]) -> list[RolloutRequest]:
    """`requests` with each named environment played where `backends` says (the run's [env.*])."""
    return [
        replace(r, backend=backends[r.env]) if isinstance(r.env, str) and r.env in backends else r for r in requests
    ]


@dataclass
class RolloutStats:
    episodes: int = 0
    turns: int = 0
    generated_tokens: int = 0
    processed_tokens: int = 0
    """Tokens kept in the context (prompt and generated): padding and rejected drafts not counted."""
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    forward_passes: int = 0
    seconds: float = 0.0

    def summary(self) -> str:
        s = max(self.seconds, 1e-9)
        text = (
            f"{self.episodes} episodes, {self.turns} turns in {self.seconds:.1f} s: {self.episodes / s:.3f} episodes/s, "
            f"{self.generated_tokens / s:.1f} generated tok/s, {self.processed_tokens / s:.1f} processed tok/s"
        )
        if self.drafted_tokens:
            text += f"; drafts accepted {self.accepted_tokens}/{self.drafted_tokens}"
        if self.forward_passes:
            text += f"; {self.forward_passes} forward passes"
        return text


def sample_token(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator) -> tuple[int, float]:
    """One token from a row of logits, and its log-probability under the model (temperature 1).

    Drawn on the CPU with the episode's CPU generator, whatever device the logits come from,
    so a seed gives the same draws on any machine."""
    logits = logits.float().cpu()
    logprobs = torch.log_softmax(logits, dim=-1)
    if sampling.temperature <= 0:
        token = int(torch.argmax(logprobs))
    else:
        probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = torch.sort(probs, descending=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < sampling.top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        token = int(torch.multinomial(probs, 1, generator=generator))
    return token, float(logprobs[token])
