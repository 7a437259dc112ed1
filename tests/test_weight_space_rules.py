"""The weight-space rules (sum, subspace) on hand-built updates whose merge can be worked out on
paper: axis-aligned factors, so every direction is e_i e_j^T and each client's share is 0 or 1."""

import itertools

import pytest
import torch

from fedse.agent.lora import A_SUFFIX, B_SUFFIX, Adapter, LoraSpec, load_adapter, save_adapter
from fedse.fl.aggregators import SubspaceMerge, WeightSum, core_space, make_aggregator, subspace_merge
from fedse.fl.server import ServerState, aggregate_round, fold, folded_tensors, tensors_folded
from fedse.fl.update import Update
from helpers import random_factors, updates_for

SPEC = LoraSpec(rank=2, alpha=2)  # s = 1: ΔW_k = B_k A_k
MODULE = "base_model.model.model.layers.0.mlp.up_proj"
OUT, IN = 8, 6


def e(i: int, n: int) -> torch.Tensor:
    v = torch.zeros(n)
    v[i] = 1.0
    return v


def client(terms: list[tuple[float, int, int]]) -> dict[str, torch.Tensor]:
    """Factors of ΔW = Σ c · e_i e_j^T over `terms` (c, i, j), padded with zero columns to rank 2."""
    b, a = torch.zeros(OUT, SPEC.rank), torch.zeros(SPEC.rank, IN)
    for col, (c, i, j) in enumerate(terms):
        b[:, col], a[col] = c * e(i, OUT), e(j, IN)
    return {MODULE + A_SUFFIX: a, MODULE + B_SUFFIX: b}


def dense(terms: list[tuple[float, int, int]]) -> torch.Tensor:
    out = torch.zeros(OUT, IN, dtype=torch.float64)
    for c, i, j in terms:
        out[i, j] += c
    return out


def start() -> Adapter:
    """A global adapter with B = 0, as every round of a folding rule starts."""
    return Adapter(
        SPEC, {MODULE + A_SUFFIX: torch.randn(SPEC.rank, IN), MODULE + B_SUFFIX: torch.zeros(OUT, SPEC.rank)}
    )


def merged(rule, clients: list[list[tuple[float, int, int]]]) -> torch.Tensor:
    updates = [Update(f"c{i}", client(t), 1) for i, t in enumerate(clients)]
    result = aggregate_round(rule, start(), updates, {})
    assert not result.aggregation.adapter.tensors[MODULE + B_SUFFIX].any()  # every round starts fresh
    return result.aggregation.base_delta[MODULE].double()


def test_orthogonal_updates_pass_at_full_strength():
    clients = [[(2.0, 0, 0), (-1.0, 1, 1)], [(3.0, 2, 2)], [(0.5, 3, 3), (4.0, 4, 4)]]
    total = sum(dense(t) for t in clients)
    for rule in (SubspaceMerge(), WeightSum()):
        torch.testing.assert_close(merged(rule, clients), total, atol=1e-6, rtol=0)


def test_updates_orthogonal_on_one_side_only_are_summed_too():
    # the same output direction read from different inputs: no input of one reaches the other's update
    clients = [[(2.0, 0, 0)], [(3.0, 0, 1)]]
    torch.testing.assert_close(merged(SubspaceMerge(), clients), dense([(2.0, 0, 0), (3.0, 0, 1)]), atol=1e-6, rtol=0)


def test_identical_updates_give_that_update_and_the_sum_gives_k_times_it():
    terms = [(2.0, 0, 1), (-0.5, 3, 2)]
    torch.testing.assert_close(merged(SubspaceMerge(), [terms] * 3), dense(terms), atol=1e-6, rtol=0)
    torch.testing.assert_close(merged(WeightSum(), [terms] * 3), 3 * dense(terms), atol=1e-6, rtol=0)
    torch.testing.assert_close(merged(WeightSum(scale=1 / 3), [terms] * 3), dense(terms), atol=1e-6, rtol=0)


def test_a_shared_direction_is_averaged_and_private_ones_kept():
    # every client writes e0 e0^T (2, 4, 6: averaged to 4) and one direction of its own
    clients = [[(2.0, 0, 0), (1.0, 1, 1)], [(4.0, 0, 0), (-2.0, 2, 2)], [(6.0, 0, 0), (6.0, 3, 3)]]
    want = dense([(4.0, 0, 0), (1.0, 1, 1), (-2.0, 2, 2), (6.0, 3, 3)])
    torch.testing.assert_close(merged(SubspaceMerge(), clients), want, atol=1e-6, rtol=0)
    # the third client's two singular values are equal: its SVD basis is arbitrary, the merge is not


def test_a_direction_two_of_three_clients_share_is_averaged_over_two():
    clients = [[(3.0, 0, 0)], [(5.0, 0, 0), (1.0, 1, 2)], [(7.0, 4, 4)]]
    want = dense([(4.0, 0, 0), (1.0, 1, 2), (7.0, 4, 4)])
    torch.testing.assert_close(merged(SubspaceMerge(), clients), want, atol=1e-6, rtol=0)


def test_a_client_opposing_the_shared_sign_is_left_out_of_the_consensus():
    clients = [[(3.0, 0, 0), (1.0, 1, 1)], [(-1.0, 0, 0), (2.0, 2, 2)]]
    elected = dense([(3.0, 0, 0), (1.0, 1, 1), (2.0, 2, 2)])  # 3 kept alone: the only one along 3 - 1
    averaged = dense([(1.0, 0, 0), (1.0, 1, 1), (2.0, 2, 2)])  # (3 - 1) / 2
    torch.testing.assert_close(merged(SubspaceMerge(), clients), elected, atol=1e-6, rtol=0)
    torch.testing.assert_close(merged(SubspaceMerge(elect=False), clients), averaged, atol=1e-6, rtol=0)


def test_opposite_updates_cancel():
    clients = [[(2.0, 0, 0)], [(-2.0, 0, 0)]]
    assert merged(SubspaceMerge(), clients).abs().max() < 1e-9


def random_update(seed: int, rank: int = 3, out: int = 20, inp: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(out, rank, generator=gen, dtype=torch.float64), torch.randn(
        inp, rank, generator=gen, dtype=torch.float64
    )


def test_client_order_does_not_matter():
    shared = random_update(99, rank=1)
    pairs = [random_update(s) for s in range(4)]
    pairs = [(torch.cat([u, 2 * shared[0]], 1), torch.cat([v, shared[1]], 1)) for u, v in pairs]  # one shared part

    def merge(order):
        q_u, q_v, cores = core_space([pairs[i] for i in order])
        return q_u @ subspace_merge(cores)[0] @ q_v.T

    first = merge(range(4))
    for order in itertools.permutations(range(4)):
        torch.testing.assert_close(merge(order), first, atol=1e-9, rtol=0)


def test_the_merge_is_bounded_by_the_clients_update_norms():
    for seed in range(5):
        pairs = [random_update(10 * seed + k, rank=2, out=6, inp=5) for k in range(4)]  # overlapping spaces
        q_u, q_v, cores = core_space(pairs)
        for elect in (True, False):
            out = q_u @ subspace_merge(cores, elect)[0] @ q_v.T
            bound = sum(float((u @ v.T).norm()) for u, v in pairs)
            assert float(out.norm()) <= bound * (1 + 1e-9)


def test_a_rank_budget_truncates_and_records_the_dropped_energy():
    clients = [[(2.0, 0, 0)], [(2.0, 1, 1)], [(1.0, 2, 2)]]  # energies 4, 4, 1
    updates = [Update(f"c{i}", client(t), 1) for i, t in enumerate(clients)]
    result = aggregate_round(SubspaceMerge(rank=2), start(), updates, {})
    assert result.diagnostics["merge"]["dropped_energy"] == pytest.approx(1 / 9)
    torch.testing.assert_close(
        result.aggregation.base_delta[MODULE].double(), dense([(2.0, 0, 0), (2.0, 1, 1)]), atol=1e-6, rtol=0
    )
    exact = aggregate_round(SubspaceMerge(), start(), updates, {})
    assert exact.diagnostics["merge"]["dropped_energy"] == pytest.approx(0.0, abs=1e-12)
    assert exact.diagnostics["merge"]["shared_energy"] == pytest.approx(0.0, abs=1e-9)
    assert SubspaceMerge(rank=2).bytes_down(start(), 3) == 2 * (OUT + IN) * 4
    assert SubspaceMerge().bytes_down(start(), 3) == 3 * SPEC.rank * (OUT + IN) * 4


def test_the_merge_records_how_far_it_lies_from_the_plain_sum():
    def against_sum(clients, elect=True):
        updates = [Update(f"c{i}", client(t), 1) for i, t in enumerate(clients)]
        merge = aggregate_round(SubspaceMerge(elect=elect), start(), updates, {}).diagnostics["merge"]
        return merge["from_sum"], merge["size_vs_sum"]

    assert against_sum([[(2.0, 0, 0)], [(3.0, 1, 1)]]) == pytest.approx((0.0, 1.0), abs=1e-9)  # nothing shared
    # three identical updates: the merge is one of them, the sum three: 2/3 of the sum away, 1/3 its size
    assert against_sum([[(2.0, 0, 0)]] * 3) == pytest.approx((2 / 3, 1 / 3))
    # one direction, opposite signs (+2, -1): the sum is +1; the election keeps +2 alone, at full
    # strength (a whole sum away, twice its size); without it the two average to +0.5
    assert against_sum([[(2.0, 0, 0)], [(-1.0, 0, 0)]]) == pytest.approx((1.0, 2.0))
    assert against_sum([[(2.0, 0, 0)], [(-1.0, 0, 0)]], elect=False) == pytest.approx((0.5, 0.5))


def test_a_nonzero_global_adapter_is_kept_under_the_merge():
    current = Adapter(SPEC, client([(1.0, 5, 5)]))
    b = current.tensors[MODULE + B_SUFFIX]
    moved = [client([(1.0, 5, 5), (2.0, 0, 0)]), client([(1.0, 5, 5), (3.0, 1, 1)])]  # each keeps BA, adds its own
    updates = [Update(f"c{i}", t, 1) for i, t in enumerate(moved)]
    result = aggregate_round(SubspaceMerge(), current, updates, {})
    torch.testing.assert_close(
        result.aggregation.base_delta[MODULE].double(),
        dense([(1.0, 5, 5), (2.0, 0, 0), (3.0, 1, 1)]),
        atol=1e-6,
        rtol=0,
    )
    assert b.any()


def test_merged_factors_load_in_peft_as_an_adapter_of_the_declared_rank(tmp_path):
    from peft import PeftModel

    from fedse.agent.tiny import tiny_model

    base = tiny_model(256)
    modules = {
        n: m for n, m in base.named_modules() if isinstance(m, torch.nn.Linear) and n.endswith(("q_proj", "up_proj"))
    }
    spec = LoraSpec(rank=2, alpha=4, target_modules=("q_proj", "up_proj"))
    gen = torch.Generator().manual_seed(0)
    like = {}
    for name, m in modules.items():
        like[f"base_model.model.{name}" + A_SUFFIX] = torch.zeros(2, m.in_features)
        like[f"base_model.model.{name}" + B_SUFFIX] = torch.zeros(m.out_features, 2)
    current = Adapter(spec, like)
    updates = []
    for k in range(3):
        t = {n: torch.randn(v.shape, generator=gen) * 0.1 for n, v in like.items()}
        updates.append(Update(f"c{k}", t, 1))
    rule = SubspaceMerge(rank=4)
    factors, _ = rule.merged_factors(current, updates)
    adapter = rule.as_adapter(current, factors)
    assert adapter.spec.rank == 4
    save_adapter(adapter, tmp_path / "merged")
    model = PeftModel.from_pretrained(tiny_model(256), str(tmp_path / "merged"))
    for name in modules:
        layer = model.get_submodule(f"base_model.model.{name}")
        got = layer.get_delta_weight("default").double()
        u, v = factors[f"base_model.model.{name}"]
        torch.testing.assert_close(got, u.double() @ v.double().T, atol=1e-5, rtol=1e-5)
    assert load_adapter(tmp_path / "merged").spec.rank == 4


@pytest.mark.parametrize("name", ["sum", "subspace", "regmean"])
def test_declared_properties_of_the_weight_space_rules(name):
    rule = make_aggregator(name)
    assert rule.exact and rule.mutates_base and not rule.linear and not rule.personalized and not rule.robust
    assert rule.uploads == "AB"
    with pytest.raises(ValueError):
        make_aggregator(name, scale=-1.0, rank=-1, input_rank=0, alpha=2.0)


def test_a_client_that_did_not_move_changes_nothing():
    torch.testing.assert_close(merged(SubspaceMerge(), [[(2.0, 0, 0)], []]), dense([(2.0, 0, 0)]), atol=1e-6, rtol=0)
    assert merged(SubspaceMerge(), [[], []]).abs().max() == 0


@pytest.mark.parametrize("name", ["sum", "subspace", "regmean"])
def test_every_rounds_factors_fold_to_the_servers_dense_total_bit_for_bit(name):

    current = random_factors(0)
    state = ServerState(current)
    for round_ in range(3):
        updates = updates_for(name, state.adapter)
        for u in updates:  # a different update each round
            u.tensors.update({k: v * (1 + round_) for k, v in u.tensors.items()})
        state.apply(aggregate_round(make_aggregator(name), state.adapter, updates, state.aggregator))
    assert len(state.folded) == 3
    rebuilt = fold(tensors_folded(folded_tensors(state.folded)))  # through the wire's naming too
    assert rebuilt.keys() == state.base_delta.keys()
    assert all(torch.equal(rebuilt[m], state.base_delta[m]) for m in rebuilt)
    fedex = ServerState(current)
    fedex.apply(aggregate_round(make_aggregator("fedex"), current, updates_for("fedex", current), {}))
    assert fedex.folded is None and fedex.base_delta  # a dense-only rule: the total travels densely


@pytest.mark.parametrize("name", ["flora", "sum", "subspace", "regmean"])
def test_the_restart_adapter_depends_on_the_run_seed_and_the_round(name):
    current = random_factors(0)
    updates = updates_for(name, current)

    def restart_a(seed: int, state: dict) -> torch.Tensor:
        tensors = aggregate_round(make_aggregator(name, seed=seed), current, updates, state).aggregation.adapter.tensors
        assert not any(v.any() for k, v in tensors.items() if k.endswith(B_SUFFIX))
        return torch.cat([v.flatten() for k, v in sorted(tensors.items()) if k.endswith(A_SUFFIX)])

    first = restart_a(1, {})
    assert torch.equal(first, restart_a(1, {}))  # a resumed run restarts from the same factors
    assert not torch.equal(first, restart_a(2, {}))  # another seed from others
    assert not torch.equal(first, restart_a(1, {"round": 1}))  # and every round from new ones
    assert not torch.equal(restart_a(0, {"round": 1}), restart_a(1, {}))
