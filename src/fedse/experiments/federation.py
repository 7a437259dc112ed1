"""The embedded federation: all clients in one process on one frozen base model, adapters swapped.

A round (Fed-SE Algorithm 1): every sampled client's exploration is played in one batched
rollout (each client with its own adapter slot and seeds, so batching changes nothing but
speed); then each client filters, grows its buffer and trains (`fedse.fl.client.learn`); the
server aggregates the updates; the new adapter is evaluated and checkpointed.

`Federation` holds only this round logic; the run folder (records, checkpoints, resume) is
`fedse.experiments.store.RunStore`'s. `rounds()` yields each completed round's records, for
the caller to print or collect. Since every seed is derived from (run seed, round, client)
rather than carried RNG state, a resumed run produces the same final adapter as an
uninterrupted one.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from fedse.agent.lora import Adapter
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.agent.rollout import RolloutStats, on_backends, rollout
from fedse.agent.trajectory import Trajectory
from fedse.errors import UserError
from fedse.evolve.buffer import ExperienceBuffer
from fedse.experiments.config import RunConfig, check_resume_changes, validate_config
from fedse.experiments.evaluation import averages, evaluate
from fedse.experiments.records import AggregateRecord, ClientRecord, EvalRecord, ExploreRecord, RoundRecords
from fedse.experiments.store import GLOBAL, Checkpoint, RunStore, machine_record
from fedse.files import atomic_write_json
from fedse.fl.client import client_requests, expert_seeds, learn
from fedse.fl.server import ServerOptimizer, aggregate_round
from fedse.fl.update import Update
from fedse.seeds import derived_seed


class Federation:
    def __init__(
        self, config: RunConfig, root: str | Path, policy: Policy | None = None, progress: bool = False
    ) -> None:
        self.config = config
        self.progress = progress
        self.store = RunStore(root)
        self.aggregator = config.fed.build_aggregator()
        self.policy = policy or Policy(load_base(config.model.name, dtype=config.base_dtype()))
        self.spec = config.lora_spec()
        try:
            self.policy.check_spec(self.spec)
        except ValueError as error:
            raise UserError(f"model.target_modules: {error}") from None
        self.envs = list(config.fed.clients)
        self.client_envs, self.partition = config.client_layout()
        """Client -> the environments it holds: one each (Fed-SE), or all in one (centralized);
        client -> (its partition, how many) of its environment's train split."""
        self.clients = list(self.client_envs)
        self.global_adapter: Adapter | None = None
        self.base_delta: dict[str, torch.Tensor] = {}
        """Cumulative ΔW folded into the base so far (mutating aggregators), float32 on the CPU:
        summed in float64 each round, kept as the checkpoint stores it (half of float64's
        850 MB a round for SmolLM2-135M), so a resumed run holds exactly what this one does."""
        self.personal: dict[str, Adapter] = {}
        self.aggregator_state: dict = {}
        self.server_state: dict[str, torch.Tensor] = {}
        """The server optimiser's moments (momentum / adam), float32."""
        self._buffers: dict[str, ExperienceBuffer] = {}

    # --- setup and resume --------------------------------------------------------------------

    def start(self, resume: bool = False, force: bool = False, change_config: bool = False) -> int:
        """Prepare the run directory; returns the last completed round (0 for a fresh run).

        A resume continues under the configuration the last checkpoint was written with; a
        different one (an edited config.json, --set) only with `change_config`, and only in
        what `check_resume_changes` allows."""
        if resume:
            last = self.store.last_round()
            if last is None:
                raise FileNotFoundError(f"{self.store.root} has no completed round to resume from (no state.json)")
            recorded_buffers = self.store.verify(last)  # before anything is read from, or written to, the run
            recorded = self.store.checkpoint_config(last)
            if recorded is not None:
                where = f"resuming {self.store.root} after round {last}"
                before = validate_config(recorded, where=str(self.store.checkpoint(last) / "config.json"))
                if check_resume_changes(before, self.config, change_config, where):
                    self.store.write_config(self.config.model_dump())
            self.load_checkpoint(last)
            self.check_buffers(last, recorded_buffers)
            self.store.trim_records(last)
            return last
        self.store.create(self.config.model_dump(), force=force)
        self.global_adapter = self.policy.new_adapter(GLOBAL, self.spec, seed=self.config.fed.seed)
        self.seed_buffers()
        return 0

    def seed_buffers(self) -> None:
        """Start every client's buffer with its expert demonstrations (round 0)."""
        buf = self.config.buffer
        for client, envs in self.client_envs.items():
            part, parts = self.partition[client]
            self.buffer(client).add(expert_seeds(client, envs, buf.expert_seeds, part, parts, buf.seed_file), round_=0)

    def check_buffers(self, last: int, recorded: dict[str, str]) -> None:
        """Cut every buffer back to round `last` and check it is what that round's checkpoint recorded."""
        for client in self.clients:
            self.buffer(client).truncate(last)
            if client in recorded and self.buffer(client).digest() != recorded[client]:
                raise UserError(
                    f"{self.store.buffer(client)} differs from what round {last}'s checkpoint recorded: it was "
                    "changed or corrupted; restore it (or start the run again)"
                )

    def buffer_digests(self) -> dict[str, str]:
        return {client: self.buffer(client).digest() for client in self.clients}

    def buffer(self, client: str) -> ExperienceBuffer:
        """The client's buffer, read from disk once per process."""
        if client not in self._buffers:
            self._buffers[client] = ExperienceBuffer(self.store.buffer(client), self.config.buffer)
        return self._buffers[client]

    def load_checkpoint(self, round_: int) -> None:
        """Put the policy and server state back to the end of `round_` (adapters, base delta, aggregator)."""
        checkpoint = self.store.load_checkpoint(round_, self.clients)
        self.global_adapter = checkpoint.global_adapter
        self.policy.load(GLOBAL, self.global_adapter)
        self.base_delta = {m: d.float() for m, d in checkpoint.base_delta.items()}
        if self.base_delta:
            self.policy.set_base_delta(self.base_delta)
        self.aggregator_state = checkpoint.aggregator_state
        self.server_state = checkpoint.server_state
        self.personal = checkpoint.personal

    # --- the loop ----------------------------------------------------------------------------

    def rounds(self, resume: bool = False, force: bool = False, change_config: bool = False) -> Iterator[RoundRecords]:
        """Run (or continue) the federation, yielding each round's records as it completes.

        Round 0 evaluates and checkpoints the starting adapter, like any other round. The run
        folder is locked meanwhile (`RunStore.lock`): one process per run. Each call is a
        sitting, recorded in the run's machine.jsonl."""
        if resume and not self.store.root.is_dir():
            raise FileNotFoundError(f"{self.store.root} does not exist: nothing to resume")
        with self.store.lock():
            last = self.start(resume=resume, force=force, change_config=change_config)
            self.store.record_sitting(machine_record(self.policy.dtype, resume))
            if not resume:
                start = time.perf_counter()
                evals, eval_avg = self.evaluate_round(0) if self.config.eval.first else ([], None)
                self._checkpoint(0)
                yield RoundRecords(0, evals=evals, eval_avg=eval_avg, seconds=time.perf_counter() - start)
            for round_ in range(last + 1, self.config.fed.rounds + 1):
                yield self.round(round_)

    def run(
        self,
        resume: bool = False,
        force: bool = False,
        echo: Callable[[RoundRecords], object] | None = None,
        change_config: bool = False,
    ) -> list[RoundRecords]:
        """Run every round (or the rest of them): the one driver `fedse run`, the experiment grid
        and Flower's ServerApp share. `echo` is called with each round's records as it completes.
        Returns them all."""
        done = []
        for records in self.rounds(resume=resume, force=force, change_config=change_config):
            if echo is not None:
                echo(records)
            done.append(records)
        return done

    def sampled_clients(self, round_: int) -> list[str]:
        k = self.config.fed.clients_per_round
        count = len(self.clients) if k == 1.0 else (round(k * len(self.clients)) if k < 1 else int(k))
        count = max(1, min(len(self.clients), count))
        if count == len(self.clients):
            return list(self.clients)
        return sorted(random.Random(derived_seed(self.config.fed.seed, "sample", round_)).sample(self.clients, count))

    def round(self, round_: int) -> RoundRecords:
        """One round: explore, learn on every sampled client, aggregate, evaluate, checkpoint."""
        start = time.perf_counter()
        clients = self.sampled_clients(round_)
        explore_record, updates, client_records = self.train_clients(round_, clients)
        aggregate_record = self.aggregate(round_, updates)
        self.store.append(aggregate_record)
        evals, eval_avg = [], None
        if round_ % self.config.eval.every == 0 or round_ == self.config.fed.rounds:
            evals, eval_avg = self.evaluate_round(round_)
        self._checkpoint(round_)
        return RoundRecords(
            round_, evals, eval_avg, explore_record, client_records, aggregate_record, time.perf_counter() - start
        )

    def train_clients(self, round_: int, clients: list[str]) -> tuple[ExploreRecord, list[Update], list[ClientRecord]]:
        """The clients' half of a round (Algorithm 1, lines 4-7): explore, then learn, each client;
        their records go to metrics.jsonl as they complete."""
        explored, explore_record = self.explore(round_, clients)
        self.store.append(explore_record)
        updates, client_records = [], []
        for client in clients:
            update, trained = self.learn(round_, client, explored[client])
            if self.aggregator.personalized:  # the client's own state: it never reaches the server
                self.personal[client] = trained
            updates.append(update)
            client_records.append(ClientRecord.from_metrics(round_, client, update.num_examples, update.metrics))
            self.store.append(client_records[-1])
        return explore_record, updates, client_records

    def explore(self, round_: int, clients: list[str]) -> tuple[dict[str, list[Trajectory]], ExploreRecord]:
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
            self.policy.load(client, self.aggregator.client_start(self.global_adapter, self.personal.get(client)))
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

    def learn(self, round_: int, client: str, explored: list[Trajectory]) -> tuple[Update, Adapter]:
        return learn(
            self.policy,
            client,
            explored,
            self.buffer(client),
            round_,
            self.config.explore,
            self.config.train,
            self.aggregator,
            seed=self.config.fed.seed,
            progress=self.progress,
        )

    def aggregate(self, round_: int, updates: list[Update]) -> AggregateRecord:
        """The server's step: validate and aggregate, then install the new global state."""
        fed = self.config.fed
        result = aggregate_round(
            self.aggregator,
            self.global_adapter,
            updates,
            self.aggregator_state,
            max_update_norm=fed.max_update_norm,
            bound=fed.update_bound,
            optimizer=ServerOptimizer(
                fed.server_optimizer, fed.server_lr, fed.server_momentum, fed.server_beta2, fed.server_eps
            ),
            server_state=self.server_state,
        )
        self.global_adapter, self.aggregator_state = result.aggregation.adapter, result.aggregation.state
        self.server_state = result.server_state
        self.policy.load(GLOBAL, self.global_adapter)
        if result.aggregation.base_delta:
            for module, d in result.aggregation.base_delta.items():
                previous = self.base_delta.get(module, torch.zeros_like(d, dtype=torch.float32))
                self.base_delta[module] = (previous.double() + d.double()).float()
            self.policy.set_base_delta({m: self.base_delta[m] for m in result.aggregation.base_delta})
        return AggregateRecord(round_, result.accepted, result.rejected, clipped=result.clipped, **result.diagnostics)

    def eval_adapters(self) -> dict[str, str]:
        """env -> name of the loaded adapter to evaluate it with (personalised rules: each client's own)."""
        if not (self.aggregator.personalized and self.personal):
            return dict.fromkeys(self.envs, GLOBAL)
        adapters = {}
        for client, envs in self.client_envs.items():
            name = f"eval-{client}"
            self.policy.load(name, self.aggregator.client_start(self.global_adapter, self.personal.get(client)))
            adapters |= dict.fromkeys(envs, name)
        return adapters

    def _evaluate(self, round_: int) -> list[EvalRecord]:
        ev = self.config.eval
        return evaluate(
            self.policy,
            self.eval_adapters(),
            round_,
            tasks=ev.tasks,
            max_new_tokens=ev.max_new_tokens,
            max_batch=self.config.explore.max_batch,
            progress=f"eval round {round_}" if self.progress else None,
            backends=self.config.env,
        )

    def evaluate_round(self, round_: int):
        """Evaluate the current global adapter and record the result."""
        start = time.perf_counter()
        evals = self._evaluate(round_)
        eval_avg = averages(evals, seconds=time.perf_counter() - start)
        self.store.append(*evals, eval_avg)
        return evals, eval_avg

    def evaluate_checkpoint(self, round_: int | None = None) -> tuple[dict, Path]:
        """Evaluate checkpoint `round_` (default: the last completed) with this config's eval settings.

        The result also goes to `evals/round_NNN_tasks_K.json`; metrics.jsonl is left as it was.
        """
        if round_ is None:
            round_ = self.store.last_round()
            if round_ is None:
                raise UserError(f"{self.store.root} has no completed round yet")
        self.load_checkpoint(round_)
        evals = self._evaluate(round_)
        avg = averages(evals, seconds=0.0)
        per_env = {
            e.env: {"tasks": e.tasks, "successes": e.successes, "success": e.success, "reward": e.reward} for e in evals
        }
        result = {"round": round_, "eval": per_env, "avg_weighted": avg.avg_weighted, "avg_mean": avg.avg_mean}
        out = self.store.evaluation(round_, self.config.eval.tasks)
        atomic_write_json(out, result)
        return result, out

    def _checkpoint(self, round_: int) -> None:
        checkpoint = Checkpoint(
            self.global_adapter, self.base_delta, self.aggregator_state, self.personal, self.server_state
        )
        buffers = self.buffer_digests()
        self.store.save_checkpoint(
            round_, checkpoint, base_model=self.config.model.name, config=self.config.model_dump(), buffers=buffers
        )
        keep = self.config.checkpoints
        self.store.prune_checkpoints(keep.keep_last, keep.keep_every)
