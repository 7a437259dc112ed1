"""Trajectories on a client's disk (JSON lines), and AgentGym's AgentTraj conversation format.

AgentTraj records look like `{"item_id": "lmrlgym_maze_13", "conversations": [{"from": "human",
"value": ..., "loss": null}, {"from": "gpt", "value": ..., "loss": false}, ...]}`: the instruction,
a fixed acknowledgement, then observation / agent turns, agent turns carrying `"loss": true`.
Imported records are expert successes (reward 1). Their instruction text is AgentGym's, not
ours; it is kept as it is.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from fedse.agent.chat import episode_messages
from fedse.agent.trajectory import Trajectory
from fedse.envs import make_env
from fedse.files import append_lines, read_lines

ITEM_PREFIX = {
    "babyai": "babyai_",
    "maze": "lmrlgym_maze_",
    "wordle": "lmrlgym_wordle_",
    "textcraft": "textcraft_",
    "webshop": "webshop_",
}


def append_jsonl(path: Path, trajectories: Iterable[Trajectory]) -> int:
    """Append and fsync; returns how many were written."""
    return append_lines(path, (t.to_json() for t in trajectories))


def read_jsonl(path: Path) -> list[Trajectory]:
    out = []
    for number, line in enumerate(read_lines(path), start=1):
        try:
            out.append(Trajectory.from_json(line))
        except (json.JSONDecodeError, TypeError) as error:
            raise ValueError(f"{path}:{number}: not a trajectory record ({error})") from None
    return out


def to_agenttraj(t: Trajectory) -> dict:
    turns = []
    for i, m in enumerate(t.messages):
        if m["role"] == "user":
            turns.append({"from": "human", "value": m["content"], "loss": None})
        else:
            turns.append({"from": "gpt", "value": m["content"], "loss": i > 1})
    if turns and turns[-1]["from"] == "human" and len(turns) > 3:
        turns.pop()  # AgentTraj ends with the agent's last turn
    return {"item_id": f"{ITEM_PREFIX.get(t.env, t.env + '_')}{t.task_id}", "conversations": turns}


def from_agenttraj(record: dict) -> Trajectory:
    item = record.get("item_id", "")
    env = next((e for e, p in ITEM_PREFIX.items() if item.startswith(p)), None)
    if env is None:
        raise ValueError(f"unknown AgentTraj item_id {item!r}; expected a prefix among {sorted(ITEM_PREFIX.values())}")
    task_id = int(item.removeprefix(ITEM_PREFIX[env]))
    roles = {"human": "user", "gpt": "assistant"}
    try:
        messages = [{"role": roles[c["from"]], "content": c["value"]} for c in record["conversations"]]
    except KeyError as error:
        raise ValueError(f"AgentTraj record {item}: bad conversation entry ({error})") from None
    turns = sum(m["role"] == "assistant" for m in messages[2:])
    return Trajectory(env, task_id, messages, 1.0, True, turns, adapter=None, finish="expert")


def import_agenttraj(path: Path) -> list[Trajectory]:
    """A JSON list (AgentGym's files) or JSON lines of AgentTraj records."""
    text = Path(path).read_text(encoding="utf-8").strip()
    records = json.loads(text) if text.startswith("[") else [json.loads(line) for line in text.splitlines() if line]
    return [from_agenttraj(r) for r in records]


def export_agenttraj(trajectories: Iterable[Trajectory], path: Path) -> None:
    Path(path).write_text(json.dumps([to_agenttraj(t) for t in trajectories], ensure_ascii=False, indent=1))


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
