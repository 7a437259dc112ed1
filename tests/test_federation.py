"""End to end on the tiny random model: rounds, every aggregator, metrics, checkpoints and resume."""

import json

import pytest
import torch

from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.experiments.config import ConfigError, load_config
from fedse.experiments.federation import Federation
from fedse.experiments.report import round_summary
from fedse.experiments.store import RunExists
from fedse.fl import server
from helpers import tiny_config


def run(tmp_path, *extra, name="run"):
    fed = Federation(tiny_config(*extra), tmp_path / name, Policy(load_base("tiny-random")))
    fed.run()
    return fed


@pytest.mark.parametrize("aggregator", ["fedse", "fedit", "ffa", "fedsa", "flora", "fedex"])
def test_two_rounds_two_clients_write_the_expected_records(tmp_path, aggregator):
    fed = run(tmp_path, f"fed.aggregator='{aggregator}'")
    records = [json.loads(line) for line in fed.store.metrics.read_text().splitlines()]
    events = [(r["event"], r["round"], r.get("client") or r.get("env")) for r in records]
    per_round = lambda r: [("eval", r, "maze"), ("eval", r, "wordle"), ("eval_avg", r, None)]  # noqa: E731
    assert events == [
        *per_round(0),
        ("explore", 1, None), ("client", 1, "maze"), ("client", 1, "wordle"), ("aggregate", 1, None), *per_round(1),
        ("explore", 2, None), ("client", 2, "maze"), ("client", 2, "wordle"), ("aggregate", 2, None), *per_round(2),
    ]  # fmt: skip
    client = next(r for r in records if r["event"] == "client")
    assert client["buffer"] >= 2 and client["explored"] == 2 and client["train_tokens"] > 0
    assert json.loads(fed.store.state.read_text())["round"] == 2
    assert (fed.store.checkpoint(2) / "global" / "adapter_model.safetensors").exists()


def test_resume_after_a_crash_equals_the_uninterrupted_run(tmp_path, monkeypatch):
    straight = run(tmp_path, "fed.aggregator='fedex'", name="straight")
    real = server.aggregate_round
    calls = {"n": 0}

    def crash_in_round_two(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed mid-round")
        return real(*args, **kwargs)

    monkeypatch.setattr("fedse.experiments.federation.aggregate_round", crash_in_round_two)
    crashed = Federation(tiny_config("fed.aggregator='fedex'"), tmp_path / "crashed", Policy(load_base("tiny-random")))
    with pytest.raises(KeyboardInterrupt):
        crashed.run()
    assert json.loads(crashed.store.state.read_text())["round"] == 1
    monkeypatch.setattr("fedse.experiments.federation.aggregate_round", real)
    resumed = Federation(tiny_config("fed.aggregator='fedex'"), tmp_path / "crashed", Policy(load_base("tiny-random")))
    resumed.run(resume=True)
    assert resumed.global_adapter.hash == straight.global_adapter.hash
    for module, delta in straight.base_delta.items():
        assert torch.equal(resumed.base_delta[module], delta)

    def figures(run):  # every record but wall-clock times (client records hold several)
        records = [r for r in map(json.loads, run.store.metrics.read_text().splitlines()) if r["event"] != "client"]
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert figures(resumed) == figures(straight)


@pytest.mark.parametrize("aggregator", ["fedse", "regmean"])
def test_only_adapter_tensors_scalar_metrics_and_a_rules_input_summary_reach_the_server(
    tmp_path, monkeypatch, aggregator
):
    seen = []
    real = server.aggregate_round

    def spy(aggregator, current, updates, *args, **kwargs):
        seen.extend(updates)
        return real(aggregator, current, updates, *args, **kwargs)

    monkeypatch.setattr("fedse.experiments.federation.aggregate_round", spy)
    fed = run(tmp_path, "fed.rounds=1", f"fed.aggregator='{aggregator}'")
    adapter_keys = set(fed.global_adapter.tensors)
    assert len(seen) == 2
    for update in seen:
        assert set(vars(update)) == {"client", "tensors", "num_examples", "metrics", "inputs", "members"}
        assert update.members == ()  # one client's own update (a SecAgg+ mean names its clients there)
        assert set(update.tensors) <= adapter_keys and all(isinstance(t, torch.Tensor) for t in update.tensors.values())
        assert all(isinstance(v, int | float) and not isinstance(v, bool) for v in update.metrics.values())
        # a rule that reads inputs gets its per-layer summary of them (floats, in x p and in), nothing else
        assert set(update.inputs) == set(fed.aggregator.expected_inputs(fed.global_adapter))
        assert all(t.dtype == torch.float32 for t in update.inputs.values())
        assert bool(update.inputs) == (aggregator == "regmean")


def test_an_existing_run_is_never_overwritten_without_force(tmp_path):
    run(tmp_path, "fed.rounds=1")
    again = Federation(tiny_config("fed.rounds=1"), tmp_path / "run", Policy(load_base("tiny-random")))
    with pytest.raises(RunExists, match="use --resume to continue it or --force to overwrite it"):
        again.run()


def test_config_errors_name_the_key_and_the_choices():
    with pytest.raises(ConfigError, match="unknown key 'fed.round'; allowed: clients, rounds, aggregator"):
        load_config(None, ["fed.round=3"])
    with pytest.raises(ConfigError, match="bad value for 'fed.aggregator': Value error, must be one of: fedse, fedit"):
        load_config(None, ["fed.aggregator=fedavg"])
    with pytest.raises(ConfigError, match="bad value for 'train.lr'"):
        load_config(None, ["train.lr=-1"])
    with pytest.raises(ConfigError, match="server_lr must be 1.0 and server_optimizer sgd with flora"):
        load_config(None, ["fed.aggregator=flora", "fed.server_lr=5"])
    with pytest.raises(ConfigError, match="bad value for 'fed.server_lr'"):
        load_config(None, ["fed.server_lr=inf"])
    assert load_config(None, ["fed.rounds=3"]).fed.rounds == 3


def test_each_round_prints_a_summary_and_round_zero_is_checkpointed(tmp_path):
    fed = Federation(tiny_config("fed.rounds=1"), tmp_path / "run", Policy(load_base("tiny-random")))
    printed = [round_summary(records, 1, "fedse") for records in fed.rounds()]
    assert [p.splitlines()[0].split(" (")[0] for p in printed] == ["── round 0/1", "── round 1/1"]
    assert "Avg (task-weighted) " in printed[1] and "updates accepted" in printed[1]
    assert (fed.store.checkpoint(0) / "global" / "adapter_model.safetensors").exists()


def test_eval_of_a_checkpoint_reproduces_the_recorded_evaluation(tmp_path, capsys):
    from fedse.cli import main

    fed = run(tmp_path, "fed.aggregator='fedsa'", "fed.rounds=1")
    recorded = {
        r["env"]: r
        for r in map(json.loads, fed.store.metrics.read_text().splitlines())
        if r["event"] == "eval" and r["round"] == 1
    }
    assert main(["eval", str(fed.store.root), "--round", "1"]) == 0
    again = json.loads((fed.store.root / "evals" / "round_001_tasks_2.json").read_text())
    assert {env: {k: r[k] for k in ("successes", "reward")} for env, r in again["eval"].items()} == {
        env: {k: r[k] for k in ("successes", "reward")} for env, r in recorded.items()
    }
    assert main(["eval", str(fed.store.root), "--round", "7"]) == 2
    assert "no checkpoint for round 7; completed rounds: [0, 1]" in capsys.readouterr().err


@pytest.mark.parametrize("aggregator", ["fedse", "fedsa"])
def test_batched_exploration_equals_each_client_exploring_alone(tmp_path, aggregator):
    """The embedded runtime plays all clients' episodes in one rollout; each client must get what it would alone."""
    from fedse.agent.rollout import rollout
    from fedse.fl.client import exploration_requests

    fed = Federation(
        tiny_config(f"fed.aggregator='{aggregator}'", "explore.temperature=1.0"),
        tmp_path / "run",
        Policy(load_base("tiny-random")),
    )
    fed.run()  # two rounds, so fedsa clients hold different personal adapters
    together, _ = fed.transport.explore(3, fed.clients, fed.global_adapter)
    for client in fed.clients:
        fed.policy.load(
            client, fed.aggregator.client_start(fed.global_adapter, fed.transport.states[client].personal(2))
        )
        alone = rollout(fed.policy, exploration_requests(client, client, 3, fed.config.explore, fed.config.fed.seed))
        assert [t.messages for t in alone] == [t.messages for t in together[client]]
        assert [t.adapter for t in alone] == [t.adapter for t in together[client]]


def test_rounds_before_first_round_train_on_the_seeds_and_eval_every_skips_rounds(tmp_path):
    fed = run(tmp_path, "explore.first_round=2", "fed.server_lr=2.0", "fed.rounds=3", "eval.every=2")
    records = [json.loads(line) for line in fed.store.metrics.read_text().splitlines()]
    explores = {r["round"]: r["episodes"] for r in records if r["event"] == "explore"}
    assert explores == {1: 0, 2: 4, 3: 4}
    assert [r["round"] for r in records if r["event"] == "eval_avg"] == [0, 2, 3]  # the last round always
    first = [r for r in records if r["event"] == "client" and r["round"] == 1]
    assert [(r["explored"], r["buffer"], r["train_examples"]) for r in first] == [(0, 2, 2), (0, 2, 2)]
    assert "explore: none this round" in round_summary(fed.store.load().round(1), 3, "fedse")
    from fedse.experiments.report import render_markdown

    table = next(line for line in render_markdown([fed.store.load()], []).splitlines() if line.startswith("| 1 |"))
    assert "| – |" in table  # round 1 is in the table without an evaluation


@pytest.mark.parametrize("name", ["..", ".", "/tmp/x", "../x", "a/b", ".hidden", "x.", ""])
def test_a_run_name_is_a_plain_folder_name_never_a_path(name):
    from fedse.experiments.config import check_run_name

    with pytest.raises(ConfigError, match="must be a plain folder name"):
        check_run_name(name)
    with pytest.raises(ConfigError, match="bad value for 'name'"):
        load_config(None, [f"name={name!r}"])


def test_force_never_deletes_a_folder_that_is_not_only_a_run(tmp_path):
    from fedse.experiments.store import RunStore

    project = tmp_path / "project"
    project.mkdir()
    (project / "notes.txt").write_text("mine")
    with pytest.raises(RunExists, match="is not a folder fedse created"):
        RunStore(project).create({}, force=True)
    assert (project / "notes.txt").read_text() == "mine"
    fed = run(tmp_path, "fed.rounds=1")
    (fed.store.root / "my-analysis.ipynb").write_text("{}")
    with pytest.raises(RunExists, match="my-analysis.ipynb"):
        RunStore(fed.store.root).create({}, force=True)
    (fed.store.root / "my-analysis.ipynb").unlink()
    RunStore(fed.store.root).create({"name": "again"}, force=True)  # a run and only a run: replaced
    assert sorted(p.name for p in fed.store.root.iterdir()) == [".fedse-run", ".lock", "config.json"]


def test_force_replaces_only_a_folder_fedse_marked_and_never_follows_a_link(tmp_path):
    from fedse.experiments.store import RunStore

    lookalike = tmp_path / "other-project"  # a run's layout, but not a run fedse made
    for name in ("checkpoints", "clients"):
        (lookalike / name).mkdir(parents=True)
    (lookalike / "config.json").write_text("{}")
    (lookalike / "report.md").write_text("their report")
    with pytest.raises(RunExists, match="has no .fedse-run"):
        RunStore(lookalike).create({}, force=True)
    assert (lookalike / "report.md").read_text() == "their report"
    fed = run(tmp_path, "fed.rounds=0")
    target = tmp_path / "precious"
    target.mkdir()
    (target / "data.txt").write_text("keep")
    linked_run = tmp_path / "linked-run"
    linked_run.symlink_to(target)
    with pytest.raises(RunExists, match="is a symbolic link"):
        RunStore(linked_run).create({}, force=True)
    (fed.store.root / "checkpoints-link").symlink_to(target)
    with pytest.raises(RunExists, match="holds symbolic links"):
        RunStore(fed.store.root).create({}, force=True)
    assert (target / "data.txt").read_text() == "keep"


def test_a_round_with_every_update_rejected_keeps_the_global_and_the_run_and_report_go_on(tmp_path, monkeypatch):
    from fedse.experiments.report import write_report
    from fedse.fl.update import Update

    real = __import__("fedse.fl.client", fromlist=["learn"]).learn

    def poisoned(*args, **kwargs):
        update, trained = real(*args, **kwargs)
        return Update(
            update.client, {k: v * float("nan") for k, v in update.tensors.items()}, 1, update.metrics
        ), trained

    monkeypatch.setattr("fedse.experiments.transport.learn", poisoned)
    fed = run(tmp_path, "fed.rounds=1")
    records = [json.loads(line) for line in fed.store.metrics.read_text().splitlines()]
    aggregate = next(r for r in records if r["event"] == "aggregate")
    assert aggregate["accepted"] == [] and set(aggregate["rejected"]) == {"maze", "wordle"}
    start = fed.store.load_checkpoint(0).global_adapter
    assert fed.global_adapter.hash == start.hash
    assert "| 1 |" in write_report([fed.store.root]).read_text()
    with pytest.raises(ConfigError, match="bad value for 'train.lr'"):
        load_config(None, ["train.lr=inf"])


def test_torn_last_lines_are_dropped_and_resume_appends_whole_lines(tmp_path):
    fed = run(tmp_path, "fed.rounds=1")
    for path in (fed.store.metrics, fed.store.buffer("maze")):
        with path.open("a") as f:
            f.write('{"event": "eval", "round": 2, "env": "ma')  # a kill mid-append
    records = len(fed.store.records())
    again = Federation(tiny_config("fed.rounds=2"), fed.store.root, Policy(load_base("tiny-random")))
    again.run(resume=True, change_config=True)
    for path in (fed.store.metrics, fed.store.buffer("maze")):
        text = path.read_text()
        assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())
    assert len(again.store.records()) > records


def test_corrupt_run_files_are_one_line_errors_not_tracebacks(tmp_path):
    from fedse.errors import UserError
    from fedse.experiments.store import RunStore

    fed = run(tmp_path, "fed.rounds=1")
    store = RunStore(fed.store.root)
    state = fed.store.state.read_text()
    fed.store.state.write_text('{"round": "1"}')
    with pytest.raises(UserError, match="state.json is corrupt"):
        store.last_round()
    fed.store.state.write_text(state)
    weights = fed.store.checkpoint(1) / "global" / "adapter_model.safetensors"
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(weights))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[0] += 1.0
    save_file(tensors, str(weights))
    with pytest.raises(UserError, match="does not match the hash state.json recorded for round 1"):
        store.load_checkpoint(1)
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(UserError, match="cannot be read"):
        store.load_checkpoint(1)
    from fedse.evolve.buffer import ExperienceBuffer

    fed.store.buffer("maze").write_text("not json\n")
    with pytest.raises(UserError, match="buffer.jsonl:1: not a buffer entry"):
        ExperienceBuffer(fed.store.buffer("maze"))
    fed.store.buffer("maze").write_bytes(b'{"round": 0, "x": "\xff"}\n')
    with pytest.raises(UserError, match="not UTF-8 text at byte 19"):
        ExperienceBuffer(fed.store.buffer("maze"))


def test_a_second_process_on_the_same_run_is_refused(tmp_path):
    from fedse.errors import UserError

    fed = run(tmp_path, "fed.rounds=1")
    other = Federation(tiny_config("fed.rounds=2"), fed.store.root, Policy(load_base("tiny-random")))
    with fed.store.lock():
        for kwargs in ({"resume": True, "change_config": True}, {"force": True}, {}):
            with pytest.raises(UserError, match="in use by another fedse process"):
                other.run(**kwargs)
        assert json.loads(fed.store.state.read_text())["round"] == 1 and fed.store.checkpoint(1).exists()
    other.run(resume=True, change_config=True)  # the lock is free again
    assert json.loads(fed.store.state.read_text())["round"] == 2


@pytest.mark.parametrize(
    ("aggregator", "corrupt"),
    [
        ("fedex", "checkpoints/round_001/base_delta.safetensors"),
        ("fedex", "checkpoints/round_001/global/adapter_config.json"),
        ("fedse", "checkpoints/round_001/aggregator.json"),
        ("fedsa", "clients/maze/personal/round_001/adapter_model.safetensors"),
    ],
)
def test_eval_refuses_a_checkpoint_that_differs_from_what_was_saved(tmp_path, capsys, aggregator, corrupt):
    from fedse.cli import main

    fed = run(tmp_path, f"fed.aggregator='{aggregator}'")  # two rounds: round 1 is not the last
    path = fed.store.root / corrupt
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["eval", str(fed.store.root), "--round", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and corrupt in err and "differs from what round 1's checkpoint recorded" in err
    assert main(["eval", str(fed.store.root)]) == 0  # round 2 is intact
