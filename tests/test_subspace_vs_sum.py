"""bench/subspace_vs_sum.py: a sum run's rounds split back into the clients' updates and merged
again by the subspace rule, on hand-built updates and on the tiny model."""

from pathlib import Path

import pytest
import torch

from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.errors import UserError
from fedse.experiments.federation import Federation
from helpers import bench_module, tiny_config


def bench():
    return bench_module("subspace_vs_sum")


def stacked(*updates: tuple[torch.Tensor, torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """One layer's folded factors of the sum rule: the updates' factors side by side."""
    return {"layer": (torch.cat([u for u, _ in updates], 1), torch.cat([v for _, v in updates], 1))}


def test_orthogonal_updates_merge_to_their_sum_and_equal_ones_to_their_mean():
    eye = torch.eye(6)
    first, second = (eye[:, :2], eye[:, :2]), (eye[:, 2:4], eye[:, 2:4])
    apart = bench().compare(stacked(first, second), rank=2, scale=1.0)
    assert apart["clients"] == 2 and apart["cosine"] == pytest.approx(0.0, abs=1e-12)
    assert apart["sum_norm"] == pytest.approx(2.0)  # ‖I_4‖_F
    assert apart["elect_ratio"] == pytest.approx(1.0) and apart["elect_gap"] == pytest.approx(0.0, abs=1e-9)
    assert apart["shared_energy"] == pytest.approx(0.0, abs=1e-9)
    same = bench().compare(stacked(first, first), rank=2, scale=1.0)
    assert same["cosine"] == pytest.approx(1.0)
    assert same["elect_ratio"] == pytest.approx(0.5) and same["elect_gap"] == pytest.approx(0.5)
    assert same["plain_ratio"] == pytest.approx(0.5) and same["shared_energy"] == pytest.approx(1.0)
    # λ scales the folded factors; the bench divides it out again
    doubled = bench().compare(stacked((2 * eye[:, :2], eye[:, :2]), (2 * eye[:, 2:4], eye[:, 2:4])), 2, 2.0)
    assert doubled["sum_norm"] == pytest.approx(2.0) and doubled["elect_gap"] == pytest.approx(0.0, abs=1e-9)


def test_opposed_updates_on_one_direction_keep_the_elected_side_where_the_sum_cancels():
    e = torch.eye(4)
    strong, weak = (3 * e[:, :1], e[:, :1]), (-1 * e[:, :1], e[:, :1])
    f = bench().compare(stacked(strong, weak), rank=1, scale=1.0)
    assert f["sum_norm"] == pytest.approx(2.0) and f["cosine"] == pytest.approx(-1.0)
    assert f["elect_ratio"] == pytest.approx(1.5)  # the election drops the minority's −1 the sum cancels with
    assert f["plain_ratio"] == pytest.approx(0.5)  # (3 − 1) / 2: the direction is held by both


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("subspace-vs-sum")
    for rule in ("sum", "subspace"):
        Federation(tiny_config(f"fed.aggregator='{rule}'"), root / rule, Policy(load_base("tiny-random"))).run()
    return root / "sum", root / "subspace"


def test_a_sum_runs_first_round_merged_again_is_what_the_subspace_run_of_that_seed_folded(runs):
    summed, subspace = runs
    module = bench()
    history, rank, scale = module.rounds_of(summed)
    assert len(history) == 2 and rank == 4 and scale == 1.0
    assert module.check(history[0], rank, scale, subspace) < 1e-6
    figures = module.compare(history[1], rank, scale)
    assert figures["clients"] == 2 and figures["sum_norm"] > 0 and 0 < figures["elect_ratio"] < 2
    with pytest.raises(UserError, match="ran the 'subspace' rule; give runs of the 'sum' rule"):
        module.rounds_of(subspace)
