"""The text-environment protocol every fedse environment follows.

An environment is a private, deterministic game played in text. The agent sees
`instruction` once, then the observation returned by `reset(task_id)`, and answers
each observation with raw model text ("Thought: ...\\nAction: ..."). `step` parses
that text exactly as AgentGym's client for the environment does, applies the
action and returns a `StepResult`.

Turn limits are the caller's business (AgentGym's controller enforces them, not
the environment servers): `max_turns` states the limit a rollout should use.
"""

from __future__ import annotations

import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import ClassVar

from fedse.errors import UserError

ACK = "OK."
"""The fixed assistant reply after the instruction (AgentGym's conversation start)."""


class EnvError(UserError):
    """A user-facing error about an environment: bad name, bad task id, bad call order."""


@dataclass(frozen=True)
class StepResult:
    observation: str
    reward: float
    done: bool
    success: bool
    action: str
    """The action string the environment parsed out of the model output."""


class TextEnv(ABC):
    """Base class: task-id checks, call-order checks and splits; subclasses do the game.

    Subclasses set `name`, `instruction`, `max_turns` and `num_tasks` and implement
    `start_task`, `parse_action` and `act`; `expert` and (outside AgentGym's games) `splits` too. A step is split where AgentGym splits
    it: `parse_action` is the client's half (model text -> action string, or None for a
    reply the client rejects without calling the server) and `act` the server's half
    (action string -> what happened), so the same game runs in process, behind
    `fedse serve-env`, or on an AgentGym server driven by `RemoteEnv`.
    """

    name: ClassVar[str]
    instruction: ClassVar[str]
    max_turns: ClassVar[int]
    num_tasks: ClassVar[int | None]
    """Valid task ids are 0 .. num_tasks-1; None means any non-negative integer."""
    rejection: ClassVar[str] = ""
    """What the client answers, without a server call, to a reply `parse_action` rejects."""
    rejection_shows_observation: ClassVar[bool] = False
    """Whether that answer is followed by the current observation (WebShop's client)."""

    def __init__(self) -> None:
        self.task_id: int | None = None
        self.done = False
        self.turns = 0

    @property
    def splits(self) -> dict[str, tuple[int, ...]]:
        """Train and test task ids: AgentGym's (AgentTraj train ids, AgentEval test ids) for its
        environments; an environment of your own states its own (a property, a class attribute,
        or `self.splits = {...}` in its constructor)."""
        own = self.__dict__.get("_own_splits")
        if own is not None:
            return own
        if self.name not in _splits_file():
            raise EnvError(f"environment {self.name!r} states no splits: define `splits` returning train and test ids")
        return agentgym_splits(self.name)

    @splits.setter
    def splits(self, value: dict[str, tuple[int, ...]]) -> None:
        self.__dict__["_own_splits"] = value

    def check_task_id(self, task_id: int) -> int:
        if isinstance(task_id, bool) or not isinstance(task_id, int):
            raise EnvError(f"{self.name}: task id must be an integer, got {task_id!r}")
        if task_id < 0 or (self.num_tasks is not None and task_id >= self.num_tasks):
            raise EnvError(f"{self.name}: unknown task id {task_id}; valid ids are {self.valid_ids_text()}")
        return task_id

    def valid_ids_text(self) -> str:
        if self.num_tasks is None:
            return "any integer >= 0"
        return f"0..{self.num_tasks - 1}"

    def reset(self, task_id: int) -> str:
        """Start task `task_id` and return its first observation."""
        self.check_task_id(task_id)
        self.task_id, self.done, self.turns = task_id, False, 0
        return self.start_task(task_id)

    def step(self, model_output: str) -> StepResult:
        """Parse the raw model output, apply its action, return what happened."""
        self._check_running()
        action = self.parse_action(model_output)
        if action is None:
            text = self.rejection + (self.observation() if self.rejection_shows_observation else "")
            return self._count(StepResult(text, 0.0, False, False, ""))
        return self._count(self.act(action))

    def step_action(self, action: str) -> StepResult:
        """Apply an action a client already parsed (what an environment server does)."""
        self._check_running()
        return self._count(self.act(action))

    def _check_running(self) -> None:
        if self.task_id is None:
            raise EnvError(f"{self.name}: call reset(task_id) before step()")
        if self.done:
            raise EnvError(f"{self.name}: task {self.task_id} is finished; call reset(task_id) to start another")

    def _count(self, result: StepResult) -> StepResult:
        self.turns += 1
        self.done = result.done
        return result

    @abstractmethod
    def start_task(self, task_id: int) -> str:
        """Set up task `task_id` (already checked by `reset`) and return its first observation."""

    @abstractmethod
    def parse_action(self, model_output: str) -> str | None:
        """The client's half of a step: the action AgentGym's client would send, or None."""

    @abstractmethod
    def act(self, action: str) -> StepResult:
        """The server's half of a step: apply an already parsed action."""

    @staticmethod
    def success_of(reward: float, done: bool) -> bool:
        """Success from what a server reports (Fed-SE keeps trajectories with R = 1)."""
        return done and reward == 1.0

    def close(self) -> None:
        """Release what the environment holds outside this process (nothing, in process)."""
        return None

    def observation(self) -> str:
        """The current observation, for environments whose rejections repeat it."""
        raise NotImplementedError(f"{self.name} does not repeat its observation")

    def expert(self, task_id: int) -> list[str]:
        """Model outputs that solve `task_id` when replayed through `step` after `reset`.

        Computed on a private copy of the game: the caller's episode is not touched. Optional: an
        environment without an expert seeds its client's buffer from an AgentTraj file
        (`buffer.seed_file`) or from exploration alone (`buffer.expert_seeds = 0`).
        """
        raise EnvError(
            f"{self.name} has no expert: set buffer.expert_seeds = 0 (and buffer.seed_file to seed from a file)"
        )


def replay(env: TextEnv, task_id: int, outputs: list[str]) -> tuple[bool, int]:
    """Play `outputs` on task `task_id` from its start; returns (success, turns used)."""
    env.reset(task_id)
    for turn, output in enumerate(outputs, start=1):
        result = env.step(output)
        if result.done:
            return result.success, turn
    return False, len(outputs)


# --- AgentGym client-side action extraction (docs/environments.md) -------------------


def parse_action_lmrl(text: str) -> str:
    """Maze and Wordle: the text after the first 'Action:' (up to a second one), stripped.

    Reproduces the upstream quirk that a trailing '</s>' removes five characters.
    """
    if text.endswith("</s>"):
        text = text[:-5]
    parts = text.split("Action:")
    return (parts[1] if len(parts) > 1 else parts[0]).strip()


ONLY_ONE_ACTION = "Error: Only one 'Action' is allowed per response. Please adjust your response."
_ACTION_LINE = re.compile(r"Action:\s*(.*?)(?=\n|$)", re.DOTALL)
_NOT_ACTION_CHARS = re.compile(r"[^A-Za-z0-9, ]+")


def parse_action_single_line(text: str) -> str | None:
    """BabyAI and TextCraft: the one 'Action:' line, cleaned; None if there are several.

    Characters other than letters, digits, commas and spaces are dropped and runs of
    whitespace collapse to one space. No 'Action:' at all gives the empty action.
    """
    matches = _ACTION_LINE.findall(text)
    if len(matches) > 1:
        return None
    action = _NOT_ACTION_CHARS.sub("", matches[0] if matches else "")
    return " ".join(action.split())


# --- splits -----------------------------------------------------------------------------


def parse_ranges(spec: str) -> tuple[int, ...]:
    """'0-2,5,7-8' -> (0, 1, 2, 5, 7, 8)."""
    ids: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.strip().partition("-")
        ids.extend(range(int(lo), int(hi or lo) + 1))
    return tuple(ids)


@cache
def _splits_file() -> dict:
    text = resources.files("fedse.envs").joinpath("data/agentgym_splits.json").read_text()
    return json.loads(text)


@cache
def agentgym_splits(env_name: str) -> dict[str, tuple[int, ...]]:
    ranges = _splits_file()[env_name]
    return {split: parse_ranges(spec) for split, spec in ranges.items()}
