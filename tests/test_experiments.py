"""Experiments: each method is what its definition says, the bootstrap on cases with known
answers, an interrupted grid resumes, and the experiment report is built from the results."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedse.agent.dtype import cpu_model
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.cli import main
from fedse.experiments.config import CENTRAL, ConfigError
from fedse.experiments.experiment_report import SeedResult, clustered_bootstrap, collect, paired_bootstrap
from fedse.experiments.federation import Federation
from fedse.experiments.grid import load_experiment, run_grid
from fedse.experiments.methods import METHODS
from fedse.experiments.store import RunStore
from helpers import TINY, tiny_config


def method_run(tmp_path: Path, name: str, *extra: str) -> Federation:
    fed = Federation(tiny_config(*METHODS[name].overrides, *extra), tmp_path / name, Policy(load_base("tiny-random")))
    fed.run()
    return fed


def records(fed: Federation, event: str) -> list[dict]:
    lines = fed.store.metrics.read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == event]


def test_local_static_never_aggregates_nor_explores_and_evaluates_each_env_with_its_own_adapter(tmp_path):
    fed = method_run(tmp_path, "local-static")
    start = fed.store.load_checkpoint(0).global_adapter
    assert fed.global_adapter.hash == start.hash  # the server never moved
    assert all(r["episodes"] == 0 for r in records(fed, "explore"))
    assert all(r["bytes_up"] == [0, 0] and r["bytes_down"] == 0 for r in records(fed, "aggregate"))
    last = fed.config.fed.rounds
    assert fed.transport.eval_adapters(fed.global_adapter, last) == {"maze": "eval-maze", "wordle": "eval-wordle"}
    own = {c: fed.transport.states[c].personal(last).hash for c in fed.clients}
    assert len(set(own.values())) == 2 and start.hash not in own.values()
    # round 2 starts from each client's own round-1 adapter, not from the (unchanged) global one
    client = records(fed, "client")
    assert [r["train_examples"] for r in client] == [2, 2, 2, 2]


def test_centralized_static_trains_one_adapter_on_every_clients_expert_data(tmp_path):
    fed = method_run(tmp_path, "centralized-static")
    assert fed.clients == [CENTRAL] and fed.envs == ["maze", "wordle"]
    client = records(fed, "client")
    assert {r["client"] for r in client} == {CENTRAL} and client[0]["train_examples"] == 4
    trajectories = [json.loads(line)["trajectory"] for line in fed.store.buffer(CENTRAL).read_text().splitlines()]
    assert sorted({t["env"] for t in trajectories}) == ["maze", "wordle"]
    assert {e["env"] for e in records(fed, "eval")} == {"maze", "wordle"}
    assert fed.transport.eval_adapters(fed.global_adapter, fed.config.fed.rounds) == {
        "maze": "global",
        "wordle": "global",
    }


def test_centralized_online_explores_every_environment_with_the_same_draws_as_their_own_clients(tmp_path):
    central = method_run(tmp_path, "centralized-online", "fed.rounds=1", "explore.filter='none'")
    federated = method_run(tmp_path, "fedse", "fed.rounds=1", "explore.filter='none'")
    assert records(central, "explore")[0]["episodes"] == records(federated, "explore")[0]["episodes"] == 4
    assert records(central, "client")[0]["train_examples"] == 8  # 2+2 experts, 2+2 explored


def test_no_history_trains_each_round_on_that_rounds_trajectories_only(tmp_path):
    fed = method_run(tmp_path, "fedse-no-history", "explore.filter='none'")
    client = [r for r in records(fed, "client") if r["client"] == "maze"]
    assert [r["buffer"] for r in client] == [4, 6]  # the buffer keeps growing ...
    assert [r["train_examples"] for r in client] == [2, 2]  # ... training sees one round of it


def test_no_history_trains_on_the_seeds_in_a_round_before_exploration_starts(tmp_path):
    fed = method_run(tmp_path, "fedse-no-history", "explore.filter='none'", "explore.first_round=2")
    client = [r for r in records(fed, "client") if r["client"] == "maze"]
    assert [r["buffer"] for r in client] == [2, 4]
    assert [r["train_examples"] for r in client] == [2, 2]  # the seeds, then round 2's episodes


def test_pretrained_only_evaluates_the_starting_adapter(tmp_path):
    fed = method_run(tmp_path, "pretrained")
    assert {r["round"] for r in records(fed, "eval")} == {0} and records(fed, "client") == []
    assert json.loads(fed.store.state.read_text())["round"] == 0


def test_every_method_is_a_valid_configuration():
    for m in METHODS.values():
        assert m.definition
        tiny_config(*m.overrides)


def test_the_shipped_presets_load_and_the_committed_results_are_their_own(monkeypatch):
    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)  # the presets' results folder is relative to the repository
    for preset in sorted((root / "configs" / "experiments").glob("table1-*.toml")):
        if preset.stem.endswith("-base"):
            continue
        _, cells = load_experiment(preset)
        assert len(cells) == len({c.root for c in cells}) > 0
        finished = [c for c in cells if c.status() == "done"]
        assert all(c.changes() == [] for c in finished), f"{preset.name}: a committed run is stale"


def one_seed(values: list[float]) -> dict[tuple, float]:
    return {(0, "maze", i): v for i, v in enumerate(values)}


def test_bootstrap_on_cases_with_known_answers():
    assert clustered_bootstrap(one_seed([1.0] * 50)) == (1.0, 1.0, 1.0)
    mean, lo, hi = clustered_bootstrap(one_seed([1.0] * 30 + [0.0] * 70))
    half = 1.96 * (0.3 * 0.7 / 100) ** 0.5  # the normal approximation, 0.0898
    assert (
        mean == pytest.approx(0.3)
        and lo == pytest.approx(0.3 - half, abs=0.02)
        and hi == pytest.approx(0.3 + half, abs=0.02)
    )
    ours = {(s, "maze", t): 1 for s in range(3) for t in range(20)}
    theirs = {k: (1 if k[2] < 10 else 0) for k in ours}  # we win half the units, never lose
    diff, lo, hi, n = paired_bootstrap(ours, {**theirs, (9, "maze", 0): 1})
    assert (diff, n) == (0.5, 60) and 0.35 < lo < 0.5 < hi < 0.65
    same = paired_bootstrap(ours, ours)
    assert same[:3] == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="share no"):
        paired_bootstrap(ours, {("x", "y", 0): 1})


def test_seeds_that_disagree_widen_the_interval_to_what_the_seeds_span():
    """Seed 0 solves every task, seed 1 none: a resample draws {0, 0}, {1, 1} or one of each with
    probabilities 1/4, 1/4, 1/2, so its mean is 1, 0 or about 1/2, and the 2.5th and 97.5th
    percentiles are 0 and 1. Resampling the 200 tasks flat would give about 0.5 ± 0.07."""
    units = {(s, "maze", t): 1.0 - s for s in (0, 1) for t in range(100)}
    assert clustered_bootstrap(units) == (0.5, 0.0, 1.0)
    agreeing = {(s, "maze", t): float(t % 2) for s in range(5) for t in range(40)}  # every seed 0.5
    mean, lo, hi = clustered_bootstrap(agreeing)
    flat = clustered_bootstrap(one_seed(list(agreeing.values())))
    assert mean == 0.5 and lo == pytest.approx(flat[1], abs=0.02) and hi == pytest.approx(flat[2], abs=0.02)
    unequal = {(0, "maze", 0): 1.0, (1, "maze", 0): 0.0, (1, "maze", 1): 0.0, (1, "maze", 2): 0.0}
    assert clustered_bootstrap(unequal)[0] == 0.25  # the point estimate weighs every unit alike


def write_experiment(tmp_path: Path, methods: list[str], seeds: list[int]) -> Path:
    (tmp_path / "base.toml").write_text("")  # the defaults; every run's settings come from `set`
    sets = json.dumps([*TINY, "fed.rounds=1"])
    path = tmp_path / "tiny.toml"
    path.write_text(
        f'name = "tiny"\nbase = "base.toml"\nmethods = {json.dumps(methods)}\nseeds = {seeds}\n'
        f'results = "{tmp_path / "results"}"\nset = {sets}\n'
    )
    return path


def test_an_interrupted_grid_skips_finished_runs_and_resumes_the_rest(tmp_path):
    path = write_experiment(tmp_path, ["pretrained", "fedse"], [0, 1])
    _, cells = load_experiment(path)
    assert [(c.method, c.seed) for c in cells] == [("pretrained", 0), ("fedse", 0), ("pretrained", 1), ("fedse", 1)]
    calls = []

    def run_cell(cell, resume, stop_after_round_0=False):
        calls.append((cell.method, cell.seed, resume))
        fed = Federation(cell.config, cell.root, Policy(load_base("tiny-random")))
        for done in fed.rounds(resume=resume, force=not resume):
            if stop_after_round_0 and cell.method == "fedse" and cell.seed == 0 and done.round == 0:
                raise KeyboardInterrupt  # stopped in the second cell, after its round 0

    with pytest.raises(KeyboardInterrupt):
        run_grid(cells, lambda cell, resume: run_cell(cell, resume, stop_after_round_0=True), echo=lambda _: None)
    assert [c.status() for c in cells] == ["done", "partial", "absent", "absent"]
    # the table holds finished runs only: the partial one's round-0 score would count as its result
    partial = collect(cells[1].root.parents[1], {"pretrained": [0, 1], "fedse": [0, 1]})
    assert {m: [r.seed for r in rs] for m, rs in partial.items()} == {"pretrained": [0]}
    calls.clear()
    counts = run_grid(cells, run_cell, echo=lambda _: None)
    assert counts == {"skipped": 1, "resumed": 1, "started": 2}
    assert calls == [("fedse", 0, True), ("pretrained", 1, False), ("fedse", 1, False)]
    assert all(c.status() == "done" for c in cells)
    # an edited experiment does not keep finished runs it did not make
    edited = path.read_text().replace('"fed.rounds=1"', '"fed.rounds=1", "train.lr=0.01"')
    path.write_text(edited)
    _, changed = load_experiment(path)
    with pytest.raises(ConfigError, match=r"4 finished run\(s\).*train\.lr.*delete those folders"):
        run_grid(changed, run_cell, echo=lambda _: None)


def test_the_experiment_command_runs_the_grid_and_rebuilds_its_report_from_the_results(tmp_path, capsys):
    path = write_experiment(tmp_path, ["pretrained", "fedse", "local-static"], [0, 1])
    assert main(["experiment", str(path)]) == 0
    root = tmp_path / "results" / "tiny"
    report = (root / "report.md").read_text()
    assert "| pretrained | 2 | global |" in report and "| fedse | 2 | global |" in report
    assert "| local-static | 2 | personal |" in report  # each environment evaluated with its own client's adapter
    paired = report.split("| method | fedse − method |")[1].split("Exploration:")[0]
    assert "| local-static | +0.0 |" in paired and "| pretrained | " in paired and "| fedse |" not in paired
    explored = report.split("| method | successes / explored |")[1].split("Cost per run")[0]
    assert "| pretrained | – |" in explored and "| local-static | – |" in explored
    tally: dict[int, list[int]] = {}
    for seed in (0, 1):
        for r in map(json.loads, (root / "fedse" / f"seed{seed}" / "metrics.jsonl").read_text().splitlines()):
            if r["event"] == "client" and r["explored"]:
                t = tally.setdefault(r["round"], [0, 0])
                t[0], t[1] = t[0] + round(r["explore_success"] * r["explored"]), t[1] + r["explored"]
    assert tally and f"| fedse | {' · '.join(f'r{k} {a}/{b}' for k, (a, b) in sorted(tally.items()))} |" in explored
    assert (root / "curves.png").stat().st_size > 0
    assert {"config.json", "metrics.jsonl", "state.json"} <= {p.name for p in (root / "fedse" / "seed1").iterdir()}
    first = capsys.readouterr().out
    assert "6 started" in first
    (root / "report.md").unlink()
    assert main(["experiment", str(path), "--report-only"]) == 0
    assert (root / "report.md").read_text() == report
    # each run says where it ran, and the report says it per method
    sitting = RunStore(root / "fedse" / "seed0").sittings()
    assert [(s["cpu"], s["resumed"]) for s in sitting] == [(cpu_model(), False)]
    assert f"| {cpu_model()} ({sitting[0]['dtype']}) ×2 |" in report.split("Cost per run")[1]
    assert RunStore(root / "fedse" / "seed0").foreign_entries() == []  # --force may still replace the run
    (root / "fedse" / "seed0" / "machine.jsonl").unlink()
    assert main(["experiment", str(path), "--report-only"]) == 0
    assert f"| not recorded ×1; {cpu_model()} ({sitting[0]['dtype']}) ×1 |" in (root / "report.md").read_text()
    assert main(["experiment", str(path)]) == 0 and "6 skipped" in capsys.readouterr().out
    eval_record = next(
        r
        for r in map(json.loads, (root / "fedse" / "seed0" / "metrics.jsonl").read_text().splitlines())
        if r["event"] == "eval"
    )
    assert len(eval_record["task_ids"]) == len(eval_record["task_successes"]) == eval_record["tasks"]
    assert torch.tensor(eval_record["task_successes"]).sum().item() == eval_record["successes"]


def test_an_unknown_method_is_a_one_line_error(tmp_path, capsys):
    path = write_experiment(tmp_path, ["fedse", "fedavgm"], [0])
    assert main(["experiment", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "methods" in err


def test_a_run_with_server_momentum_resumes_to_the_uninterrupted_run(tmp_path):
    straight = method_run(tmp_path, "fedse-fedadam", "fed.rounds=3")
    crashed = Federation(
        tiny_config(*METHODS["fedse-fedadam"].overrides, "fed.rounds=2"),
        tmp_path / "crashed",
        Policy(load_base("tiny-random")),
    )
    crashed.run()
    assert (crashed.store.checkpoint(2) / "server_state.safetensors").exists()
    resumed = Federation(
        tiny_config(*METHODS["fedse-fedadam"].overrides, "fed.rounds=3"),
        tmp_path / "crashed",
        Policy(load_base("tiny-random")),
    )
    resumed.run(resume=True, change_config=True)
    assert resumed.global_adapter.hash == straight.global_adapter.hash
    moments = straight.server.optimizer
    assert moments and all(torch.equal(moments[k], resumed.server.optimizer[k]) for k in moments)


def test_several_clients_per_environment_hold_disjoint_partitions_of_its_train_split(tmp_path):
    from fedse.envs import make_env

    fed = Federation(
        tiny_config("fed.clients_per_env=3", "fed.clients=['maze']", "fed.rounds=1", "explore.filter='none'"),
        tmp_path / "shards",
        Policy(load_base("tiny-random")),
    )
    fed.run()
    assert fed.clients == ["maze-0", "maze-1", "maze-2"]
    tasks = {}
    for client in fed.clients:
        lines = fed.store.buffer(client).read_text().splitlines()
        tasks[client] = {json.loads(line)["trajectory"]["task_id"] for line in lines}
        assert len(lines) == 4  # 2 expert seeds + 2 explored
    train = list(make_env("maze").splits["train"])
    for i, client in enumerate(fed.clients):
        assert tasks[client] <= set(train[i::3])
    assert {e["env"] for e in records(fed, "eval")} == {"maze"}
    with pytest.raises(Exception, match="clients_per_env > 1 needs one shared adapter"):
        tiny_config("fed.clients_per_env=2", "fed.aggregator='fedsa'")


def test_a_runs_cost_counts_the_input_summaries_an_input_aware_rule_asks_of_its_clients(tmp_path):
    fed = method_run(tmp_path, "fedse-regmean")
    client = records(fed, "client")
    inputs = sum(r["inputs_seconds"] for r in client)
    assert inputs > 0
    seconds = inputs + sum(r["train_seconds"] for r in client)
    seconds += sum(r["seconds"] for r in records(fed, "explore") + records(fed, "eval_avg"))
    assert SeedResult.of("fedse-regmean", 0, fed.store.root).cost()["minutes"] == pytest.approx(seconds / 60)


def test_methods_may_run_more_seeds_and_the_report_pairs_the_named_references(tmp_path):
    path = write_experiment(tmp_path, ["pretrained", "fedse", "fedse-subspace"], [0])
    text = path.read_text().replace('"fed.rounds=1"]', '"fed.rounds=1", "eval.first=false"]')
    path.write_text(text + 'reference = "fedse-subspace"\n[seeds_for]\npretrained = [0]\nfedse-subspace = [0, 1]\n')
    _, cells = load_experiment(path)
    assert [(c.method, c.seed) for c in cells] == [
        ("pretrained", 0),
        ("fedse", 0),
        ("fedse-subspace", 0),
        ("fedse-subspace", 1),
    ]
    assert cells[0].config.eval.first and not cells[1].config.eval.first  # round 0 evaluated once
    assert main(["experiment", str(path)]) == 0
    root = tmp_path / "results" / "tiny"
    fedse_evals = {
        r["round"]
        for r in map(json.loads, (root / "fedse" / "seed0" / "metrics.jsonl").read_text().splitlines())
        if r["event"] == "eval"
    }
    assert fedse_evals == {1}
    report = (root / "report.md").read_text()
    assert "| fedse-subspace | 2 |" in report
    paired = report.split("| method | fedse-subspace − method |")[1].split("Exploration:")[0]
    assert "| fedse | " in paired and "| pretrained | " in paired and "| fedse-subspace |" not in paired
    seen = report.split("| method | updates |")[1].split("Cost per run")[0]
    assert "| fedse | cosine " in seen and "shared energy" not in seen.split("| fedse-subspace |")[0]
    assert "| fedse-subspace | cosine " in seen and "; shared energy " in seen and "; from the sum " in seen
    assert "| pretrained |" not in seen  # no server step to describe
    both = path.read_text().replace('reference = "fedse-subspace"', 'reference = ["fedse-subspace", "fedse"]')
    path.write_text(both)
    assert main(["experiment", str(path), "--report-only"]) == 0
    report = (root / "report.md").read_text()
    assert "| method | fedse-subspace − method |" in report and "| method | fedse − method |" in report
    bad = path.read_text().replace('reference = ["fedse-subspace", "fedse"]', 'reference = "local-online"')
    path.write_text(bad)
    with pytest.raises(ConfigError, match="reference 'local-online' is not one of the experiment's methods"):
        load_experiment(path)
