"""Text environments behind one protocol (see `fedse.envs.base`).

>>> env = make_env("maze")
>>> env.reset(0)
'The goal is at position 8, 6. Your current position is at position 1, 1. There are walls to your left, above you, below you.'
>>> env.step("Thought: The way right is open.\\nAction: move right").action
'move right'
"""

from __future__ import annotations

from collections.abc import Callable

from fedse.envs.babyai import BabyAIEnv
from fedse.envs.base import ACK, EnvError, StepResult, TextEnv, replay
from fedse.envs.maze import MazeEnv
from fedse.envs.remote import EnvBackend, EnvServerError, RemoteEnv
from fedse.envs.textcraft import TextCraftEnv
from fedse.envs.webshop import WebShopEnv
from fedse.envs.wordle import WordleEnv

_REGISTRY: dict[str, Callable[..., TextEnv]] = {
    "maze": MazeEnv,
    "wordle": WordleEnv,
    "textcraft": TextCraftEnv,
    "babyai": BabyAIEnv,
    "webshop": WebShopEnv,
}


def list_envs() -> list[str]:
    return list(_REGISTRY)


def make_env(name: str, backend: EnvBackend | None = None, **options) -> TextEnv:
    """A fresh environment by name; an unknown name raises EnvError listing the valid ones.

    With an http `backend` the games run on that AgentGym-compatible server (`RemoteEnv`);
    `options` configure the in-process copy that supplies the instruction and the expert.
    """
    if name not in _REGISTRY:
        raise EnvError(f"unknown environment {name!r}; choose one of: {', '.join(_REGISTRY)}")
    local = _REGISTRY[name](**options)
    if backend is None or backend.backend == "local":
        return local
    return RemoteEnv(local, backend.url, timeout=backend.timeout, retries=backend.retries)


__all__ = [
    "ACK",
    "EnvBackend",
    "EnvError",
    "EnvServerError",
    "RemoteEnv",
    "StepResult",
    "TextEnv",
    "list_envs",
    "make_env",
    "replay",
]
