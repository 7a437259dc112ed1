"""One played episode, as stored on a client's disk (one JSON object per line)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from fedse.agent.chat import Message


@dataclass
class Trajectory:
    env: str
    task_id: int
    messages: list[Message]
    """[user instruction, assistant ACK, user obs0, assistant out1, user obs1, ...]."""
    reward: float
    success: bool
    turns: int
    adapter: str | None
    """Hash of the adapter that generated it (None: the bare base model, or an expert)."""
    finish: str = "done"
    """'done' (the environment ended it), 'max_turns', 'context', 'expert', or 'env_error'
    (the environment's step() raised: the episode ends unsuccessful)."""
    seed: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    logprobs: list[list[float]] | None = field(default=None, repr=False)
    """Per turn, the log-probability of each generated token (None if not recorded)."""
    extra: dict = field(default_factory=dict, repr=False)
    """Fields of an imported record that fedse does not interpret, written back unchanged on
    export (`fedse.evolve.agenttraj`); empty for fedse's own episodes."""

    @property
    def outputs(self) -> list[str]:
        return [m["content"] for m in self.messages[3::2]]

    def record(self) -> dict:
        """The trajectory as a JSON-ready dict (shallow: it shares the messages)."""
        record = {f.name: getattr(self, f.name) for f in fields(self)}
        if not record["extra"]:  # files written before the field existed stay byte-identical
            del record["extra"]
        return record

    def to_json(self) -> str:
        return json.dumps(self.record(), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Trajectory:
        return cls(**json.loads(line))
