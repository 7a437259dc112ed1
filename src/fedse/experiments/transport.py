"""How the server's loop reaches its clients: the clients' half of a round and the evaluation.

`fedse.experiments.federation.Federation` runs the server's loop (sampling, aggregation,
checkpoints, resume) and hands the clients' work to a transport, as Flower's strategies hand
theirs to a Grid:

- `InProcessTransport` (here): every client in this process on the server's own base model; the
  round's episodes of all clients played in one batched rollout, each client with its own
  adapter slot and seeds; buffers and personal adapters in the run folder's `clients/`;
- `fedse.flower.server_app.FlowerTransport`: each client on its own SuperNode, reached by
  messages; buffers and personal adapters stay on the nodes.

A transport answers to `Transport`; what it returns is what crosses the boundary (updates,
scalar records, evaluation outcomes), and the server's state reaches it read-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from fedse.agent.lora import Adapter
from fedse.agent.policy import Policy
from fedse.agent.rollout import RolloutStats, on_backends, rollout
from fedse.agent.trajectory import Trajectory
from fedse.envs import defined_on_its_node
from fedse.errors import UserError
from fedse.evolve.buffer import ExperienceBuffer
from fedse.experiments.config import RunConfig
from fedse.experiments.evaluation import evaluate
from fedse.experiments.records import ClientRecord, EvalRecord, ExploreRecord
from fedse.experiments.store import GLOBAL, RunStore
from fedse.fl.client import ClientState, client_requests, learn
from fedse.fl.server import ServerState
from fedse.fl.update import Update


class Transport(Protocol):
    """The clients' side of a federation, as the server's loop sees it."""

    def prepare(self) -> None:
        """Before a fresh run's folder is made: read and check what the clients start from here, so
        that a bad input (a seed file) fails with nothing created."""

    def start(self, resume: bool, last: int, recorded: dict[str, str]) -> None:
        """Before the first round of a sitting: a fresh run (`resume` False, `last` 0) or one resumed
        after round `last`, whose checkpoint recorded the buffer digests `recorded`."""

    def train(
        self, round_: int, clients: list[str], server: ServerState
    ) -> tuple[ExploreRecord, list[Update], list[ClientRecord]]:
        """The clients' half of round `round_` (Algorithm 1, lines 4-7) for the sampled `clients`;
        their records are appended to the run's metrics as they complete."""

    def evaluate(self, round_: int, server: ServerState) -> list[EvalRecord]:
        """Greedy test episodes of every environment with the adapter its client holds after `round_`."""

    def kept(self, round_: int) -> tuple[dict[str, str], list[Path]]:
        """What the server's checkpoint of `round_` records of the clients' state where it can see
        it (the embedded runtime's run folder): each buffer's digest, and the files of the
        personal adapters the clients hold after `round_`. Both empty over Flower."""


class InProcessTransport:
    """Every client of `config` in this process, on `policy` (the server's own model); each
    client's private state in the run folder's clients/<client>/ (`ClientState`)."""

    def __init__(self, config: RunConfig, store: RunStore, policy: Policy, aggregator, progress: bool = False) -> None:
        remote = [env for env in config.fed.clients if defined_on_its_node(env)]
        if remote:
            raise UserError(
                f"environment {remote[0]!r} is defined on its Flower node ([env.{remote[0]}] backend = 'node'): "
                f"run this federation with `fedse flower`, or give [env.{remote[0]}] its class to run it here"
            )
        if config.privacy.secagg:
            raise UserError(
                "privacy.secagg = true needs clients on other machines: run this federation with `fedse flower`, "
                "or set privacy.secagg = false to run it here"
            )
        self.config, self.store, self.policy, self.aggregator = config, store, policy, aggregator
        self.progress = progress
        self.client_envs, self.partition = config.client_layout()
        self._seeds: dict[str, list[Trajectory]] = {}
        self.states = {
            client: ClientState(store.client(client), client, envs, config.buffer, *self.partition[client])
            for client, envs in self.client_envs.items()
        }

    def buffer(self, client: str) -> ExperienceBuffer:
        return self.states[client].buffer

    def prepare(self) -> None:
        """Every client's seed demonstrations (experts, the seed file), read before the run exists."""
        self._seeds = {client: state.seeds() for client, state in self.states.items()}

    def start(self, resume: bool, last: int, recorded: dict[str, str]) -> None:
        """A fresh run seeds every buffer with its expert demonstrations (round 0); a resumed one
        cuts every buffer back to round `last` and checks it is what that round recorded."""
        for client, state in self.states.items():
            if not resume:
                state.seed(self._seeds.pop(client, None))
                continue
            state.rewind(last)
            if client in recorded and state.buffer.digest() != recorded[client]:
                raise UserError(
                    f"{self.store.buffer(client)} differs from what round {last}'s checkpoint recorded: it was "
                    "changed or corrupted; restore it (or start the run again)"
                )

    def kept(self, round_: int) -> tuple[dict[str, str], list[Path]]:
        """A client the round did not sample keeps its latest personal adapter as this round's too,
        so that every kept round holds every client's (and pruning old rounds loses none)."""
        files = []
        for state in self.states.values() if self.aggregator.personalized else []:
            folder = ClientState.personal_folder(state.root, round_)
            if not folder.exists():  # read the latest only to carry it forward
                if (adapter := state.personal(round_)) is None:
                    continue
                state.keep(round_, adapter)
            files += [p for p in folder.rglob("*") if p.is_file()]
        return {client: state.buffer.digest() for client, state in self.states.items()}, files

    # --- a round ---------------------------------------------------------------------------------

    def train(
        self, round_: int, clients: list[str], server: ServerState
    ) -> tuple[ExploreRecord, list[Update], list[ClientRecord]]:
        explored, explore_record = self.explore(round_, clients, server.adapter)
        self.store.append(explore_record)
        updates, client_records = [], []
        for client in clients:
            update, _ = learn(
                self.policy,
                self.states[client],
                explored[client],
                round_,
                self.config.explore,
                self.config.train,
                self.aggregator,
                seed=self.config.fed.seed,
                privacy=self.config.privacy,
                progress=f"{client}: train" if self.progress else None,
            )
            updates.append(update)
            client_records.append(ClientRecord.from_metrics(round_, client, update.num_examples, update.metrics))
            self.store.append(client_records[-1])
        return explore_record, updates, client_records

    def explore(
        self, round_: int, clients: list[str], received: Adapter
    ) -> tuple[dict[str, list[Trajectory]], ExploreRecord]:
        """Every sampled client's exploration, played in one batched rollout.

        Each client's episodes run with its own adapter slot and its own seeds, so each gets
        the trajectories it would get exploring alone (the engine's batch-invariance, pinned in
        tests/test_rollout.py, and the Flower runtime's equality with this one in
        tests/test_flower.py, both in float32); batching only fills the CPU better. In bfloat16
        that holds up to rounding: a 3-client run of the embedded model played different
        temperature-1.0 samples here and on Flower nodes (each alone, one thread each), while
        its evaluations and final adapter were equal.
        """
        for client in clients:  # the adapter each client starts from, in its own slot
            self.policy.load(client, self.aggregator.client_start(received, self.states[client].personal(round_ - 1)))
        if round_ < self.config.explore.first_round:
            return {client: [] for client in clients}, ExploreRecord(round_, clients, 0, 0, 0, 0, 0.0)
        requests = {
            c: client_requests(
                c, self.client_envs[c], round_, self.config.explore, self.config.fed.seed, *self.partition[c]
            )
            for c in clients
        }
        stats = RolloutStats()
        label = f"explore ({len(clients)} clients)" if self.progress else None
        flat = on_backends([r for client in clients for r in requests[client]], self.config.env)
        played = (
            rollout(self.policy, flat, max_batch=self.config.explore.max_batch, stats=stats, progress=label)
            if flat
            else []
        )
        out, i = {}, 0
        for client in clients:
            out[client], i = played[i : i + len(requests[client])], i + len(requests[client])
        record = ExploreRecord(
            round_, clients, stats.episodes, stats.turns, stats.processed_tokens, stats.generated_tokens, stats.seconds
        )
        return out, record

    def eval_adapters(self, received: Adapter, round_: int) -> dict[str, str]:
        """env -> name of the loaded adapter to evaluate it with after `round_` (personalised
        rules: each client's own, once it has one)."""
        if not self.aggregator.personalized:
            return dict.fromkeys(self.config.fed.clients, GLOBAL)
        personal = {client: state.personal(round_) for client, state in self.states.items()}
        if not any(personal.values()):
            return dict.fromkeys(self.config.fed.clients, GLOBAL)
        adapters = {}
        for client, envs in self.client_envs.items():
            name = f"eval-{client}"
            self.policy.load(name, self.aggregator.client_start(received, personal[client]))
            adapters |= dict.fromkeys(envs, name)
        return adapters

    def evaluate(self, round_: int, server: ServerState) -> list[EvalRecord]:
        ev = self.config.eval
        return evaluate(
            self.policy,
            self.eval_adapters(server.adapter, round_),
            round_,
            tasks=ev.tasks,
            max_new_tokens=ev.max_new_tokens,
            max_batch=self.config.eval_batch(),
            progress=f"eval round {round_}" if self.progress else None,
            backends=self.config.env,
        )
