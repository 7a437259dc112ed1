"""AgentGym's trajectory files (AgentTraj, AgentEval outputs), in and out.

A record is `{"item_id": "lmrlgym_maze_13", "conversations": [{"from": "human" | "gpt",
"value": str, "loss": bool | null}, ...]}`, and, in files AgentGym's evaluation writes,
`"reward"` and `"success"`. The conversation is the instruction, a fixed acknowledgement,
then observation / agent turns; in AgentTraj the acknowledgement has `"loss": false` and the
agent's turns `"loss": true`, and fedse's training honours the flag where a record sets it.

Import then export gives back the same record: an imported conversation keeps every key of
every entry, and the record every key besides `item_id` and `conversations` (in
`Trajectory.extra`). An imported record's instruction is the file's text, not fedse's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

from fedse.agent.trajectory import Trajectory
from fedse.envs import list_envs
from fedse.errors import UserError

ITEM_PREFIX = {
    "babyai": "babyai_",
    "maze": "lmrlgym_maze_",
    "wordle": "lmrlgym_wordle_",
    "textcraft": "textcraft_",
    "webshop": "webshop_",
}
MAX_ID_DIGITS = 9
"""Task ids are at most this many ASCII digits (every split holds far fewer tasks)."""
IMPORTED = "agenttraj"
"""`Trajectory.finish` of a record read from a file."""
_ROLES = {"human": "user", "gpt": "assistant"}
_FROM = {v: k for k, v in _ROLES.items()}


class AgentTrajError(UserError):
    """A record that is not in AgentGym's trajectory format."""


MAX_FILE_BYTES = 4 * 2**30
"""The largest AgentTraj file read: a bound, so that a runaway file cannot exhaust memory."""


def item_id(env: str, task_id: int) -> str:
    return f"{ITEM_PREFIX.get(env, env + '_')}{task_id}"


def parse_item_id(item: object) -> tuple[str, int]:
    """'lmrlgym_maze_13' -> ('maze', 13)."""

    def task_number(text: str) -> bool:
        return text.isascii() and text.isdigit() and len(text) <= MAX_ID_DIGITS

    if isinstance(item, str):
        for env, prefix in ITEM_PREFIX.items():
            number = item.removeprefix(prefix)
            if item.startswith(prefix) and task_number(number):
                return env, int(number)
        env, _, number = item.rpartition("_")  # an environment of your own: '<name>_<task id>'
        if env in list_envs() and env not in ITEM_PREFIX and task_number(number):
            return env, int(number)
    shown = repr(item) if len(repr(item)) <= 60 else repr(item)[:57] + "..."
    raise AgentTrajError(
        f"item_id {shown} is not '<prefix><task id>' (at most {MAX_ID_DIGITS} digits) with a prefix among "
        f"{', '.join(ITEM_PREFIX.values())} or '<environment>_' for an environment of your own"
    )


def to_agenttraj(t: Trajectory) -> dict:
    """The AgentTraj record of `t`; fedse's own episodes also carry reward and success (as AgentEval)."""
    if t.finish == IMPORTED:
        turns = [{"from": _FROM[m["role"]], "value": m["content"], **_entry_extra(m)} for m in t.messages]
        return {"item_id": item_id(t.env, t.task_id), "conversations": turns, **t.extra}
    turns = []
    for i, m in enumerate(t.messages):
        trained = m.get("loss", i > 1) if m["role"] == "assistant" else None
        turns.append({"from": _FROM[m["role"]], "loss": trained, "value": m["content"]})
    if len(turns) > 3 and turns[-1]["from"] == "human":
        turns.pop()  # AgentTraj ends with the agent's last turn
    return {
        "item_id": item_id(t.env, t.task_id),
        "conversations": turns,
        "reward": t.reward,
        "success": int(t.success),
    }


def _entry_extra(m: dict) -> dict:
    return {k: v for k, v in m.items() if k not in ("role", "content")}


def from_agenttraj(record: object, where: str = "record") -> Trajectory:
    """One record as a Trajectory; without reward/success it counts as a success (AgentTraj
    holds expert successes)."""
    if not isinstance(record, dict):
        raise AgentTrajError(f"{where}: a record is a JSON object, got {type(record).__name__}")
    try:
        env, task_id = parse_item_id(record.get("item_id"))
    except AgentTrajError as error:
        raise AgentTrajError(f"{where}: {error}") from None
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or len(conversations) < 2:
        raise AgentTrajError(f"{where} ({record.get('item_id')}): 'conversations' must be a list of at least 2 turns")
    messages = []
    for n, c in enumerate(conversations):
        if not isinstance(c, dict) or c.get("from") not in _ROLES or not isinstance(c.get("value"), str):
            raise AgentTrajError(
                f"{where} ({record['item_id']}), turn {n}: each turn is {{'from': 'human' | 'gpt', 'value': str}}"
            )
        if c.get("loss", None) not in (None, True, False):
            raise AgentTrajError(f"{where} ({record['item_id']}), turn {n}: 'loss' must be true, false or null")
        messages.append(
            {"role": _ROLES[c["from"]], "content": c["value"]}
            | {k: v for k, v in c.items() if k not in ("from", "value")}
        )
    extra = {k: v for k, v in record.items() if k not in ("item_id", "conversations")}
    reward = extra.get("reward", 1.0)
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        raise AgentTrajError(f"{where} ({record['item_id']}): 'reward' must be a number")
    success = extra.get("success", reward == 1)
    if success not in (True, False, 0, 1) or isinstance(success, float):  # "no" must not read as a success
        raise AgentTrajError(f"{where} ({record['item_id']}): 'success' must be true, false, 1 or 0")
    success = bool(success)
    turns = sum(m["role"] == "assistant" for m in messages[2:])
    return Trajectory(env, task_id, messages, float(reward), success, turns, None, IMPORTED, extra=extra)


def read_agenttraj(path: str | Path) -> list[Trajectory]:
    """A JSON list of records (AgentGym's files) or JSON lines of them."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a device (/dev/zero) or a folder would be read forever or fail late
        raise AgentTrajError(f"{path}: not a regular file; give the path of an AgentTraj JSON file")
    if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
        raise AgentTrajError(
            f"{path}: {path.stat().st_size / 2**30:.1f} GB is over the {MAX_FILE_BYTES / 2**30:.0f} GB an AgentTraj file "
            "may have here; split it"
        )
    try:
        text = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise AgentTrajError(f"{path}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError as e:
        raise AgentTrajError(f"{path}: not UTF-8 text (byte {e.start}); AgentTraj files are UTF-8 JSON") from None
    try:
        if text.startswith("["):
            records = [(f"{path} [{i}]", r) for i, r in enumerate(json.loads(text))]
        else:
            records = [(f"{path}:{n}", json.loads(line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    except json.JSONDecodeError as e:
        raise AgentTrajError(f"{path}: not JSON ({e}); AgentTraj files are a JSON list or JSON lines") from None
    except RecursionError:
        raise AgentTrajError(f"{path}: JSON nested too deeply to be AgentTraj records") from None
    return [from_agenttraj(r, where) for where, r in records]


def seed_problem(t: Trajectory) -> str | None:
    """Why an imported record cannot seed a buffer (None: it can): it must hold an agent turn
    after the instruction and its acknowledgement."""
    if not any(m["role"] == "assistant" for m in t.messages[2:]):
        return "no agent turn after the instruction's acknowledgement: nothing to learn from"
    return None


def write_agenttraj(trajectories: Iterable[Trajectory], path: str | Path) -> int:
    """Write a JSON list of records (what AgentGym's trainer reads); returns how many."""
    records = [to_agenttraj(t) for t in trajectories]
    Path(path).write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return len(records)
