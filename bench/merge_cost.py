"""What the last merge costs each client: its own trained adapter against the merged model.

    .venv/bin/python bench/merge_cost.py results/table1-cpu-v2/fedse-regmean/seed4 \\
        --out results/bench/merge-cost-regmean-seed4.md

A finished run's last round R is played again from the checkpoint of round R − 1, in a scratch
copy of the run (the run itself is not touched): the clients explore and train exactly as they
did, and then, before the server's step, each client's own trained model (what it would deploy
if it kept its round to itself) is played on its own environment; after the step, the merged
model on every environment. Both are played greedy on

- the environment's test tasks, as the run's evaluation plays them; the merged model's outcomes
  must equal the ones the run recorded, which checks that the round was reproduced;
- `--train-tasks` tasks spread over the train split: where the client's data comes from, so a
  loss here is the merge's, not a generalization gap;

and each client's data of round R is scored (mean NLL per agent token) under the model the round
started from, its own and the merged one. A merge that costs a client shows as the merged model
below that client's own adapter on its own train tasks and data; one that does not, with a test
gap nonetheless, points at generalization or at test-set noise.

The run needs round R − 1's checkpoint and its clients' buffers (keep them with
`checkpoints.keep_last`, or run before pruning). Writes a markdown table (and a JSON of the
figures next to it) headed by the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict
from datetime import date
from pathlib import Path

from fedse.agent.dtype import cpu_model
from fedse.errors import UserError
from fedse.evolve.sft import mean_loss
from fedse.experiments.config import RunConfig, validate_config
from fedse.experiments.evaluation import evaluate
from fedse.experiments.federation import Federation
from fedse.experiments.records import EvalRecord
from fedse.experiments.report import wilson
from fedse.experiments.store import GLOBAL, RunStore
from fedse.process import set_up_process


def scratch_copy(run: Path, scratch: Path, keep_round: int) -> None:
    """The run folder without the checkpoints of rounds other than `keep_round` (replacing `scratch`)."""
    shutil.rmtree(scratch, ignore_errors=True)
    wanted = f"round_{keep_round:03d}"

    def skip(folder: str, names: list[str]) -> list[str]:
        if Path(folder).name in ("checkpoints", "personal"):
            return [n for n in names if n.startswith("round_") and n != wanted]
        return [n for n in names if n in (".lock", "evals")]

    shutil.copytree(run, scratch, ignore=skip)


def play(fed: Federation, adapters: dict[str, str], round_: int, tasks: int | None, split: str) -> list[EvalRecord]:
    ev = fed.config.eval
    return evaluate(
        fed.policy, adapters, round_, tasks=tasks, max_new_tokens=ev.max_new_tokens,
        max_batch=fed.config.eval_batch(), backends=fed.config.env, split=split,
    )  # fmt: skip


def measure(run: Path, scratch: Path, train_tasks: int, envs: list[str] | None = None) -> dict:
    """The figures of the module docstring, as a dict (per env of `envs`, default all: "own" and
    "merged" test and train outcomes; per client: each model's NLL on its round data); raises
    UserError on a run it cannot replay."""
    store = RunStore(run)
    config: RunConfig = validate_config(store.read_config(), where=str(run / "config.json"))
    last = store.last_round()
    if last is None or last < 1:
        raise UserError(f"{run} has no completed round after round 0 to replay; finish a round first")
    if last - 1 not in store.completed_rounds():
        raise UserError(
            f"{run} lacks round {last - 1}'s checkpoint (it has rounds {store.completed_rounds()}): rerun it "
            "with checkpoints.keep_last = 2 (or more) to measure its last merge"
        )
    unknown = sorted(set(envs or []) - set(config.fed.clients))
    if unknown:
        raise UserError(f"--envs {unknown[0]!r} is not an environment of {run} (it has {config.fed.clients})")
    played = envs or list(config.fed.clients)
    recorded = store.load().round(last)
    if not recorded.evals:
        raise UserError(f"{run} did not evaluate round {last}; nothing to check the replay against")
    scratch_copy(run, scratch, last - 1)

    fed = Federation(config, scratch)
    fed.load_checkpoint(last - 1)
    fed.transport.start(True, last - 1, {})
    clients = fed.sampled_clients(last)
    _, updates, client_records = fed.transport.train(last, clients, fed.server)
    env_of = {env: c for c in clients for env in fed.client_envs[c] if env in played}
    data = {c: fed.transport.buffer(c).training_set(last) for c in clients}
    max_length = config.train.max_length

    def nll(slot_of: dict[str, str]) -> dict[str, float]:
        return {c: mean_loss(fed.policy, slot_of[c], data[c], max_length) for c in clients if data[c]}

    own = {  # each client's trained slot, on its own environments
        "test": play(fed, env_of, last, config.eval.tasks, "test"),
        "train": play(fed, env_of, last, train_tasks, "train"),
        "nll": nll({c: c for c in clients}),
    }
    start_nll = nll(dict.fromkeys(clients, GLOBAL))  # the global slot still holds the round's start
    fed.aggregate(last, updates)
    everyone = dict.fromkeys(env_of, GLOBAL)
    merged = {
        "test": play(fed, everyone, last, config.eval.tasks, "test"),
        "train": play(fed, everyone, last, train_tasks, "train"),
        "nll": nll(dict.fromkeys(clients, GLOBAL)),
    }
    was = {e.env: e.task_successes for e in recorded.evals}
    trained_as_recorded = {r.client: r.train_loss for r in recorded.clients} == {
        r.client: r.train_loss for r in client_records
    }
    return {
        "run": str(run),
        "round": last,
        "rule": config.fed.aggregator,
        "reproduced": trained_as_recorded and all(was[e.env] == e.task_successes for e in merged["test"]),
        "trained_as_recorded": trained_as_recorded,
        "client_of": env_of,
        "start_nll": start_nll,
        "own": {k: [asdict(e) for e in v] if k != "nll" else v for k, v in own.items()},
        "merged": {k: [asdict(e) for e in v] if k != "nll" else v for k, v in merged.items()},
    }


def rate(record: dict) -> str:
    low, high = wilson(record["successes"], record["tasks"])
    return f"{record['successes']}/{record['tasks']} [{100 * low:.0f}, {100 * high:.0f}] %"


def loss(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def table(result: dict) -> str:
    """One markdown row per (env, model) and the paired split of the test tasks."""
    verdict = (
        "reproduced: every client trained to its recorded loss, and the merged model plays the test tasks as recorded"
        if result["reproduced"]
        else "NOT reproduced: the figures below are of a different round than the run's"
    )
    lines = [
        f"Round {result['round']} of {result['run']} ({result['rule']}) replayed from round {result['round'] - 1}: "
        f"{verdict}.",
        "",
        "| env | model | test success | train-task success | NLL of the client's round data |",
        "|---|---|---|---|---|",
    ]  # fmt: skip
    for env, client in result["client_of"].items():
        for model in ("own", "merged"):
            test = next(e for e in result[model]["test"] if e["env"] == env)
            train = next(e for e in result[model]["train"] if e["env"] == env)
            nll = result[model]["nll"].get(client)
            label = f"{client}'s own adapter" if model == "own" else "merged"
            lines.append(f"| {env} | {label} | {rate(test)} | {rate(train)} | {loss(nll)} |")
        lines.append(f"| {env} | the round's start | | | {loss(result['start_nll'].get(client))} |")
    lines += ["", "Test tasks solved by one model only (paired):", ""]
    lines += ["| env | own only | merged only | both | neither |", "|---|---|---|---|---|"]
    for env in result["client_of"]:
        own = next(e for e in result["own"]["test"] if e["env"] == env)["task_successes"]
        merged = next(e for e in result["merged"]["test"] if e["env"] == env)["task_successes"]
        pairs = list(zip(own, merged, strict=True))
        lines.append(
            f"| {env} | {pairs.count((1, 0))} | {pairs.count((0, 1))} | {pairs.count((1, 1))} | {pairs.count((0, 0))} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="a finished run folder with its last two checkpoints")
    parser.add_argument("--train-tasks", type=int, default=40, help="train tasks per env (spread over the split)")
    parser.add_argument("--envs", nargs="*", help="environments to play (default: all; every client still trains)")
    parser.add_argument("--scratch", type=Path, help="where the replay runs (default: runs/merge-cost/<run name>)")
    parser.add_argument("--out", type=Path, help="markdown file to write (a .json of the figures goes beside it)")
    args = parser.parse_args()
    set_up_process()
    scratch = args.scratch or Path("runs/merge-cost") / "-".join(args.run.resolve().parts[-2:])
    try:
        result = measure(args.run, scratch, args.train_tasks, args.envs)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = " ".join(["bench/merge_cost.py", *sys.argv[1:]])
    text = f"<!-- .venv/bin/python {command}\n     {cpu_model()}, {date.today()} -->\n\n" + table(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
