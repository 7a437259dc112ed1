"""The server's loop of a federation: sample, hand the clients' half of the round to a transport,
aggregate, evaluate, checkpoint.

A round (Fed-SE Algorithm 1): the sampled clients explore, filter, grow their buffers and train
(`fedse.experiments.transport`: in this process, every client's episodes in one batched
rollout on one frozen base model with adapters swapped; or on Flower nodes); the server
aggregates their updates (`fedse.fl.server`); the new adapter is evaluated and checkpointed.

`Federation` holds only this loop and the server's state (`fedse.fl.server.ServerState`); the
run folder (records, checkpoints, resume) is `fedse.experiments.store.RunStore`'s. `rounds()`
yields each completed round's records, for the caller to print or collect. Since every seed is
derived from (run seed, round, client) rather than carried RNG state, a resumed run produces the
same final adapter as an uninterrupted one.
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
from fedse.errors import UserError
from fedse.experiments.config import RunConfig, check_resume_changes, validate_config
from fedse.experiments.evaluation import averages
from fedse.experiments.records import AggregateRecord, RoundRecords
from fedse.experiments.store import GLOBAL, Checkpoint, RunStore, machine_record
from fedse.experiments.tensorboard import TensorBoardLog
from fedse.experiments.transport import InProcessTransport, Transport
from fedse.files import atomic_write_json
from fedse.fl.aggregators import Aggregator
from fedse.fl.privacy import PrivateSeed, epsilon
from fedse.fl.server import ServerOptimizer, ServerState, aggregate_round
from fedse.fl.update import Update
from fedse.seeds import derived_seed


class Federation:
    def __init__(
        self,
        config: RunConfig,
        root: str | Path,
        policy: Policy | None = None,
        progress: bool = False,
        transport: Callable[[RunStore, Policy, Aggregator], Transport] | None = None,
    ) -> None:
        """`transport` makes the clients' side from the run folder, the model and the rule once they
        exist (default: every client in this process, `InProcessTransport`)."""
        self.config = config
        self.store = RunStore(root)
        self.aggregator = config.fed.build_aggregator()
        self.policy = policy or Policy(load_base(config.model.name, dtype=config.base_dtype()))
        self.spec = config.lora_spec()
        try:
            self.policy.check_spec(self.spec)
        except ValueError as error:
            raise UserError(f"model.target_modules: {error}") from None
        self.envs = list(config.fed.clients)
        self.client_envs, _ = config.client_layout()
        """Client -> the environments it holds: one each (Fed-SE), or all in one (centralized)."""
        self.clients = list(self.client_envs)
        self.server: ServerState | None = None
        """The server's state (global adapter, folded base delta, aggregator and optimiser state)."""
        make = transport or (lambda store, policy, rule: InProcessTransport(config, store, policy, rule, progress))
        self.transport = make(self.store, self.policy, self.aggregator)

    @property
    def global_adapter(self) -> Adapter | None:
        return self.server.adapter if self.server else None

    @property
    def base_delta(self) -> dict[str, torch.Tensor]:
        return self.server.base_delta if self.server else {}

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
            self.transport.start(True, last, recorded_buffers)
            self.store.trim_records(last)
            return last
        self.store.create(self.config.model_dump(), force=force)
        self.server = ServerState(self.policy.new_adapter(GLOBAL, self.spec, seed=self.config.fed.seed))
        self.transport.start(False, 0, {})
        return 0

    def load_checkpoint(self, round_: int) -> None:
        """Put the policy and server state back to the end of `round_`."""
        checkpoint = self.store.load_checkpoint(round_)
        self.server = ServerState(
            checkpoint.global_adapter,
            {m: d.float() for m, d in checkpoint.base_delta.items()},
            checkpoint.aggregator_state,
            checkpoint.server_state,
            checkpoint.folded,
        )
        self.policy.load(GLOBAL, self.global_adapter)
        if self.base_delta:
            self.policy.set_base_delta(self.base_delta)

    # --- the loop ----------------------------------------------------------------------------

    def rounds(
        self,
        resume: bool = False,
        force: bool = False,
        change_config: bool = False,
        finish: Callable[[], object] | None = None,
    ) -> Iterator[RoundRecords]:
        """Run (or continue) the federation, yielding each round's records as it completes.

        Round 0 evaluates and checkpoints the starting adapter, like any other round. The run
        folder is locked meanwhile (`RunStore.lock`): one process per run. Each call is a
        sitting, recorded in the run's machine.jsonl."""
        if resume and not self.store.root.is_dir():
            raise FileNotFoundError(f"{self.store.root} does not exist: nothing to resume")
        if not resume:
            self.transport.prepare()  # a bad seed file fails here, before the run folder is touched
        with self.store.lock():
            last = self.start(resume=resume, force=force, change_config=change_config)
            self.store.record_sitting(machine_record(self.policy.dtype, resume))
            self.store.sink = TensorBoardLog(self.store.root) if self.config.log.tensorboard else None
            if not resume:
                start = time.perf_counter()
                evals, eval_avg = self.evaluate_round(0) if self.config.eval.first else ([], None)
                self._checkpoint(0)
                yield RoundRecords(0, evals=evals, eval_avg=eval_avg, seconds=time.perf_counter() - start)
            for round_ in range(last + 1, self.config.fed.rounds + 1):
                yield self.round(round_)
            if finish is not None:  # e.g. the report: written while no other process may touch the run
                finish()

    def run(
        self,
        resume: bool = False,
        force: bool = False,
        echo: Callable[[RoundRecords], object] | None = None,
        change_config: bool = False,
        finish: Callable[[], object] | None = None,
    ) -> list[RoundRecords]:
        """Run every round (or the rest of them): the one driver `fedse run`, the experiment grid
        and Flower's ServerApp share. `echo` is called with each round's records as it completes.
        Returns them all."""
        done = []
        for records in self.rounds(resume=resume, force=force, change_config=change_config, finish=finish):
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
        explore_record, updates, client_records = self.transport.train(round_, clients, self.server)
        aggregate_record = self.aggregate(round_, updates)
        self.store.append(aggregate_record)
        evals, eval_avg = [], None
        if round_ % self.config.eval.every == 0 or round_ == self.config.fed.rounds:
            evals, eval_avg = self.evaluate_round(round_)
        self._checkpoint(round_)
        return RoundRecords(
            round_, evals, eval_avg, explore_record, client_records, aggregate_record, time.perf_counter() - start
        )

    def aggregate(self, round_: int, updates: list[Update]) -> AggregateRecord:
        """The server's step: validate and aggregate, then install the new global state."""
        fed = self.config.fed
        result = aggregate_round(
            self.aggregator,
            self.server.adapter,
            updates,
            self.server.aggregator,
            max_update_norm=fed.max_update_norm,
            bound=fed.update_bound,
            optimizer=ServerOptimizer(
                fed.server_optimizer, fed.server_lr, fed.server_momentum, fed.server_beta2, fed.server_eps
            ),
            server_state=self.server.optimizer,
            privacy=self.config.privacy,
            noise=PrivateSeed(self.store.root).generator(round_, "server")
            if self.config.privacy.dp == "central"
            else None,
        )
        changed = self.server.apply(result)
        self.policy.load(GLOBAL, self.global_adapter)
        if changed:
            self.policy.set_base_delta(changed)
        privacy = self.privacy_spent(round_) if self.config.privacy.dp != "off" else {}
        return AggregateRecord(
            round_, result.accepted, result.rejected, clipped=result.clipped, privacy=privacy, **result.diagnostics
        )

    def privacy_spent(self, round_: int) -> dict[str, float | str]:
        """The accountant after `round_` releases of the mechanism (`fedse.fl.privacy`): every
        round counts, as if every client took part in each (no amplification by sampling)."""
        p = self.config.privacy
        return {
            "dp": p.dp,
            "noise_multiplier": p.noise_multiplier,
            "clip": p.clip,
            "delta": p.delta,
            "round_epsilon": epsilon(p.noise_multiplier, 1, p.delta),
            "epsilon": epsilon(p.noise_multiplier, round_, p.delta),
        }

    def evaluate_round(self, round_: int):
        """Evaluate the current global adapter and record the result."""
        start = time.perf_counter()
        evals = self.transport.evaluate(round_, self.server)
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
        self.store.verify_checkpoint(round_)
        self.load_checkpoint(round_)
        evals = self.transport.evaluate(round_, self.server)
        avg = averages(evals, seconds=0.0)
        per_env = {
            e.env: {"tasks": e.tasks, "successes": e.successes, "success": e.success, "reward": e.reward} for e in evals
        }
        result = {"round": round_, "eval": per_env, "avg_weighted": avg.avg_weighted, "avg_mean": avg.avg_mean}
        out = self.store.evaluation(round_, self.config.eval.tasks)
        atomic_write_json(out, result)
        return result, out

    def _checkpoint(self, round_: int) -> None:
        server = self.server
        buffers, client_files = self.transport.kept(round_)
        checkpoint = Checkpoint(server.adapter, server.base_delta, server.aggregator, server.optimizer, server.folded)
        self.store.save_checkpoint(
            round_,
            checkpoint,
            base_model=self.config.model.name,
            config=self.config.model_dump(),
            buffers=buffers,
            client_files=client_files,
        )
        keep = self.config.checkpoints
        self.store.prune_checkpoints(keep.keep_last, keep.keep_every)
