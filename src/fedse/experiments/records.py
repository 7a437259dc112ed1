"""The records of a run's `metrics.jsonl`: one typed record per event, and their grouping.

Every line is one JSON object `{"event": ..., "schema": SCHEMA_VERSION, <fields>}`:

| event | written | fields |
|---|---|---|
| `eval` | per round and environment, after evaluation | round, env, tasks, successes, success, reward, task_ids, task_successes |
| `eval_avg` | per round, after the `eval` records | round, avg_weighted, avg_mean, seconds |
| `explore` | per round, after the batched exploration | round, clients, episodes, turns, processed_tokens, generated_tokens, seconds |
| `client` | per round and sampled client, after its local training | round, client, num_examples and the client's metrics |
| `aggregate` | per round, after the server's aggregation | round, accepted, rejected, clipped and the round diagnostics |
| `wire` | Flower runs: per round and phase (train, evaluate) | round, phase, down, up (bytes per client, measured on the messages), dropped (client -> why) |
| `leakage` | by `bench/privacy.py`, after the run, for its last round | round, client, candidates, exposure (per canary and model), membership AUC |

The runtime writes these types, the report and the round summaries read them, and tests
build fake runs from them. A line without `schema` is version 1 (runs written before the
field existed); a newer version is refused with a message that names it.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from functools import cache
from pathlib import Path
from types import UnionType
from typing import ClassVar, Union, get_args, get_origin, get_type_hints

from fedse.errors import UserError

SCHEMA_VERSION = 1


class RecordError(UserError):
    """A metrics line that is not a record of this schema."""


@dataclass(frozen=True)
class Record:
    event: ClassVar[str]
    round: int

    def to_json(self) -> str:
        return json.dumps({"event": self.event, "schema": SCHEMA_VERSION, **asdict(self)})


@dataclass(frozen=True)
class EvalRecord(Record):
    """Greedy test success of the global (or personal) adapter on one environment."""

    event: ClassVar[str] = "eval"
    env: str
    tasks: int
    successes: int
    success: float
    reward: float
    """Mean episode reward."""
    task_ids: list[int] = field(default_factory=list)
    """The test ids played, in order (empty in runs written before per-task outcomes were kept)."""
    task_successes: list[int] = field(default_factory=list)
    """1 or 0 per task of `task_ids`: what paired comparisons across methods resample."""


@dataclass(frozen=True)
class EvalAvgRecord(Record):
    """Fed-SE's Avg (weighted by test tasks per environment) and the plain mean over environments."""

    event: ClassVar[str] = "eval_avg"
    avg_weighted: float
    avg_mean: float
    seconds: float


@dataclass(frozen=True)
class ExploreRecord(Record):
    """One round's exploration rollout over every sampled client."""

    event: ClassVar[str] = "explore"
    clients: list[str]
    episodes: int
    turns: int
    processed_tokens: int
    generated_tokens: int
    seconds: float


@dataclass(frozen=True)
class ClientRecord(Record):
    """What one client reported for one round (its update's scalar metrics)."""

    event: ClassVar[str] = "client"
    client: str
    num_examples: int
    explored: int
    explore_success: float
    explore_tokens: int
    kept: int
    added: int
    buffer: int
    train_examples: int
    train_tokens: int
    train_seconds: float
    truncated: int
    train_loss: float | None = None
    """None when the client trained no step (an empty buffer)."""
    inputs_seconds: float | None = None
    """Seconds spent measuring the layers' inputs for a rule that reads them (None: another rule)."""

    @classmethod
    def from_metrics(cls, round_: int, client: str, num_examples: int, metrics: dict[str, float]) -> ClientRecord:
        """The record of a client's update: its known metrics by name (others are not kept)."""
        names = [f.name for f in fields(cls) if f.name not in ("round", "client", "num_examples")]
        missing = [n for n in names if n not in metrics and n not in ("train_loss", "inputs_seconds")]
        if missing:
            raise ValueError(f"client {client}: metrics lack {', '.join(missing)}")
        return cls(round_, client, num_examples, **{n: metrics[n] for n in names if n in metrics})


@dataclass(frozen=True)
class AggregateRecord(Record):
    """The server's round: which updates it took, and the diagnostics of `fedse.fl.server`."""

    event: ClassVar[str] = "aggregate"
    accepted: list[str]
    rejected: dict[str, list[str]]
    clients: int
    clipped: dict[str, float] = field(default_factory=dict)
    """Client -> its update's norm before the server clipped it to `fed.max_update_norm`."""
    bytes_up: list[int] = field(default_factory=list)
    bytes_down: int = 0
    inexactness: float | None = None
    gap: float | None = None
    update_cosine: list[list[float]] | None = None
    update_norm: list[float] | None = None
    merge: dict[str, float] = field(default_factory=dict)
    """What the aggregation rule measured (`fedse.fl.aggregators.Aggregation.metrics`)."""
    privacy: dict[str, float | str] = field(default_factory=dict)
    """Under `[privacy] dp`: the mode, σ, C, δ, ε of this round alone and ε after it (cumulative)."""
    secure_aggregation: bool = False
    """The server saw only the clients' mean (SecAgg+), so the per-client figures are absent."""


@dataclass(frozen=True)
class WireRecord(Record):
    """A Flower round's messages: the bytes each client was sent and sent back, as Flower
    serialises them, and the clients that did not reply (with the reason)."""

    event: ClassVar[str] = "wire"
    phase: str
    down: dict[str, int]
    up: dict[str, int]
    dropped: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class LeakageRecord(Record):
    """What the run's final models reveal of one client's training data (`fedse.experiments.leakage`):
    the rank exposure of each canary secret planted in it, and its normal-fit estimate, under the
    base model, the global adapter and the client's last upload; and the membership AUC of its
    trained-on demonstrations against others, under the base model and the global adapter."""

    event: ClassVar[str] = "leakage"
    client: str
    candidates: int
    """How many random secrets each canary's secret was ranked among."""
    exposure: dict[str, list[float]]
    """Model ("base", "global", "own") -> rank exposure in bits, one per canary."""
    exposure_fit: dict[str, list[float]]
    """Model -> normal-fit exposure in bits, one per canary."""
    membership_auc: dict[str, float]
    """Model ("base", "global") -> AUC of −NLL per agent token, members against non-members."""
    members: int


RECORD_TYPES: dict[str, type[Record]] = {
    cls.event: cls
    for cls in (EvalRecord, EvalAvgRecord, ExploreRecord, ClientRecord, AggregateRecord, WireRecord, LeakageRecord)
}


def parse_record(line: str, where: str = "metrics") -> Record | None:
    """The record on one metrics line; None for an event this version does not know."""
    try:
        data = json.loads(line)
    except json.JSONDecodeError as error:
        raise RecordError(f"{where}: not JSON ({error.msg})") from None
    if not isinstance(data, dict):
        raise RecordError(f"{where}: a record is a JSON object, got {type(data).__name__}")
    version = data.pop("schema", 1)
    if version != SCHEMA_VERSION:
        raise RecordError(f"{where}: record schema {version!r}; this fedse reads schema {SCHEMA_VERSION}")
    cls = RECORD_TYPES.get(data.pop("event", None))
    if cls is None:
        return None
    known = {f.name for f in fields(cls)}
    round_ = data.get("round")
    if type(round_) is not int:
        raise RecordError(f"{where}: bad {cls.event} record (round {round_!r} is not an integer)")
    hints = _hints(cls)
    for f in fields(cls):
        if f.name in data and not _fits(data[f.name], hints[f.name]):
            shown = json.dumps(data[f.name])[:40]
            raise RecordError(f"{where}: bad {cls.event} record ({f.name} = {shown} is not {f.type})")
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as error:
        raise RecordError(f"{where}: bad {cls.event} record ({error})") from None


@cache
def _hints(cls: type[Record]) -> dict[str, object]:
    return get_type_hints(cls)


def _fits(value: object, hint: object) -> bool:
    """Whether a JSON value has the type a record field's (resolved) annotation names, element by
    element: `list[float]` takes a list of numbers, `dict[str, list[float]]` a mapping of such lists."""
    origin, args = get_origin(hint), get_args(hint)
    if origin in (Union, UnionType):
        return any(_fits(value, option) for option in args)
    if hint is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_fits(v, args[0]) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) and _fits(v, args[1]) for k, v in value.items())
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool):
        return isinstance(value, hint)
    return True  # a type this check does not know: the constructor decides


@dataclass
class RoundRecords:
    """The records of one round (round 0: the starting adapter's evaluation only)."""

    round: int
    evals: list[EvalRecord] = field(default_factory=list)
    eval_avg: EvalAvgRecord | None = None
    explore: ExploreRecord | None = None
    clients: list[ClientRecord] = field(default_factory=list)
    aggregate: AggregateRecord | None = None
    seconds: float | None = None
    """Wall time of the round, when the runtime that produced it says so."""

    def pooled(self) -> tuple[int, int]:
        """(successes, tasks) over every environment: the numerator and denominator of Avg."""
        return sum(r.successes for r in self.evals), sum(r.tasks for r in self.evals)

    def eval_of(self, env: str) -> EvalRecord | None:
        return next((r for r in self.evals if r.env == env), None)


@dataclass
class RunRecords:
    """One run's configuration (as written in config.json) and its records, grouped by event."""

    name: str
    root: Path
    config: dict
    eval: list[EvalRecord] = field(default_factory=list)
    eval_avg: list[EvalAvgRecord] = field(default_factory=list)
    explore: list[ExploreRecord] = field(default_factory=list)
    client: list[ClientRecord] = field(default_factory=list)
    aggregate: list[AggregateRecord] = field(default_factory=list)
    wire: list[WireRecord] = field(default_factory=list)
    leakage: list[LeakageRecord] = field(default_factory=list)

    def add(self, record: Record) -> None:
        getattr(self, record.event).append(record)

    @property
    def envs(self) -> list[str]:
        return list(dict.fromkeys(r.env for r in self.eval))

    @property
    def clients(self) -> list[str]:
        return list(dict.fromkeys(r.client for r in self.client))

    @property
    def rounds(self) -> list[int]:
        return sorted({r.round for r in self.eval_avg})

    def round(self, round_: int) -> RoundRecords:
        def of(records):
            return [r for r in records if r.round == round_]

        return RoundRecords(
            round_,
            evals=of(self.eval),
            eval_avg=next(iter(of(self.eval_avg)), None),
            explore=next(iter(of(self.explore)), None),
            clients=of(self.client),
            aggregate=next(iter(of(self.aggregate)), None),
        )
