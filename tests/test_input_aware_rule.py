"""The regmean rule: the merged update that best reproduces each client's own update on that
client's layer inputs, from the factors and a summary of each client's input second moments."""

import pytest
import torch

from fedse.agent.lora import A_SUFFIX, B_SUFFIX, Adapter, delta_weight, lora_modules
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.evolve.experts import expert_trajectory
from fedse.evolve.sft import input_moments
from fedse.fl.aggregators import RegMeanMerge, make_aggregator, regmean_solve, summarize_moment
from fedse.fl.server import aggregate_round
from fedse.fl.update import Update
from helpers import SMALL, random_adapter, random_factors, random_moments, updates_for


def fresh(seed: int = 0) -> Adapter:
    """A round's starting adapter for a folding rule: random A, B = 0."""
    start = random_factors(seed)
    return Adapter(
        start.spec, {k: v if k.endswith(A_SUFFIX) else torch.zeros_like(v) for k, v in start.tensors.items()}
    )


def produced(rule: RegMeanMerge, current: Adapter, updates: list[Update]) -> dict[str, torch.Tensor]:
    """Module -> the weight change the rule folds into the base this round."""
    aggregation = rule.aggregate(current, updates, {})
    assert not any(t.any() for k, t in aggregation.adapter.tensors.items() if k.endswith(B_SUFFIX))
    return {m: d.double() for m, d in aggregation.base_delta.items()}


def surrogate(update: Update, module: str) -> torch.Tensor:
    """Ĝ_k = F F^T + diag(d) as the server sees client k's summary."""
    top, diag = (update.inputs[module + s].double() for s in (".inputs_top", ".inputs_diag"))
    return top @ top.T + torch.diag(diag)


def test_hand_computed_merges_of_two_one_row_updates():
    # ΔW_1 = [2, 0], ΔW_2 = [0, 4]; RegMean with the exact moments (alpha 1, full rank).
    pairs = [
        (torch.tensor([[2.0]]), torch.tensor([[1.0], [0.0]])),
        (torch.tensor([[4.0]]), torch.tensor([[0.0], [1.0]])),
    ]
    cases = [
        ((torch.diag(torch.tensor([1.0, 0.0])), torch.diag(torch.tensor([0.0, 1.0]))), [2.0, 4.0]),  # apart: the sum
        ((torch.eye(2), torch.eye(2)), [1.0, 2.0]),  # the same inputs: the mean
        ((torch.diag(torch.tensor([3.0, 1.0])), torch.diag(torch.tensor([1.0, 3.0]))), [1.5, 3.0]),  # (6, 12) / 4
    ]
    for moments, want in cases:
        u, v = regmean_solve(pairs, [summarize_moment(g, alpha=1.0, rank=2) for g in moments])
        torch.testing.assert_close(u @ v.T, torch.tensor([want], dtype=torch.float64), atol=1e-6, rtol=0)


@pytest.mark.parametrize("input_rank", [3, 64])  # below the layers' width (Woodbury) and at it (dense)
def test_the_merge_solves_regmeans_normal_equations(input_rank):
    current = random_factors(0)
    rule = RegMeanMerge(input_rank=input_rank)
    updates = updates_for("regmean", current, input_rank=input_rank)
    got = produced(rule, current, updates)
    for m in lora_modules(current.tensors):
        before = delta_weight(current.tensors, m, current.scale)
        moves = [delta_weight(u.tensors, m, current.scale) - before for u in updates]
        grams = [surrogate(u, m) for u in updates]
        want = sum(d @ g for d, g in zip(moves, grams, strict=True)) @ torch.linalg.inv(sum(grams))
        torch.testing.assert_close(got[m] - before, want, atol=1e-5, rtol=1e-5)
        residual = sum((got[m] - before - d) @ g for d, g in zip(moves, grams, strict=True))
        assert float(residual.abs().max()) < 1e-4 * float(want.abs().max())


def test_identical_updates_give_themselves_whatever_each_clients_inputs():
    current = fresh()
    rule = RegMeanMerge(input_rank=3)
    [one] = updates_for("regmean", current, k=1)
    same = [Update(f"c{i}", one.tensors, 5, inputs=rule.summarize_inputs(random_moments(current, i))) for i in range(3)]
    for m, d in produced(rule, current, same).items():
        torch.testing.assert_close(d, delta_weight(one.tensors, m, current.scale), atol=1e-6, rtol=1e-6)


def test_one_client_gives_its_update_and_client_order_does_not_matter():
    current = fresh()
    rule = make_aggregator("regmean", input_rank=5)
    [alone] = updates_for("regmean", current, k=1, input_rank=5)
    for m, d in produced(rule, current, [alone]).items():
        torch.testing.assert_close(d, delta_weight(alone.tensors, m, current.scale), atol=1e-6, rtol=1e-6)
    updates = updates_for("regmean", current, k=3, input_rank=5)
    forward, backward = produced(rule, current, updates), produced(rule, current, updates[::-1])
    for m in forward:
        torch.testing.assert_close(forward[m], backward[m], atol=1e-9, rtol=1e-9)


def test_updates_that_read_only_their_own_clients_inputs_add_up():
    current = fresh()
    rule = RegMeanMerge(input_rank=4)
    halves = [slice(0, 6), slice(6, 12)]  # every layer of MODULES has 12 inputs
    updates = []
    for i, half in enumerate(halves):
        tensors = dict(random_factors(100 + i).tensors)
        for m in lora_modules(tensors):
            outside = torch.ones(12, dtype=torch.bool)
            outside[half] = False
            tensors[m + A_SUFFIX][:, outside] = 0.0
        updates.append(Update(f"c{i}", tensors, 1, inputs=rule.summarize_inputs(random_moments(current, i, half))))
    for m, d in produced(rule, current, updates).items():
        want = sum(delta_weight(u.tensors, m, current.scale) for u in updates)
        torch.testing.assert_close(d, want, atol=1e-6, rtol=1e-6)


def test_the_summary_keeps_the_diagonal_exactly_and_the_moment_at_full_rank():
    moments = random_moments(random_factors(0), 7)
    for g in moments.values():
        shrunk = 0.9 * g + 0.1 * torch.diag(g.diagonal())
        for rank in (2, g.shape[0]):
            top, diag = summarize_moment(g, alpha=0.9, rank=rank)
            assert top.shape == (g.shape[0], rank) and bool((diag >= 0).all())
            approx = top.double() @ top.double().T + torch.diag(diag.double())
            torch.testing.assert_close(approx.diagonal(), shrunk.diagonal(), atol=1e-5, rtol=1e-5)
            if rank == g.shape[0]:
                torch.testing.assert_close(approx, shrunk, atol=1e-5, rtol=1e-5)


def test_updates_without_their_input_summary_or_with_a_broken_one_are_rejected_by_name():
    current = random_factors(0)
    honest, bare, broken = updates_for("regmean", current, k=3)
    bare = Update(bare.client, bare.tensors, 1)
    key = sorted(broken.inputs)[0]
    broken = Update(broken.client, broken.tensors, 1, inputs={**broken.inputs, key: broken.inputs[key][:1]})
    result = aggregate_round(make_aggregator("regmean"), current, [honest, bare, broken], {})
    assert result.accepted == [honest.client]
    assert "missing input summary" in result.rejected[bare.client][0]
    assert f"input summary {key} has shape" in result.rejected[broken.client][0]


def test_a_clients_upload_counts_its_input_summary():
    current = random_factors(0)
    rule = make_aggregator("regmean", input_rank=3)
    [update] = updates_for("regmean", current, k=1, input_rank=3)
    assert rule.bytes_up(current) == update.num_bytes
    assert rule.bytes_up(current) > make_aggregator("subspace").bytes_up(current)


def test_input_moments_are_each_layers_mean_input_outer_product():
    policy = Policy(load_base("tiny-random"))
    random_adapter(policy, "c", seed=1, spec=SMALL)
    episodes = [expert_trajectory("maze", i) for i in range(2)]
    moments = input_moments(policy, "c", episodes, max_length=512)
    seen: dict[str, list[torch.Tensor]] = {}
    with (
        torch.no_grad(),
        policy.watching_inputs(lambda m, x: seen.setdefault(m, []).append(x.reshape(-1, x.shape[-1]))),
    ):
        input_moments(policy, "c", episodes, max_length=512)
    assert set(moments) == set(seen) == set(lora_modules(policy.get("c").tensors))
    for m, g in moments.items():
        rows = torch.cat(seen[m]).double()
        torch.testing.assert_close(g.double(), rows.T @ rows / rows.shape[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(g, g.T)
