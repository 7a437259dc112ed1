"""The embedded federation: all clients in one process on one frozen base model, adapters swapped.

A round (Fed-SE Algorithm 1): every sampled client's exploration is played in one batched
rollout (each client with its own adapter slot and seeds, so batching changes nothing but
speed); then each client filters, grows its buffer and trains (`fedse.fl.client.learn`); the
server aggregates the updates; the new adapter is evaluated and checkpointed.

A run lives in `runs/<name>/`:

    config.json          the resolved configuration
    metrics.jsonl        one record per event: eval (round, env), eval_avg, explore, client, aggregate
    clients/<c>/buffer.jsonl   each client's experience buffer (private to the client)
    checkpoints/round_NNN/     global adapter (PEFT format), base delta, aggregator state, personal adapters
    state.json           the last completed round (0: the starting adapter, evaluated)

A checkpoint is written to a temporary folder and renamed, then state.json is replaced, so a
crash leaves the previous round intact; `resume` continues after the last completed round,
trims buffers and metrics of the unfinished one, and, since every seed is derived from (run
seed, round, client) rather than carried RNG state, produces the same final adapter as an
uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from fedse.agent.lora import Adapter, LoraSpec, load_adapter, save_adapter
from fedse.agent.model import load_base
from fedse.agent.policy import Policy, module_weights
from fedse.agent.rollout import RolloutRequest, RolloutStats, Sampling, rollout
from fedse.agent.trajectory import Trajectory
from fedse.envs import make_env
from fedse.errors import UserError
from fedse.evolve.buffer import BufferConfig, ExperienceBuffer
from fedse.evolve.sft import TrainConfig
from fedse.evolve.store import expert_trajectory
from fedse.experiments.config import RunConfig
from fedse.experiments.report import load_run, round_summary
from fedse.fl.aggregators import make_aggregator
from fedse.fl.client import ClientSettings, derived_seed, exploration_requests, exploration_tasks, learn
from fedse.fl.server import aggregate_round

log = logging.getLogger(__name__)
GLOBAL = "global"


class RunExists(FileExistsError):
    pass


@dataclass
class RunPaths:
    root: Path

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def state(self) -> Path:
        return self.root / "state.json"

    def buffer(self, client: str) -> Path:
        return self.root / "clients" / client / "buffer.jsonl"

    def checkpoint(self, round_: int) -> Path:
        return self.root / "checkpoints" / f"round_{round_:03d}"


def _write_json(path: Path, data) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _append_metrics(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def evaluation_tasks(env_name: str, count: int | None) -> list[int]:
    """`count` test ids spread evenly over the env's test split (None: all of it).

    The split is ordered by difficulty for some envs (TextCraft's depth bands), so a prefix
    would not be representative.

    >>> evaluation_tasks("maze", 5)
    [0, 5, 10, 15, 20]
    """
    ids = make_env(env_name).splits["test"]
    if count is None or count >= len(ids):
        return list(ids)
    return [ids[i * len(ids) // count] for i in range(count)]


def evaluate(
    policy: Policy, config: RunConfig, adapters: dict[str, str], progress: str | None = None
) -> dict[str, dict]:
    """Greedy rollouts on each client environment's test split; `adapters` maps env -> adapter name."""
    sampling = Sampling(temperature=0.0, max_new_tokens=config.eval.max_new_tokens)
    requests = []
    for env_name, adapter in adapters.items():
        ids = evaluation_tasks(env_name, config.eval.tasks)
        requests += [RolloutRequest(env_name, i, adapter=adapter, sampling=sampling) for i in ids]
    trajectories = rollout(policy, requests, max_batch=config.explore.max_batch, progress=progress)
    out: dict[str, dict] = {}
    for env_name in adapters:
        mine = [t for t in trajectories if t.env == env_name]
        successes = sum(t.success for t in mine)
        out[env_name] = {
            "tasks": len(mine),
            "successes": successes,
            "success": successes / len(mine),
            "reward": sum(t.reward for t in mine) / len(mine),
        }
    return out


def averages(per_env: dict[str, dict]) -> dict[str, float]:
    """Fed-SE's "Avg" (weighted by test-task count) and the plain mean over environments."""
    tasks = sum(e["tasks"] for e in per_env.values())
    return {
        "avg_weighted": sum(e["successes"] for e in per_env.values()) / tasks,
        "avg_mean": sum(e["success"] for e in per_env.values()) / len(per_env),
    }


class Federation:
    def __init__(
        self, config: RunConfig, root: str | Path, policy: Policy | None = None, progress: bool = False
    ) -> None:
        self.config = config
        self.progress = progress
        self.paths = RunPaths(Path(root))
        self.aggregator = make_aggregator(config.fed.aggregator)
        dtype = config.model.dtype
        if dtype == "auto" and self.aggregator.mutates_base:
            dtype = "float32"
        self.policy = policy or Policy(load_base(config.model.name, dtype=dtype))
        self.spec = LoraSpec(
            config.model.lora_rank, config.model.lora_alpha, target_modules=config.model.target_modules
        )
        self.clients = list(config.fed.clients)
        self.base_weights = None
        self.base_original: dict[str, torch.Tensor] = {}
        self.base_delta: dict[str, torch.Tensor] = {}
        self.personal: dict[str, Adapter] = {}
        self.buffers: dict[str, ExperienceBuffer] = {}
        self.state: dict = {}
        self.settings = ClientSettings(
            explore_tasks=config.explore.tasks,
            sampling=Sampling(temperature=config.explore.temperature, max_new_tokens=config.explore.max_new_tokens),
            max_batch=config.explore.max_batch,
            filter=config.explore.filter,
            train=TrainConfig(
                epochs=config.train.epochs,
                lr=config.train.lr,
                batch_tokens=config.train.batch_tokens,
                max_length=config.train.max_length,
                fedprox_mu=config.train.fedprox_mu,
            ),
        )

    # --- setup and resume --------------------------------------------------------------------

    def start(self, resume: bool = False, force: bool = False) -> int:
        """Prepare the run directory; returns the last completed round (0 for a fresh run)."""
        root = self.paths.root
        if resume:
            if not self.paths.state.exists():
                raise FileNotFoundError(f"{root} has no completed round to resume from (no state.json)")
            return self._resume()
        if root.exists() and any(root.iterdir()):
            if not force:
                raise RunExists(f"{root} already exists; use --resume to continue it or --force to overwrite it")
            shutil.rmtree(root)
        root.mkdir(parents=True)
        _write_json(root / "config.json", self.config.model_dump())
        self.global_adapter = self.policy.new_adapter(GLOBAL, self.spec, seed=self.config.fed.seed)
        self._remember_base()
        for client in self.clients:
            buffer = self._buffer(client)
            seeds = exploration_tasks(client, self.config.buffer.expert_seeds, derived_seed("experts", client))
            buffer.add([expert_trajectory(client, i) for i in seeds], round_=0)
        return 0

    def _buffer(self, client: str) -> ExperienceBuffer:
        """The client's buffer, read from disk once per process."""
        if client not in self.buffers:
            c = self.config.buffer
            self.buffers[client] = ExperienceBuffer(self.paths.buffer(client), BufferConfig(c.cap, c.dedup, c.history))
        return self.buffers[client]

    def _remember_base(self) -> None:
        if self.aggregator.mutates_base:
            self.base_weights = module_weights(self.policy)
            self.base_original = {k: w.detach().clone() for k, w in self.base_weights.items()}

    def _apply_base_delta(self, delta: dict[str, torch.Tensor]) -> None:
        """base = original + cumulative delta (recomputed, so a resumed run matches bit for bit)."""
        for module, d in delta.items():
            self.base_delta[module] = self.base_delta.get(module, torch.zeros_like(d, dtype=torch.float64)) + d.double()
            weight = self.base_weights[module]
            total = self.base_original[module].double() + self.base_delta[module].to(weight.device)  # delta on CPU
            weight.data.copy_(total.to(weight.dtype))

    def load_checkpoint(self, round_: int) -> None:
        """Put the policy and server state back to the end of `round_` (adapters, base delta, aggregator)."""
        ckpt = self.paths.checkpoint(round_)
        if not ckpt.exists():
            done = sorted(int(p.name.split("_")[1]) for p in ckpt.parent.glob("round_[0-9][0-9][0-9]"))
            raise UserError(
                f"{self.paths.root} has no checkpoint for round {round_}; completed rounds: {done or 'none'}"
            )
        self.global_adapter = load_adapter(ckpt / GLOBAL)
        self.policy.load(GLOBAL, self.global_adapter)
        self._remember_base()
        if (ckpt / "base_delta.safetensors").exists():
            self._apply_base_delta(load_file(str(ckpt / "base_delta.safetensors")))
        self.state = json.loads((ckpt / "aggregator.json").read_text())
        for client in self.clients:
            if (ckpt / "clients" / client).exists():
                self.personal[client] = load_adapter(ckpt / "clients" / client)

    def _resume(self) -> int:
        last = json.loads(self.paths.state.read_text())["round"]
        self.load_checkpoint(last)
        for client in self.clients:
            self._buffer(client).truncate(last)
        if self.paths.metrics.exists():  # drop the records of the unfinished round
            lines = self.paths.metrics.read_text().splitlines()
            kept = [line for line in lines if json.loads(line)["round"] <= last]
            self.paths.metrics.write_text("".join(line + "\n" for line in kept))
        return last

    # --- the loop ----------------------------------------------------------------------------

    def run(self, resume: bool = False, force: bool = False, echo=print) -> dict:
        last = self.start(resume=resume, force=force)
        if not resume:  # round 0: the starting adapter, evaluated and checkpointed like any round
            seconds = self._evaluate(0)["seconds"]
            self._checkpoint(0)
            echo(round_summary(load_run(self.paths.root), 0, seconds))
        for round_ in range(last + 1, self.config.fed.rounds + 1):
            self.round(round_, echo)
        return json.loads(self.paths.state.read_text()) if self.paths.state.exists() else {}

    def sampled_clients(self, round_: int) -> list[str]:
        k = self.config.fed.clients_per_round
        count = len(self.clients) if k == 1.0 else (round(k * len(self.clients)) if k < 1 else int(k))
        count = max(1, min(len(self.clients), count))
        if count == len(self.clients):
            return list(self.clients)
        return sorted(random.Random(derived_seed(self.config.fed.seed, "sample", round_)).sample(self.clients, count))

    def round(self, round_: int, echo=print) -> None:
        start = time.perf_counter()
        clients = self.sampled_clients(round_)
        explored = self._explore(round_, clients)
        updates, trained = [], {}
        for client in clients:
            update, adapter = learn(
                self.policy,
                client,
                explored[client],
                self._buffer(client),
                round_,
                self.settings,
                self.aggregator,
                seed=self.config.fed.seed,
                progress=self.progress,
            )
            trained[client] = adapter
            updates.append(update)
            record = {"event": "client", "round": round_, "client": client, "num_examples": update.num_examples}
            _append_metrics(self.paths.metrics, {**record, **update.metrics})
        result = aggregate_round(self.aggregator, self.global_adapter, updates, self.state)
        self.global_adapter, self.state = result.aggregation.adapter, result.aggregation.state
        self.policy.load(GLOBAL, self.global_adapter)
        if result.aggregation.base_delta:
            self._apply_base_delta(result.aggregation.base_delta)
        if self.aggregator.personalized:
            self.personal.update(trained)
        _append_metrics(
            self.paths.metrics,
            {
                "event": "aggregate",
                "round": round_,
                "accepted": result.accepted,
                "rejected": result.rejected,
                **result.diagnostics,
            },
        )
        self._evaluate(round_)
        self._checkpoint(round_)
        echo(round_summary(load_run(self.paths.root), round_, time.perf_counter() - start))

    def _explore(self, round_: int, clients: list[str]) -> dict[str, list[Trajectory]]:
        """Every sampled client's exploration, played in one batched rollout.

        Each client's episodes run with its own adapter slot and its own seeds, so each gets
        exactly the trajectories it would get exploring alone (the engine's batch-invariance,
        pinned in tests/test_rollout.py); batching only fills the CPU better.
        """
        requests: dict[str, list[RolloutRequest]] = {}
        for client in clients:
            self.policy.load(client, self.aggregator.client_start(self.global_adapter, self.personal.get(client)))
            requests[client] = exploration_requests(client, client, round_, self.settings, self.config.fed.seed)
        stats = RolloutStats()
        label = f"explore ({len(clients)} clients)" if self.progress else None
        flat = [r for client in clients for r in requests[client]]
        played = rollout(self.policy, flat, max_batch=self.settings.max_batch, stats=stats, progress=label)
        out, i = {}, 0
        for client in clients:
            out[client], i = played[i : i + len(requests[client])], i + len(requests[client])
        _append_metrics(
            self.paths.metrics,
            {
                "event": "explore",
                "round": round_,
                "clients": clients,
                "episodes": stats.episodes,
                "turns": stats.turns,
                "processed_tokens": stats.processed_tokens,
                "generated_tokens": stats.generated_tokens,
                "seconds": stats.seconds,
            },
        )
        return out

    def eval_adapters(self) -> dict[str, str]:
        """env -> name of the loaded adapter to evaluate it with (personalised rules: each client's own)."""
        if not (self.aggregator.personalized and self.personal):
            return dict.fromkeys(self.clients, GLOBAL)
        adapters = {}
        for client in self.clients:
            name = f"eval-{client}"
            self.policy.load(name, self.aggregator.client_start(self.global_adapter, self.personal.get(client)))
            adapters[client] = name
        return adapters

    def _evaluate(self, round_: int) -> dict:
        start = time.perf_counter()
        label = f"eval round {round_}" if self.progress else None
        per_env = evaluate(self.policy, self.config, self.eval_adapters(), progress=label)
        for env_name, figures in per_env.items():
            _append_metrics(self.paths.metrics, {"event": "eval", "round": round_, "env": env_name, **figures})
        summary = averages(per_env)
        summary["seconds"] = time.perf_counter() - start
        _append_metrics(self.paths.metrics, {"event": "eval_avg", "round": round_, **summary})
        return summary

    def evaluate_checkpoint(self, round_: int | None = None) -> tuple[dict, Path]:
        """Evaluate checkpoint `round_` (default: the last completed) with this config's eval settings.

        The result also goes to `evals/round_NNN_tasks_K.json`; metrics.jsonl is left as it was.
        """
        if round_ is None:
            if not self.paths.state.exists():
                raise UserError(f"{self.paths.root} has no completed round yet")
            round_ = json.loads(self.paths.state.read_text())["round"]
        self.load_checkpoint(round_)
        label = f"eval round {round_}" if self.progress else None
        per_env = evaluate(self.policy, self.config, self.eval_adapters(), progress=label)
        result = {"round": round_, "eval": per_env, **averages(per_env)}
        out = self.paths.root / "evals" / f"round_{round_:03d}_tasks_{self.config.eval.tasks or 'all'}.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=1))
        return result, out

    def _checkpoint(self, round_: int) -> None:
        final = self.paths.checkpoint(round_)
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        save_adapter(self.global_adapter, tmp / GLOBAL, base_model=self.config.model.name)
        if self.base_delta:
            save_file({k: v.contiguous() for k, v in self.base_delta.items()}, str(tmp / "base_delta.safetensors"))
        (tmp / "aggregator.json").write_text(json.dumps(self.state))
        for client, adapter in self.personal.items():
            save_adapter(adapter, tmp / "clients" / client)
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _write_json(self.paths.state, {"round": round_, "global_adapter": self.global_adapter.hash})
