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


def make_env(name: str, **options) -> TextEnv:
    """A fresh environment by name; an unknown name raises EnvError listing the valid ones."""
    if name not in _REGISTRY:
        raise EnvError(f"unknown environment {name!r}; choose one of: {', '.join(_REGISTRY)}")
    return _REGISTRY[name](**options)


__all__ = ["ACK", "EnvError", "StepResult", "TextEnv", "list_envs", "make_env", "replay"]
