"""bench/merge_cost.py: a finished run's last round replayed, each client's own adapter against the
merged model, on the tiny model."""

import json
import shutil
from pathlib import Path

import pytest

from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.errors import UserError
from fedse.experiments.federation import Federation
from fedse.files import file_digest
from helpers import bench_module, tiny_config


def merge_cost():
    return bench_module("merge_cost")


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def regmean_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("merge-cost") / "run"
    Federation(tiny_config("fed.aggregator='regmean'"), root, Policy(load_base("tiny-random"))).run()
    return root


def test_the_replayed_last_round_is_the_runs_and_leaves_the_run_untouched(regmean_run, tmp_path):
    before = digests(regmean_run)
    bench = merge_cost()
    result = bench.measure(regmean_run, tmp_path / "scratch", train_tasks=3)
    assert digests(regmean_run) == before
    assert result["reproduced"] and result["trained_as_recorded"] and result["round"] == 2
    assert result["client_of"] == {"maze": "maze", "wordle": "wordle"}
    for model in ("own", "merged"):
        assert sorted(e["env"] for e in result[model]["test"]) == ["maze", "wordle"]
        assert all(e["tasks"] == 2 for e in result[model]["test"])
        assert all(e["tasks"] == 3 for e in result[model]["train"])
    # the merge changed each client's model: its round data scores differently under the two
    assert all(result["own"]["nll"][c] != result["merged"]["nll"][c] for c in ("maze", "wordle"))
    text = bench.table(result)
    assert "reproduced: every client" in text and text.count("| maze |") == 4


def test_a_replay_that_trains_differently_from_the_record_is_flagged(regmean_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(regmean_run, run)
    metrics = run / "metrics.jsonl"
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    for record in lines:
        if record["event"] == "client" and record["round"] == 2:
            record["train_loss"] += 1.0
    metrics.write_text("".join(json.dumps(r) + "\n" for r in lines))
    result = merge_cost().measure(run, tmp_path / "scratch", train_tasks=1, envs=["maze"])
    assert not result["reproduced"] and not result["trained_as_recorded"]
    assert result["client_of"] == {"maze": "maze"} and [e["env"] for e in result["merged"]["test"]] == ["maze"]
    assert "NOT reproduced" in merge_cost().table(result)


def test_a_run_without_its_second_last_checkpoint_is_refused_in_one_line(regmean_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(regmean_run, run)
    shutil.rmtree(run / "checkpoints" / "round_001")
    with pytest.raises(UserError, match=r"lacks round 1's checkpoint .* checkpoints.keep_last = 2"):
        merge_cost().measure(run, tmp_path / "scratch", train_tasks=1)
    with pytest.raises(UserError, match=r"--envs 'webshop' is not an environment of"):
        merge_cost().measure(regmean_run, tmp_path / "scratch", train_tasks=1, envs=["webshop"])
    assert not (tmp_path / "scratch").exists()
