"""How much of a client's private trajectories leaks through what it sends: canary exposure and
membership inference (`fedse.experiments.leakage`), without DP and under central DP at each σ.

    .venv/bin/python bench/privacy.py configs/demo.toml --out runs/privacy-demo \
        --result results/privacy-demo.json --sigmas 0.25 1.0
    .venv/bin/python bench/privacy.py --tiny --out /tmp/privacy          # the tiny model: a smoke run

**Canaries**: `--canaries` expert demonstrations of the planting client's environment (`--client`,
default the first) on train tasks it is not seeded with get "The access code is NNNNNN." (a
random six-digit secret each) at the start of their first agent turn, and reach that client as
seed demonstrations (`buffer.seed_file`): it trains on them every round, like the rest of its
buffer. After the run each secret is ranked among `--candidates` random ones under the base model,
the final global adapter (what every client, and anyone it is released to, holds) and the
planting client's last upload (what the server receives from it; under central DP the server
sees it before the noise).

**Membership**: the planting client's expert seeds (trained on every round) against as many expert
demonstrations of other train tasks of its environment, under the global adapter; the base
model's AUC on the same sets is the reference (the tasks may differ before any training).

Runs: DP off, then `[privacy] dp = "central"` with clip C = the median norm of the clients' round
updates in the run without DP (a train-side figure) and each σ of `--sigmas`; ε from the run's
own accountant; test Avg from the run's last evaluation. Run folders are kept under `--out`, and a
finished one is not run again. Each run's figures are added to its `metrics.jsonl` as a `leakage`
record, so its report.md (rewritten) gains a leakage section. Writes the figures of all runs as
JSON (`--result`, default `<out>/privacy.json`) and the table beside it (.md).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

from safetensors.torch import load_file, save_file

from fedse.agent.lora import Adapter
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.evolve.agenttraj import write_agenttraj
from fedse.evolve.experts import expert_trajectory
from fedse.experiments.config import RunConfig, load_config
from fedse.experiments.federation import Federation
from fedse.experiments.leakage import exposure, membership_auc, plant
from fedse.experiments.records import LeakageRecord
from fedse.experiments.report import write_report
from fedse.experiments.store import RunStore
from fedse.experiments.transport import InProcessTransport
from fedse.fl.client import expert_seeds, exploration_tasks
from fedse.fl.update import Update, update_norm
from fedse.process import set_up_process
from fedse.seeds import derived_seed

TINY = [
    "model.name='tiny-random'", "model.lora_rank=4", "model.lora_alpha=8", "fed.clients=['maze', 'wordle']",
    "fed.rounds=2", "explore.tasks=2", "explore.max_new_tokens=6", "buffer.expert_seeds=4", "eval.tasks=2",
    "eval.max_new_tokens=6", "train.max_length=512",
]  # fmt: skip
PROBE = "probe"


class RecordingTransport:
    """The embedded transport, keeping the last update `client` sent (the bench reads it later)."""

    def __init__(self, inner: InProcessTransport, client: str) -> None:
        self.inner, self.client = inner, client
        self.last: Update | None = None
        self.norms: list[float] = []
        """Every client's round update norm ‖θ_k − θ‖_F (factor space, as DP clips it)."""

    def prepare(self) -> None:
        self.inner.prepare()

    def start(self, resume, last, recorded) -> None:
        self.inner.start(resume, last, recorded)

    def train(self, round_, clients, server):
        explore, updates, records = self.inner.train(round_, clients, server)
        current = server.adapter.tensors
        self.norms += [update_norm(u, current) for u in updates]
        self.last = next((u for u in updates if u.client == self.client), self.last)
        return explore, updates, records

    def evaluate(self, round_, server):
        return self.inner.evaluate(round_, server)

    def kept(self, round_):
        return self.inner.kept(round_)


def run_once(config: RunConfig, root: Path, client: str) -> dict:
    """Run (or reuse) the federation in `root`, on a model of its own; its test Avg, ε, update
    norms and `client`'s last upload."""
    saved = root / "bench-own-update.safetensors"
    if not (saved.exists() and (root / "bench-norms.json").exists()):
        recording = {}

        def transport(store, policy_, rule):
            recording["t"] = RecordingTransport(InProcessTransport(config, store, policy_, rule), client)
            return recording["t"]

        resume = RunStore(root).last_round() is not None if root.exists() else False  # an interrupted run goes on
        Federation(config, root, transport=transport).run(resume=resume, force=root.exists() and not resume)
        t = recording["t"]
        save_file({k: v.contiguous() for k, v in t.last.tensors.items()}, str(saved))
        (root / "bench-norms.json").write_text(json.dumps(t.norms))
    records = RunStore(root).load()
    spent = [a.privacy for a in records.aggregate if a.privacy]
    return {
        "avg": records.eval_avg[-1].avg_weighted,
        "epsilon": spent[-1]["epsilon"] if spent else math.inf,
        "norms": json.loads((root / "bench-norms.json").read_text()),
        "own": load_file(str(saved)),
    }


def measure(policy: Policy, run: dict, root: Path, canaries, members, others, candidates) -> dict:
    """`score`, kept in the run folder so that a bench run again does not score a finished run again."""
    kept = root / "bench-measure.json"
    key = {"canaries": [s for _, s in canaries], "candidates": candidates, "members": len(members)}
    if kept.exists() and json.loads(kept.read_text()).get("key") == key:
        return json.loads(kept.read_text())["measure"]
    measured = score(policy, run, root, canaries, members, others, candidates)
    kept.write_text(json.dumps({"key": key, "measure": measured}) + "\n")
    return measured


def score(policy: Policy, run: dict, root: Path, canaries, members, others, candidates) -> dict:
    store = RunStore(root)
    checkpoint = store.load_checkpoint(store.last_round())
    if checkpoint.base_delta or checkpoint.folded:
        raise SystemExit(
            "bench/privacy.py scores adapters only: use a rule that keeps the base model (fedse, ffa, ...)"
        )
    global_adapter = checkpoint.global_adapter
    own = Adapter(global_adapter.spec, {**global_adapter.tensors, **run["own"]})
    out = {"avg": run["avg"], "epsilon": run["epsilon"]}
    for label, adapter in (("global", global_adapter), ("own", own)):
        policy.load(PROBE, adapter)
        out[label] = [exposure(policy, PROBE, t, s, candidates[i]) for i, (t, s) in enumerate(canaries)]
    policy.load(PROBE, global_adapter)
    out["auc"] = membership_auc(policy, PROBE, members, others)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", help="the federation's TOML (e.g. configs/demo.toml)")
    parser.add_argument("--tiny", action="store_true", help="the tiny random model, two rounds: a smoke run")
    parser.add_argument("--out", required=True, help="folder for the runs (and privacy.json unless --result)")
    parser.add_argument("--result", help="where to write the figures (JSON; a .md beside it holds the table)")
    parser.add_argument("--client", help="the client whose seeds carry the canaries (default: the first)")
    parser.add_argument("--canaries", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=200)
    parser.add_argument("--sigmas", type=float, nargs="*", default=[0.25, 1.0])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    set_up_process()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base = load_config(None if args.tiny else args.config, TINY if args.tiny else [])
    client = args.client or base.fed.clients[0]
    rng = random.Random(derived_seed("privacy-bench", args.seed))
    secrets = [f"{rng.randrange(10**6):06d}" for _ in range(args.canaries)]
    candidates = [[f"{rng.randrange(10**6):06d}" for _ in range(args.candidates)] for _ in secrets]
    n_seeds = base.buffer.expert_seeds if base.buffer.expert_seeds is not None else 8
    members = expert_seeds(client, [client], n_seeds)
    taken = {t.task_id for t in members}
    hosts = [i for i in exploration_tasks(client, 4 * n_seeds + args.canaries, derived_seed("canary-hosts", client))
             if i not in taken]  # fmt: skip
    canaries = plant([expert_trajectory(client, i) for i in hosts[: args.canaries]], secrets)
    others = [expert_trajectory(client, i) for i in hosts[args.canaries : args.canaries + len(members)]]
    seed_file = out / "canaries.json"
    write_agenttraj(canaries, seed_file)
    policy = Policy(load_base(base.model.name, dtype=base.base_dtype()))
    planted_pairs = list(zip(canaries, secrets))
    reference = {
        "exposure": [exposure(policy, None, t, s, candidates[i]) for i, (t, s) in enumerate(planted_pairs)],
        "auc": membership_auc(policy, None, members, others),
    }
    planted = [*(TINY if args.tiny else []), f"buffer.seed_file='{seed_file.resolve()}'"]
    rows = {}

    def run_and_score(name: str, root: Path, overrides: list[str]) -> dict:
        run = run_once(load_config(None if args.tiny else args.config, overrides), root, client)
        rows[name] = measure(policy, run, root, planted_pairs, members, others, candidates)
        record_leakage(root, client, rows[name], reference, args.candidates, len(members))
        return run

    clip = statistics.median(run_and_score("dp off", out / "dp-off", planted)["norms"])
    for sigma in args.sigmas:
        dp = ["privacy.dp='central'", f"privacy.clip={clip:.6g}", f"privacy.noise_multiplier={sigma:g}"]
        run_and_score(f"central σ={sigma:g}", out / f"central-sigma{sigma:g}", [*planted, *dp])
    result = {"client": client, "clip": clip, "canaries": args.canaries, "candidates": args.candidates,
              "base": reference["exposure"], "base_auc": reference["auc"], "runs": rows}  # fmt: skip
    result["config"] = "tiny" if args.tiny else args.config
    result["machine"] = machine(out / "dp-off")
    path = Path(args.result) if args.result else out / "privacy.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    path.with_suffix(".md").write_text(table(result) + "\n")
    print(table(result))


def record_leakage(root: Path, client: str, measured: dict, reference: dict, candidates: int, members: int) -> None:
    """Add the run's leakage to its metrics (once) and rewrite its report, which then has the section."""
    store = RunStore(root)

    def bits(items: list[dict], key: str) -> list[float]:
        return [x[key] for x in items]

    models = {"base": reference["exposure"], "global": measured["global"], "own": measured["own"]}
    record = LeakageRecord(
        store.last_round(),
        client=client,
        candidates=candidates,
        exposure={m: bits(v, "exposure") for m, v in models.items()},
        exposure_fit={m: bits(v, "exposure_fit") for m, v in models.items()},
        membership_auc={"base": reference["auc"], "global": measured["auc"]},
        members=members,
    )
    if record not in store.load().leakage:
        store.append(record)
    write_report([root])


def machine(root: Path) -> dict:
    """The machine the run in `root` recorded first (CPU, threads, dtype, torch)."""
    return json.loads((root / "machine.jsonl").read_text().splitlines()[0])


def table(result: dict) -> str:
    def mean(items, key):
        return statistics.fmean(x[key] for x in items)

    cap = math.log2(result["candidates"] + 1)
    m = result.get("machine", {})
    lines = [
        f"Canaries in client {result['client']}'s seeds: {result['canaries']}, each ranked among "
        f"{result['candidates']} random secrets (rank exposure at most {cap:.2f} bits); clip C = {result['clip']:.4g}. "
        f"Config {result['config']}; {m.get('cpu', '?')}, {m.get('threads', '?')} threads, {m.get('dtype', '?')}.",
        "",
        "| run | ε (δ = 1e-5) | test Avg | exposure, global | exposure (fit), global | exposure, own upload | "
        "exposure (fit), own upload | membership AUC |",
        "|---|---|---|---|---|---|---|---|",
        f"| base model | – | – | {mean(result['base'], 'exposure'):.2f} | {mean(result['base'], 'exposure_fit'):.2f} | – | – | {result['base_auc']:.3f} |",
    ]
    for name, r in result["runs"].items():
        eps = "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:.2f}"
        lines.append(
            f"| {name} | {eps} | {r['avg']:.1%} | {mean(r['global'], 'exposure'):.2f} | "
            f"{mean(r['global'], 'exposure_fit'):.2f} | {mean(r['own'], 'exposure'):.2f} | "
            f"{mean(r['own'], 'exposure_fit'):.2f} | {r['auc']:.3f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
