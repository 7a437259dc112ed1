"""fedse's Flower ServerApp: the server loop of `fedse run`, with the clients behind Flower's Grid.

`FlowerTransport` is the federation's transport (`fedse.experiments.transport.Transport`) over
Flower: the clients' half of a round and the evaluation go as messages to SuperNodes instead of
being played in this process. The loop itself — validation, bounding and aggregation of updates,
diagnostics, server optimiser, checkpoints, `metrics.jsonl`, resume, report — is
`fedse.experiments.federation.Federation`, the same code as an embedded run. Buffers and personal
adapters live on the nodes (`fedse.flower.node`); the server keeps the global state only. Each
round also writes a `wire` record: the bytes of every message as Flower serialises them, and
which clients did not reply.

Run options come from Flower's run config (`flwr run ... --run-config "config='a.toml' ..."`),
see `fedse.flower.options.FlowerOptions`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.serverapp import Grid, ServerApp

from fedse.agent.policy import Policy
from fedse.agent.rollout import RolloutStats
from fedse.errors import UserError
from fedse.experiments.config import RunConfig, load_config
from fedse.experiments.federation import Federation
from fedse.experiments.records import ClientRecord, EvalRecord, ExploreRecord, WireRecord
from fedse.experiments.store import RunStore
from fedse.files import atomic_write_json
from fedse.fl.aggregators import Aggregator
from fedse.fl.server import ServerState, folded_tensors
from fedse.fl.update import Update
from fedse.flower.codec import json_record, record_json, record_tensors, tensors_record, wire_bytes
from fedse.flower.options import FlowerOptions
from fedse.process import set_up_process

log = logging.getLogger(__name__)


class FlowerTransport:
    """The clients of `config`, each on the SuperNode that says it is that client, reached through
    `grid`. The nodes keep the clients' buffers and personal adapters, so nothing of them is
    restored or checkpointed here."""

    def __init__(
        self, config: RunConfig, store: RunStore, grid: Grid, options: FlowerOptions, aggregator: Aggregator
    ) -> None:
        self.config, self.store, self.grid, self.options = config, store, grid, options
        self.aggregator = aggregator
        self.client_envs, _ = config.client_layout()
        self.clients = list(self.client_envs)
        self.node_of: dict[str, int] = {}
        """Client -> the SuperNode serving it (learnt by a `query` message)."""
        self.token = ""

    def prepare(self) -> None:
        """Nothing to read here: each node reads its own seed demonstrations on its machine."""

    def start(self, resume: bool, last: int, recorded: dict[str, str]) -> None:
        """The run's token (new for a fresh run: the nodes' folders are per token), then the nodes.
        Nodes seed their own buffers, and cut them back when a round is played again."""
        path = self.store.flower
        if not resume or not path.exists():
            atomic_write_json(path, {"token": uuid.uuid4().hex[:16]})
        self.token = json.loads(path.read_text())["token"]
        self.discover(self.options.wait_for_nodes)

    def kept(self, round_: int) -> tuple[dict[str, str], list[Path]]:
        """Nothing: the nodes keep their clients' state, out of the server's sight."""
        return {}, []

    # --- messages -------------------------------------------------------------------------------

    def _config(self, round_: int, client: str, **extra) -> dict:
        return {"clients": self.clients, "run": self.config.model_dump(), **self._where(round_, client), **extra}

    def _where(self, round_: int, client: str) -> dict:
        """What finds a client's files on its node: round, client, run token, node root."""
        node_root = self.options.node_root or str((self.store.root / "nodes").resolve())
        return {"round": round_, "client": client, "token": self.token, "node_root": node_root}

    def discover(self, wait: float) -> None:
        """Map clients to SuperNodes: ask every unmapped node which client it is, until all
        clients have one or `wait` seconds passed."""
        deadline = time.monotonic() + wait
        while True:
            connected = set(self.grid.get_node_ids())
            self.node_of = {c: n for c, n in self.node_of.items() if n in connected}
            unknown = connected - set(self.node_of.values())
            if unknown:
                messages = {
                    n: Message(
                        RecordDict({"config": json_record({"clients": self.clients})}), n, "query", group_id="discover"
                    )
                    for n in unknown
                }
                replies, _ = self._exchange(messages, timeout=max(30.0, wait))
                for node, reply in replies.items():
                    client = record_json(reply.content["config"])["client"]
                    if client not in self.clients:
                        log.warning("SuperNode %s says it is client %r, which this run does not have", node, client)
                    elif client in self.node_of and self.node_of[client] != node:
                        log.warning("SuperNodes %s and %s both say they are %r", self.node_of[client], node, client)
                    else:
                        self.node_of[client] = node
            if set(self.clients) <= set(self.node_of) or time.monotonic() >= deadline:
                break
            time.sleep(self.options.poll)
        missing = [c for c in self.clients if c not in self.node_of]
        if missing:
            log.warning("no SuperNode for %s yet", ", ".join(missing))

    def _exchange(self, messages: dict, timeout: float) -> tuple[dict, dict[object, str]]:
        """Push `messages` (key -> Message) and pull their replies until all came, their nodes
        left, or `timeout` passed. Returns (key -> reply, key -> why there is none)."""
        keys = list(messages)
        ids = list(self.grid.push_messages([messages[k] for k in keys]))
        pending = {i: k for i, k in zip(ids, keys) if i}
        replies: dict = {}
        missing: dict = {k: "the SuperLink did not accept the message" for i, k in zip(ids, keys) if not i}
        deadline = time.monotonic() + timeout
        while pending:
            for reply in self.grid.pull_messages(list(pending)):
                key = pending.pop(reply.metadata.reply_to_message_id, None)
                if key is None:
                    continue
                if reply.has_error():
                    missing[key] = f"error from the node: {reply.error.reason}"
                else:
                    replies[key] = reply
            if not pending:
                break
            connected = set(self.grid.get_node_ids())
            for i, key in list(pending.items()):
                if messages[key].metadata.dst_node_id not in connected:
                    missing[key] = "its SuperNode disconnected"
                    del pending[i]
            if time.monotonic() >= deadline:
                for key in pending.values():
                    missing[key] = f"no reply within {timeout:g} s"
                break
            time.sleep(self.options.poll)
        return replies, missing

    def _phase(
        self, kind: str, round_: int, targets: dict[str, dict], server: ServerState
    ) -> tuple[dict[str, Message], WireRecord]:
        """Send `kind` messages (train, evaluate) for `round_` to each target client's node."""
        self.discover(0.0)
        messages, dropped = {}, {}
        shared = {"global": tensors_record(server.adapter.tensors)}  # converted once, sent to every node
        if server.base_delta and server.folded:  # low-rank rules: every round's factors, folded on the node
            shared["folded"] = tensors_record(folded_tensors(server.folded))
        elif server.base_delta:
            shared["base"] = tensors_record(server.base_delta)
        for client, extra in targets.items():
            if client not in self.node_of:
                dropped[client] = "no SuperNode connected for it"
                continue
            content = RecordDict({**shared, "config": json_record(self._config(round_, client, **extra))})
            messages[client] = Message(content, self.node_of[client], kind, group_id=str(round_))
        down = {c: wire_bytes(m) for c, m in messages.items()}
        replies, missing = self._exchange(messages, self.options.round_timeout)
        dropped |= missing
        for client, why in dropped.items():
            log.warning("round %d %s: client %s dropped out (%s)", round_, kind, client, why)
            self.node_of.pop(client, None)  # ask again next round: it may come back on another node
        up = {c: wire_bytes(r) for c, r in replies.items()}
        return replies, WireRecord(round_, kind, down, up, dropped)

    # --- the clients' half of a round, and evaluation, over Flower --------------------------------

    def train(
        self, round_: int, clients: list[str], server: ServerState
    ) -> tuple[ExploreRecord, list[Update], list[ClientRecord]]:
        secure = self.config.privacy.secagg
        replies, wire = self._phase("train", round_, {c: {"secagg": True} if secure else {} for c in clients}, server)
        done = [c for c in clients if c in replies]
        if len(done) < min(self.options.min_clients, len(clients)):
            self.store.append(wire)
            raise UserError(
                f"round {round_}: {len(done)} of {len(clients)} clients replied ({', '.join(wire.dropped)} did not), "
                f"fewer than min-clients = {self.options.min_clients}; resume the run once their nodes are back"
            )
        stats, updates, records = RolloutStats(), [], []
        for client in done:
            content = replies[client].content
            explore = dict(content["explore"])
            stats.episodes += int(explore["episodes"])
            stats.turns += int(explore["turns"])
            stats.processed_tokens += int(explore["processed_tokens"])
            stats.generated_tokens += int(explore["generated_tokens"])
            stats.seconds = max(stats.seconds, float(explore["seconds"]))
            metrics = dict(content["metrics"])
            num_examples = metrics.pop("num_examples")
            if not secure:
                inputs = record_tensors(content["inputs"]) if "inputs" in content else {}
                updates.append(Update(client, record_tensors(content["update"]), num_examples, metrics, inputs))
            records.append(ClientRecord.from_metrics(round_, client, num_examples, metrics))
        if secure:
            updates = self.secure_mean(round_, done, {r.client: r.num_examples for r in records}, server)
        explore_record = ExploreRecord(
            round_,
            done,
            stats.episodes,
            stats.turns,
            stats.processed_tokens,
            stats.generated_tokens,
            stats.seconds,
        )
        self.store.append(explore_record, *records, wire)
        return explore_record, updates, records

    def secure_mean(
        self, round_: int, clients: list[str], examples: dict[str, int], server: ServerState
    ) -> list[Update]:
        """The mean of `clients`' kept uploads through SecAgg+ (`fedse.flower.secagg`), as one
        update on behalf of those it includes; none if fewer than two took part."""
        from fedse.flower.secagg import secure_mean

        if len(clients) < 2:
            log.warning("round %d: secure aggregation needs two clients or more, %d trained", round_, len(clients))
            return []
        nodes = {
            c: (self.node_of[c], {**self._where(round_, c), "clients": self.clients})
            for c in clients
            if c in self.node_of
        }
        like = self.aggregator.upload(server.adapter.tensors)
        mean, members = secure_mean(
            self.grid, nodes, like, self.config.privacy.secagg_range, self.options.round_timeout
        )
        if not members:
            log.warning("round %d: secure aggregation did not finish (too few clients answered every stage)", round_)
            return []
        total = sum(examples[c] for c in members)
        return [Update("+".join(members), mean, total, members=tuple(members))]

    def evaluate(self, round_: int, server: ServerState) -> list[EvalRecord]:
        """Each environment is tested on the node of the (last) client holding it, with the
        adapter that client holds (the global one, or its personal one)."""
        tester = {env: client for client, envs in self.client_envs.items() for env in envs}
        targets: dict[str, dict] = {}
        for env in self.config.fed.clients:
            targets.setdefault(tester[env], {"envs": []})["envs"].append(env)
        replies, wire = self._phase("evaluate", round_, targets, server)
        self.store.append(wire)
        records = {}
        for reply in replies.values():
            for r in record_json(reply.content["eval"]):
                records[r["env"]] = EvalRecord(**r)
        if not records:
            raise UserError(f"round {round_}: no node evaluated ({'; '.join(wire.dropped.values())})")
        return [records[env] for env in self.config.fed.clients if env in records]


def flower_federation(
    config: RunConfig, root: str | Path, grid: Grid, options: FlowerOptions, policy: Policy | None = None
) -> Federation:
    """The federation of `config` in run folder `root`, its clients reached through `grid`."""
    return Federation(
        config, root, policy, transport=lambda store, _, rule: FlowerTransport(config, store, grid, options, rule)
    )


def run_federation(grid: Grid, options: FlowerOptions, policy: Policy | None = None) -> Path:
    """The whole run on the server side; returns the run folder (its report written)."""
    from fedse.experiments.report import round_summary, write_report

    config = load_config(options.config, options.override_list())
    root = Path(options.run_dir or Path("runs") / config.name)
    federation = flower_federation(config, root, grid, options, policy)
    federation.run(
        resume=options.resume,
        force=options.force,
        echo=lambda records: print(round_summary(records, config.fed.rounds, config.fed.aggregator), flush=True),
        finish=lambda: write_report([root]),  # under the run's lock
    )
    return root


def make_server_app(options: FlowerOptions | None = None, policy: Policy | None = None) -> ServerApp:
    """A ServerApp running `run_federation` with `options` (default: from the run config)."""
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        # Flower starts this process, not fedse's CLI, so $FEDSE_THREADS and the allocator setting
        # are applied here; a float64 sum's last bits depend on the thread count it runs at.
        set_up_process()
        run_federation(grid, options or FlowerOptions.from_run_config(dict(context.run_config)), policy)

    return server


app = make_server_app()
