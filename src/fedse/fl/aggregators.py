"""LoRA aggregation rules: one small class per algorithm, each stating its rule and properties.

Notation: client k returns LoRA factors A_k (r x in) and B_k (out x r) for every adapted
linear layer; its weight update is ΔW_k = s · B_k A_k with s = alpha / r. An aggregator is
*exact* when the new global model equals base + mean_k ΔW_k; *linear* when the server only
needs sums of what clients upload (so secure aggregation can hide individual updates);
*personalized* when clients keep a local part; *mutates_base* when it folds weight deltas
into the frozen base model (which then must travel to clients too); *robust* when a minority
of clients cannot move the aggregate arbitrarily far (a breakdown point above 0).

Every aggregator is a pure function of tensors: `aggregate(global, updates, state)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedse.agent.lora import (
    A_SUFFIX,
    B_SUFFIX,
    Adapter,
    delta_weight,
    factor_keys,
    fresh_adapter,
    lora_modules,
    mean_delta,
    tensor_bytes,
)
from fedse.fl.update import Update


def weighted_mean(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    total = sum(weights)
    return sum(w / total * t.double() for w, t in zip(weights, tensors, strict=True)).to(tensors[0].dtype)


@dataclass
class Aggregation:
    adapter: Adapter
    """The new global adapter."""
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    """Module prefix -> dense ΔW to add to that module's base weight (mutating aggregators)."""
    state: dict = field(default_factory=dict)


class Aggregator:
    name: ClassVar[str]
    exact: ClassVar[bool] = False
    linear: ClassVar[bool] = True
    personalized: ClassVar[bool] = False
    mutates_base: ClassVar[bool] = False
    robust: ClassVar[bool] = False
    options: ClassVar[tuple[str, ...]] = ()
    """Constructor options `make_aggregator` passes on (from the run configuration)."""
    uploads: ClassVar[str] = "AB"
    """Which factors a client sends: 'AB', 'A' or 'B'."""
    trains: ClassVar[str] = "AB"
    """Which factors a client trains."""

    def upload(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The part of a client's adapter that crosses to the server."""
        return {k: tensors[k] for k in factor_keys(tensors, self.uploads)}

    def client_start(self, received: Adapter, local: Adapter | None) -> Adapter:
        """The adapter a client starts its round from (non-personalized: the global one)."""
        return received

    def bytes_up(self, adapter: Adapter) -> int:
        """Bytes one client uploads per round."""
        return tensor_bytes(self.upload(adapter.tensors))

    def bytes_down(self, adapter: Adapter, num_clients: int) -> int:
        """Bytes the server sends each client per round."""
        return adapter.num_bytes

    def aggregate(self, current: Adapter, updates: list[Update], state: dict) -> Aggregation:
        raise NotImplementedError

    def _average(self, current: Adapter, updates: list[Update], weights: list[float], keys) -> Adapter:
        tensors = dict(current.tensors)
        for k in keys:
            tensors[k] = weighted_mean([u.tensors[k] for u in updates], weights)
        return Adapter(current.spec, tensors)


class FedSE(Aggregator):
    """Fed-SE (arXiv 2512.08870, §3.2): the unweighted element-wise mean of A and of B.

    A = mean_k A_k, B = mean_k B_k. Unweighted so that environments with many easy
    trajectories do not dominate. Inexact: B̄ Ā ≠ mean_k B_k A_k in general.
    """

    name = "fedse"

    def aggregate(self, current, updates, state):
        return Aggregation(self._average(current, updates, [1.0] * len(updates), current.tensors), state=state)


class FedIT(Aggregator):
    """FedIT (Zhang et al., 2024, "Towards Building the Federated GPT"): FedAvg on LoRA factors.

    A = Σ_k n_k A_k / Σ n_k and likewise B, with n_k the client's number of examples.
    """

    name = "fedit"

    def aggregate(self, current, updates, state):
        weights = [float(u.num_examples) for u in updates]
        if sum(weights) <= 0:
            weights = [1.0] * len(updates)
        return Aggregation(self._average(current, updates, weights, current.tensors), state=state)


class FFALoRA(Aggregator):
    """FFA-LoRA (Sun et al., ICLR 2024): A stays frozen at its shared seeded init; only B is
    trained, sent and averaged. Exact: mean_k s B_k A = s (mean_k B_k) A."""

    name = "ffa"
    exact = True
    uploads = trains = "B"

    def aggregate(self, current, updates, state):
        keys = factor_keys(current.tensors, "B")
        return Aggregation(self._average(current, updates, [1.0] * len(updates), keys), state=state)


class FedSALoRA(Aggregator):
    """FedSA-LoRA (Guo et al., ICLR 2025): A learns general knowledge and is shared (averaged);
    each client keeps its own B. Evaluated per client, with (global A, own B)."""

    name = "fedsa"
    personalized = True
    uploads = "A"

    def aggregate(self, current, updates, state):
        keys = factor_keys(current.tensors, "A")
        return Aggregation(self._average(current, updates, [1.0] * len(updates), keys), state=state)

    def client_start(self, received, local):
        if local is None:
            return received
        tensors = {k: (received.tensors[k] if k.endswith(A_SUFFIX) else local.tensors[k]) for k in received.tensors}
        return Adapter(received.spec, tensors)


class FLoRA(Aggregator):
    """FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors, which gives the exact sum
    of their products; here the mean, mean_k s B_k A_k, is merged into the base weights and
    every round starts from a fresh adapter (B = 0, new seeded A). Clients receive the
    stacked factors, so download grows with the number of clients."""

    name = "flora"
    exact = True
    linear = False
    mutates_base = True

    def aggregate(self, current, updates, state):
        base_delta = mean_delta([u.tensors for u in updates], current.scale)
        round_ = state.get("round", 0) + 1
        return Aggregation(fresh_adapter(current, seed=round_), base_delta, {**state, "round": round_})

    def bytes_down(self, adapter, num_clients):
        return adapter.num_bytes * max(num_clients, 1)


class FedExLoRA(Aggregator):
    """FedEx-LoRA (Singhal et al., 2024): average A and B as FedAvg does, then fold the residual
    s (mean_k B_k A_k − B̄ Ā) into the base weights, so that the global model is exact.
    The residual is dense, so the download includes a full-size matrix per adapted layer."""

    name = "fedex"
    exact = True
    linear = False
    mutates_base = True

    def aggregate(self, current, updates, state):
        averaged = self._average(current, updates, [1.0] * len(updates), current.tensors)
        mean = mean_delta([u.tensors for u in updates], current.scale)
        residual = {m: mean[m] - delta_weight(averaged.tensors, m, current.scale) for m in mean}
        return Aggregation(averaged, residual, state)

    def bytes_down(self, adapter, num_clients):
        dense = sum(
            adapter.tensors[m + B_SUFFIX].shape[0] * adapter.tensors[m + A_SUFFIX].shape[1]
            for m in lora_modules(adapter.tensors)
        )
        return adapter.num_bytes + dense * 4


class LocalOnly(Aggregator):
    """No server: the paper's Local baseline (and local-online). Clients upload nothing; each
    keeps training its own adapter round after round, and each environment is evaluated with
    its own client's adapter. The global adapter stays the initial one."""

    name = "local"
    personalized = True
    uploads = ""

    def aggregate(self, current, updates, state):
        return Aggregation(current, state=state)

    def client_start(self, received, local):
        return received if local is None else local

    def bytes_down(self, adapter, num_clients):
        return 0


def trimmed_mean(tensors: list[torch.Tensor], trim: int) -> torch.Tensor:
    """Element-wise mean after dropping the `trim` smallest and `trim` largest values of each entry."""
    ordered = torch.stack([t.double() for t in tensors]).sort(dim=0).values
    return ordered[trim : len(tensors) - trim].mean(0).to(tensors[0].dtype)


class TrimmedMean(Aggregator):
    """Coordinate-wise trimmed mean (Yin et al., ICML 2018, "Byzantine-Robust Distributed
    Learning"), applied to A and B as Fed-SE applies its mean: for each entry, drop the
    ⌊trim·K⌋ smallest and largest of the K clients' values and average the rest.

    Robust: fewer than ⌊trim·K⌋ + 1 clients cannot move an entry outside the honest clients'
    range (with K < 1/trim nothing is trimmed and it is Fed-SE's mean). Not linear (the server
    must see each value), inexact like Fed-SE."""

    name = "trimmed"
    robust = True
    linear = False
    options = ("trim",)

    def __init__(self, trim: float = 0.2) -> None:
        if not 0 <= trim < 0.5:
            raise ValueError(f"trim must be in [0, 0.5), got {trim}")
        self.trim = trim

    def trimmed(self, count: int) -> int:
        return math.floor(self.trim * count)

    def aggregate(self, current, updates, state):
        k = self.trimmed(len(updates))
        tensors = {name: trimmed_mean([u.tensors[name] for u in updates], k) for name in current.tensors}
        return Aggregation(Adapter(current.spec, tensors), state=state)


class CoordinateMedian(TrimmedMean):
    """Coordinate-wise median (Yin et al., ICML 2018) of A and of B: each entry is the median
    of the clients' values (the mean of the middle two for an even count).

    Robust: any minority of clients leaves every entry within the honest clients' range.
    Not linear, inexact."""

    name = "median"
    options = ()

    def __init__(self) -> None:
        self.trim = 0.0

    def trimmed(self, count: int) -> int:
        return (count - 1) // 2


AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (FedSE, FedIT, FFALoRA, FedSALoRA, FLoRA, FedExLoRA, TrimmedMean, CoordinateMedian, LocalOnly)
}


def make_aggregator(name: str, **options) -> Aggregator:
    """The aggregator `name`, given those of `options` it takes (`Aggregator.options`)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATORS)}")
    cls = AGGREGATORS[name]
    return cls(**{k: v for k, v in options.items() if k in cls.options})
