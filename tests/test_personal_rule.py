"""The personal rule (personal adapters on a shared base) on hand-built adapters: each client's
model is W_0 + P_k + (λ/N) Σ_j P_j, with P_k = s B_k A_k its own adapter's product."""

import itertools

import pytest
import torch

from fedse.agent.lora import A_SUFFIX, B_SUFFIX, Adapter, LoraSpec, fresh_adapter
from fedse.experiments.config import ConfigError
from fedse.experiments.store import Checkpoint, RunStore
from fedse.fl.aggregators import AGGREGATORS, HELD, PersonalOnSharedBase, densify, held_adapters
from fedse.fl.privacy import dp_refusal
from fedse.fl.server import ServerState, aggregate_round, fold
from fedse.fl.update import Update
from helpers import tiny_config

SPEC = LoraSpec(rank=1, alpha=1)  # s = 1: P_k = B_k A_k
MODULE = "base_model.model.model.layers.0.mlp.up_proj"
OUT, IN = 4, 3


def adapter(b: list[float], a: list[float]) -> dict[str, torch.Tensor]:
    """Rank-1 factors with P = b a^T."""
    return {MODULE + B_SUFFIX: torch.tensor(b).reshape(OUT, 1), MODULE + A_SUFFIX: torch.tensor(a).reshape(1, IN)}


def product(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return tensors[MODULE + B_SUFFIX].double() @ tensors[MODULE + A_SUFFIX].double()


INITIAL = Adapter(SPEC, adapter([0, 0, 0, 0], [1, 1, 1]))  # B = 0: every client starts here
P1 = adapter([1, 0, 0, 0], [1, 0, 0])
P2 = adapter([0, 2, 0, 0], [0, 1, 0])
P3 = adapter([0, 0, 3, 0], [1, 1, 0])


def step(rule, state: ServerState, uploads: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
    """One round with `uploads` (client -> adapter); returns the cumulative base delta."""
    updates = [Update(c, t, 1) for c, t in uploads.items()]
    state.apply(aggregate_round(rule, state.adapter, updates, state.aggregator))
    return state.base_delta[MODULE].double()


def test_the_base_moves_by_lambda_times_the_mean_and_the_global_adapter_stays():
    rule, state = PersonalOnSharedBase(scale=0.5), ServerState(INITIAL)
    base = step(rule, state, {"a": P1, "b": P2, "c": P3})
    torch.testing.assert_close(base, 0.5 / 3 * (product(P1) + product(P2) + product(P3)), atol=1e-6, rtol=0)
    assert state.adapter is INITIAL
    assert set(held_adapters(state.aggregator)) == {"a", "b", "c"}
    # client a's model: its own adapter at 1 + λ/N, each other client's at λ/N
    model_a = base + product(P1)
    torch.testing.assert_close(model_a, (1 + 0.5 / 3) * product(P1) + 0.5 / 3 * (product(P2) + product(P3)))


def test_a_later_round_replaces_a_clients_part_and_an_absent_client_keeps_its_own():
    rule, state = PersonalOnSharedBase(), ServerState(INITIAL)
    step(rule, state, {"a": P1, "b": P2, "c": P3})
    new_a = adapter([1, 1, 0, 0], [0, 0, 2])
    base = step(rule, state, {"a": new_a, "c": P3})  # b is absent: its last adapter stays in the mean
    torch.testing.assert_close(base, (product(new_a) + product(P2) + product(P3)) / 3, atol=1e-6, rtol=0)
    # the round folded only the change, a's new product minus its old one (c's is unchanged)
    last = state.folded[-1][MODULE]
    torch.testing.assert_close(
        last[0].double() @ last[1].double().T, (product(new_a) - product(P1)) / 3, atol=1e-6, rtol=0
    )


def test_a_client_joining_rescales_the_mean_over_everyone_heard_from():
    rule, state = PersonalOnSharedBase(), ServerState(INITIAL)
    step(rule, state, {"a": P1, "b": P2})
    torch.testing.assert_close(state.base_delta[MODULE].double(), (product(P1) + product(P2)) / 2, atol=1e-6, rtol=0)
    base = step(rule, state, {"c": P3})
    torch.testing.assert_close(base, (product(P1) + product(P2) + product(P3)) / 3, atol=1e-6, rtol=0)


def test_identical_adapters_give_every_client_one_plus_lambda_times_it():
    rule, state = PersonalOnSharedBase(scale=2.0), ServerState(INITIAL)
    base = step(rule, state, {"a": P2, "b": P2, "c": P2})
    torch.testing.assert_close(base + product(P2), 3.0 * product(P2), atol=1e-6, rtol=0)


def test_one_client_gives_its_adapter_with_the_base_moved_by_lambda_times_it():
    rule, state = PersonalOnSharedBase(scale=0.25), ServerState(INITIAL)
    torch.testing.assert_close(step(rule, state, {"a": P3}), 0.25 * product(P3), atol=1e-6, rtol=0)


def test_client_order_does_not_matter():
    bases = []
    for order in itertools.permutations([("a", P1), ("b", P2), ("c", P3)]):
        state = ServerState(INITIAL)
        step(PersonalOnSharedBase(), state, dict(order))
        bases.append(step(PersonalOnSharedBase(), state, dict(reversed(order[:2]))))
    for other in bases[1:]:
        torch.testing.assert_close(other, bases[0], atol=1e-6, rtol=0)


def test_only_factors_are_folded_and_they_rebuild_the_base_exactly():
    rule, state = PersonalOnSharedBase(), ServerState(INITIAL)
    step(rule, state, {"a": P1, "b": P2, "c": P3})
    step(rule, state, {"a": P2, "b": P3, "c": P1})
    for factors in state.folded:  # new and old adapters of K = 3 clients of rank 1: at most 2·K·r
        u, v = factors[MODULE]
        assert u.shape == (OUT, u.shape[1]) and v.shape == (IN, u.shape[1]) and u.shape[1] <= 6
    assert torch.equal(fold(state.folded)[MODULE], state.base_delta[MODULE])
    assert rule.bytes_down(INITIAL, 3) == 2 * 3 * SPEC.rank * (OUT + IN) * 4


def test_the_held_adapters_survive_a_checkpoint_bit_for_bit(tmp_path):
    rule, state = PersonalOnSharedBase(), ServerState(INITIAL)
    step(rule, state, {"a": P1, "b": P2})
    store = RunStore(tmp_path)
    store.save_checkpoint(1, Checkpoint(INITIAL, state.base_delta, state.aggregator, folded=state.folded), "tiny")
    assert "held/" not in (store.checkpoint(1) / "aggregator.json").read_text()
    loaded = store.load_checkpoint(1).aggregator_state
    assert set(loaded) == set(state.aggregator)
    for key, tensor in state.aggregator.items():
        assert torch.equal(loaded[key], tensor), key
    # a resumed server folds the next round exactly as the uninterrupted one
    resumed = ServerState(INITIAL, dict(state.base_delta), loaded, folded=list(state.folded))
    assert torch.equal(step(rule, resumed, {"a": P3}), step(rule, state, {"a": P3}))


def test_the_scale_must_be_positive():
    with pytest.raises(ValueError, match="scale must be positive"):
        PersonalOnSharedBase(scale=0.0)


def test_a_fresh_adapters_upload_leaves_the_base_where_it_was():
    """A client that trained nothing (B = 0) adds nothing to the shared part."""
    rule, state = PersonalOnSharedBase(), ServerState(INITIAL)
    silent = fresh_adapter(INITIAL, seed=3).tensors
    assert not step(rule, state, {"a": silent}).any()
    assert all(k.startswith(HELD) for k in state.aggregator if k != "round")
    assert not densify(state.folded[-1])[MODULE].any()


def test_local_dp_is_refused_because_the_upload_carries_the_clients_kept_adapter():
    """Local DP clips one round's move from the adapter a client started from; under this rule that
    start is the client's own, never released, so the clip would not bound the upload."""
    reason = dp_refusal(AGGREGATORS["personal"], "local")
    assert reason is not None and "kept adapter" in reason
    with pytest.raises(ConfigError, match="privacy.dp = 'local' with fed.aggregator = 'personal'"):
        tiny_config("fed.aggregator='personal'", "privacy.dp='local'")
