"""A client of a Flower federation: its round, on its own machine, with its own data.

`NodeClient` does for one client what the embedded runtime (`fedse.experiments.transport`) does for each of its
clients, with the same functions (`client_requests`, `rollout`, `learn`, `evaluate`): the
round's episodes, the success filter, the buffer, local SFT and the update. Everything it keeps
(buffer, personal adapters: `fedse.fl.client.ClientState`, the layout an embedded run's client
folders have too) lives under its node directory, `<data-dir>/<run token>/<client>/`;
nothing but the update's tensors and scalar metrics leaves it.

The base model is the expensive part: `cached_policy` loads it once per process and keeps it
across messages (a Ray actor in simulation, the `fedse flower worker` process in deployment).
The node's state is read from disk on every message, so any process of the node can serve the
next one, and a restarted node continues where its files are.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from flwr.app import MetricRecord, RecordDict

from fedse.agent.lora import Adapter
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.agent.rollout import RolloutStats, on_backends, rollout
from fedse.evolve.buffer import ExperienceBuffer
from fedse.experiments.config import RunConfig
from fedse.experiments.evaluation import evaluate
from fedse.experiments.records import EvalRecord
from fedse.fl.client import ClientState, client_requests, learn
from fedse.fl.server import fold, tensors_folded
from fedse.fl.update import Update, bound_update
from fedse.flower.codec import json_record, record_tensors, tensors_record
from fedse.flower.node_envs import NodeEnvs
from fedse.flower.secagg import keep_upload

_POLICIES: dict[tuple[str, str], Policy] = {}


def cached_policy(config: RunConfig) -> Policy:
    """The frozen base model for `config`, loaded once per process."""
    key = (config.model.name, config.base_dtype())
    if key not in _POLICIES:
        _POLICIES.clear()  # one base model per process: a node serves one federation at a time
        _POLICIES[key] = Policy(load_base(key[0], dtype=key[1]))
    return _POLICIES[key]


@dataclass
class TrainResult:
    update: Update
    stats: RolloutStats


class NodeClient:
    """Client `client` of the run `config` describes, keeping its state under `directory`."""

    def __init__(self, config: RunConfig, client: str, directory: str | Path, policy: Policy | None = None) -> None:
        """`config`: the run configuration as this node sees it (`NodeEnvs.run_config`)."""
        client_envs, partition = config.client_layout()
        if client not in client_envs:
            raise ValueError(f"this run has no client {client!r} (its clients: {', '.join(client_envs)})")
        self.config, self.client = config, client
        self.envs, (self.part, self.parts) = client_envs[client], partition[client]
        self.directory = Path(directory)
        self.backends = dict(config.env)
        self.state = ClientState(
            self.directory, client, self.envs, config.buffer, self.part, self.parts, config.model.name
        )
        """The client's buffer and personal adapters, in its node folder."""
        self.aggregator = config.fed.build_aggregator()
        self.policy = policy or cached_policy(config)
        self.spec = config.lora_spec()

    # --- state on disk ---------------------------------------------------------------------------

    def buffer(self, round_: int) -> ExperienceBuffer:
        """The buffer as it stood after round `round_ - 1`, seeded with the experts on first use:
        what an earlier attempt at `round_` (a crash, a resumed server) left is dropped."""
        self.state.rewind(round_ - 1)
        self.state.seed()
        return self.state.buffer

    # --- the round ---------------------------------------------------------------------------

    def start_adapter(self, round_: int, received: Adapter, slot: str) -> None:
        """Load the adapter this client works with in `round_` into `slot` (Federation.explore's rule)."""
        self.policy.load(slot, self.aggregator.client_start(received, self.state.personal(round_)))

    def set_base(self, base_delta: dict) -> None:
        """The server's cumulative ΔW folded into the base (mutating rules), float32 as it keeps it."""
        self.policy.reset_base()  # the process may have served another run
        if base_delta:
            self.policy.set_base_delta({m: d.float() for m, d in base_delta.items()})

    def train(self, round_: int, received: Adapter, base_delta: dict) -> TrainResult:
        """Explore, filter, grow the buffer, train, and return the update (Algorithm 1, lines 4-7)."""
        self.set_base(base_delta)
        self.start_adapter(round_ - 1, received, self.client)
        stats = RolloutStats()
        explored = []
        if round_ >= self.config.explore.first_round:
            requests = client_requests(
                self.client, self.envs, round_, self.config.explore, self.config.fed.seed, self.part, self.parts
            )
            requests = on_backends(requests, self.backends)
            explored = rollout(self.policy, requests, max_batch=self.config.explore.max_batch, stats=stats)
        self.buffer(round_)
        update, _ = learn(
            self.policy,
            self.state,
            explored,
            round_,
            self.config.explore,
            self.config.train,
            self.aggregator,
            seed=self.config.fed.seed,
            privacy=self.config.privacy,
        )
        return TrainResult(update, stats)

    def evaluate(self, round_: int, received: Adapter, base_delta: dict, envs: list[str]) -> list[EvalRecord]:
        """Greedy test episodes of `envs` with the adapter this client holds after `round_`."""
        unknown = [e for e in envs if e not in self.envs]
        if unknown:
            raise ValueError(f"client {self.client} holds {self.envs}, not {unknown}")
        self.set_base(base_delta)
        slot = f"eval-{self.client}"
        self.start_adapter(round_, received, slot)
        ev = self.config.eval
        return evaluate(
            self.policy,
            dict.fromkeys(envs, slot),
            round_,
            tasks=ev.tasks,
            max_new_tokens=ev.max_new_tokens,
            max_batch=self.config.eval_batch(),
            backends=self.backends,
        )


# --- message content <-> NodeClient (fedse.flower.client_app) ------------------------------------


def _received(client: NodeClient, content) -> tuple[Adapter, dict]:
    received = Adapter(client.spec, record_tensors(content["global"]))
    if "folded" in content:  # every round's factors: the node folds them as the server did
        return received, fold(tensors_folded(record_tensors(content["folded"])))
    return received, record_tensors(content["base"]) if "base" in content else {}


def _client(config: dict, directory: Path, own: NodeEnvs | None) -> NodeClient:
    run = (own or NodeEnvs()).run_config(config["run"], config["client"])
    return NodeClient(run, config["client"], directory)


def train_content(content, config: dict, directory: Path, own: NodeEnvs | None = None):
    """A train message's reply content: `update` (the factors the rule uploads) and `metrics`."""
    client = _client(config, directory, own)
    received, base = _received(client, content)
    result = client.train(int(config["round"]), received, base)
    s = result.stats
    metrics = {"num_examples": result.update.num_examples, **result.update.metrics}
    explore = {
        "episodes": s.episodes,
        "turns": s.turns,
        "processed_tokens": s.processed_tokens,
        "generated_tokens": s.generated_tokens,
        "seconds": s.seconds,
    }
    content = {"metrics": MetricRecord(metrics), "explore": MetricRecord(explore)}
    if config.get("secagg"):  # kept here for SecAgg+ to mask (fedse.flower.secagg); nothing sent now
        keep_secure_upload(client, result.update, received, directory, int(config["round"]))
    else:
        content["update"] = tensors_record(result.update.tensors)
    if result.update.inputs:  # a rule that reads inputs: the summary travels beside the factors
        content["inputs"] = tensors_record(result.update.inputs)
    return RecordDict(content)


def keep_secure_upload(client: NodeClient, update: Update, received: Adapter, directory: Path, round_: int) -> None:
    """Bound the update by the run's norm bound, as the server would had it seen it, and keep it."""
    fed = client.config.fed
    bounded, norm = bound_update(
        update, client.aggregator.upload(received.tensors), fed.max_update_norm, fed.update_bound
    )
    if bounded is None:
        raise ValueError(f"update norm {norm:.4g} is above the bound {fed.max_update_norm:g}")
    keep_upload(directory, round_, bounded.tensors, client.config.privacy.secagg_range)


def evaluate_content(content, config: dict, directory: Path, own: NodeEnvs | None = None):
    """An evaluate message's reply content: `eval`, one entry per environment tested."""
    client = _client(config, directory, own)
    received, base = _received(client, content)
    records = client.evaluate(int(config["round"]), received, base, list(config["envs"]))
    return RecordDict({"eval": json_record([asdict(r) for r in records])})
