"""The server's side of a round: validate what clients sent, aggregate, measure the round.

Diagnostics are computed from what the server receives (never from client data):

- `inexactness` = ‖mean_k B_k A_k − B̄ Ā‖_F / ‖mean_k B_k A_k‖_F over all adapted layers: how far
  averaging the factors is from averaging the products (Fed-SE's rule is inexact by this much);
- `gap` = the same distance measured on the model the aggregator actually produced
  (base delta + s·B_new A_new): 0 for exact aggregators, equal to `inexactness` for fedse;
- `update_cosine[j][k]` = cosine similarity of clients' weight updates ΔW_k − ΔW_global (the
  "gradient conflict" Fed-SE describes and never measures);
- `update_norm[k]` = ‖ΔW_k − ΔW_global‖_F, and the bytes each client sent and received;
- `merge`: what the rule itself measured (`Aggregation.metrics`, e.g. the subspace rule's energy
  dropped by its rank budget and its share on directions several clients hold).
For personalized rules where B_k stays on the client (fedsa) the product-based figures are None.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field

import torch

from fedse.agent.lora import Adapter, delta_weight, lora_modules
from fedse.fl.aggregators import Aggregation, Aggregator, densify
from fedse.fl.privacy import PrivacySection, clip_update, noise_aggregation
from fedse.fl.update import DEFAULT_MAX_UPDATE_NORM, Bound, Update, bound_update, update_problems

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    aggregation: Aggregation
    accepted: list[str]
    rejected: dict[str, list[str]] = field(default_factory=dict)
    clipped: dict[str, float] = field(default_factory=dict)
    """Client -> the norm its update had before it was clipped to the bound."""
    diagnostics: dict = field(default_factory=dict)
    server_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The server optimiser's moments after this round (`ServerOptimizer`)."""


@dataclass
class ServerState:
    """Everything the server carries from one round to the next (and checkpoints)."""

    adapter: Adapter
    """The global adapter clients start from."""
    base_delta: dict[str, torch.Tensor] = field(default_factory=dict)
    """Module -> cumulative ΔW folded into the base so far (mutating rules), float32 on the CPU:
    summed in float64 each round and kept as the checkpoint stores it (half of float64's 850 MB
    for SmolLM2-135M), so a resumed run holds exactly what an uninterrupted one does."""
    aggregator: dict = field(default_factory=dict)
    """The aggregator's own state (e.g. the folding rules' round counter; the personal rule's
    copies of the clients' last adapters, tensors under `fedse.fl.aggregators.HELD`)."""
    optimizer: dict[str, torch.Tensor] = field(default_factory=dict)
    """The server optimiser's moments (momentum / adam), float32."""
    folded: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] | None = field(default_factory=list)
    """Every round's folded delta as factors, in order (`Aggregation.folded`): `fold` of it is
    `base_delta`, bit for bit. None once a round folded a delta it had only densely (flora, fedex)."""

    def apply(self, result: RoundResult) -> dict[str, torch.Tensor]:
        """Take a round's result as the new state. Returns the cumulative base delta of every
        module the round changed (what a holder of the base model must now apply)."""
        aggregation = result.aggregation
        self.adapter, self.aggregator = aggregation.adapter, aggregation.state
        self.optimizer = result.server_state
        if aggregation.base_delta and self.folded is not None:
            self.folded = [*self.folded, aggregation.folded] if aggregation.folded else None
        return accumulate(self.base_delta, aggregation.base_delta)


def accumulate(total: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add a round's folded `delta` into the running `total` (in place): summed in float64, kept
    in float32. Returns the new totals of the modules it changed."""
    changed = {}
    for module, d in delta.items():
        previous = total.get(module, torch.zeros_like(d, dtype=torch.float32))
        total[module] = changed[module] = (previous.double() + d.double()).float()
    return changed


def fold(history: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """The cumulative base delta of every round's factors in `history`, exactly as the server
    accumulated it (`ServerState.base_delta`)."""
    total: dict[str, torch.Tensor] = {}
    for factors in history:
        accumulate(total, densify(factors))
    return total


@dataclass(frozen=True)
class ServerOptimizer:
    """The server's step on the round's pseudo-gradient Δ = aggregate − global, per tensor
    (Reddi et al., ICLR 2021, "Adaptive Federated Optimization"):

    - sgd: θ ← θ + lr·Δ (`server_step`; lr 1 is the rule itself);
    - momentum (FedAvgM, Hsu et al. 2019): m ← β·m + Δ; θ ← θ + lr·m;
    - adam (FedAdam): m ← β·m + (1−β)·Δ, v ← β2·v + (1−β2)·Δ²; θ ← θ + lr·m / (√v + eps).

    The moments are float32 and travel in the checkpoint, so a resumed run steps exactly as an
    uninterrupted one. Only for rules that keep the base frozen (like server_step)."""

    kind: str = "sgd"
    lr: float = 1.0
    momentum: float = 0.9
    beta2: float = 0.99
    eps: float = 1e-3

    def step(
        self, current: Adapter, aggregation: Aggregation, state: dict[str, torch.Tensor]
    ) -> tuple[Aggregation, dict[str, torch.Tensor]]:
        if self.kind == "sgd":
            return server_step(current, aggregation, self.lr), state
        if aggregation.base_delta:
            raise ValueError(f"the {self.kind} server optimiser needs an aggregator that keeps the base model frozen")
        tensors, moments = dict(aggregation.adapter.tensors), {}
        for k, new in tensors.items():
            old = current.tensors[k].double()
            delta = new.double() - old
            m = state.get("m." + k, torch.zeros_like(delta)).double()
            if self.kind == "momentum":
                m = self.momentum * m + delta
                move = m
            else:
                v = state.get("v." + k, torch.zeros_like(delta)).double()
                m = self.momentum * m + (1 - self.momentum) * delta
                v = self.beta2 * v + (1 - self.beta2) * delta.square()
                moments["v." + k] = v.float()
                move = m / (v.sqrt() + self.eps)
            moments["m." + k] = m.float()
            tensors[k] = (old + self.lr * move).to(new.dtype)
        return Aggregation(
            Adapter(aggregation.adapter.spec, tensors), {}, aggregation.state, aggregation.metrics
        ), moments


def server_step(current: Adapter, aggregation: Aggregation, lr: float) -> Aggregation:
    """Move each aggregated tensor `lr` times as far from the current global one as the rule did:
    θ ← θ + lr · (θ_agg − θ). FedAvg with a server learning rate (Reddi et al., ICLR 2021,
    "Adaptive Federated Optimization"); lr 1 is the rule itself.

    The idea: clients of different environments send nearly orthogonal updates, so the plain
    mean passes each at about 1/K of its strength, and lr ≈ K would pass each at full strength.
    Measured in the demo (results/measurements.md): a larger step helps one client and
    hurts the others already at 2, since the factors' mean is not a sum of independent parts
    (B̄Ā is bilinear, and the updates share the format of an agent turn). Only for rules that keep the model in
    the adapter (base-mutating ones fold a dense delta the step would scale too).
    """
    if lr == 1.0:
        return aggregation
    if aggregation.base_delta:
        raise ValueError("a server learning rate other than 1 needs an aggregator that keeps the base model frozen")
    tensors = dict(aggregation.adapter.tensors)
    for k, new in tensors.items():
        old = current.tensors[k].double()
        tensors[k] = (old + lr * (new.double() - old)).to(new.dtype)
    return Aggregation(Adapter(aggregation.adapter.spec, tensors), {}, aggregation.state, aggregation.metrics)


def aggregate_round(
    aggregator: Aggregator,
    current: Adapter,
    updates: list[Update],
    state: dict,
    max_update_norm: float = DEFAULT_MAX_UPDATE_NORM,
    bound: Bound = "clip",
    optimizer: ServerOptimizer | None = None,
    server_state: dict[str, torch.Tensor] | None = None,
    privacy: PrivacySection | None = None,
    noise: torch.Generator | None = None,
) -> RoundResult:
    """Drop invalid updates (saying which client and tensor), bound the norm of the rest
    (`bound_update`), aggregate them, take the server step (`optimizer`, default the rule's own
    result: SGD at lr 1; `server_state` holds its moments from the previous round).

    With no valid update the global adapter stays as it was. Under central DP (`privacy.dp =
    "central"`) every valid update is clipped to `privacy.clip` and the rule's result is noised
    with `noise` before the server step (`fedse.fl.privacy`).
    """
    central = privacy is not None and privacy.dp == "central"
    expected, expected_inputs = aggregator.upload(current.tensors), aggregator.expected_inputs(current)
    valid, rejected, clipped = [], {}, {}
    senders = Counter(u.client for u in updates)
    for u in updates:
        if senders[u.client] > 1:  # which of them is the real one is unknowable: none counts
            rejected[u.client] = [f"client {u.client}: sent {senders[u.client]} updates this round"]
            log.warning("rejected the updates of client %s: %s", u.client, rejected[u.client][0])
            continue
        problems = update_problems(u, expected, expected_inputs)
        if not problems:
            bounded, norm = bound_update(u, current.tensors, max_update_norm, bound)
            if bounded is None:
                problems = [f"client {u.client}: update norm {norm:.4g} is above the bound {max_update_norm:g}"]
            elif bounded is not u:
                clipped[u.client] = norm
                log.warning("clipped the update of client %s from norm %.4g to %g", u.client, norm, max_update_norm)
                u = bounded
        if problems:
            rejected[u.client] = problems
            log.warning("rejected the update of client %s: %s", u.client, "; ".join(problems))
        else:
            valid.append(u)
    if rejected:
        log.warning("round continues with %d of %d clients", len(valid), len(updates))
    optimizer = optimizer or ServerOptimizer()
    server_state = server_state or {}
    if not valid:
        return RoundResult(Aggregation(current, {}, state), [], rejected, clipped, {"clients": 0}, server_state)
    if central:
        valid = [clip_update(u, current.tensors, privacy.clip)[0] for u in valid]
    # Factors a client does not send are the global ones (ffa: A), as far as the server knows.
    full = [Update(u.client, {**current.tensors, **u.tensors}, u.num_examples, u.metrics, u.inputs) for u in valid]
    aggregated = aggregator.aggregate(current, full, state)
    if central:
        uploaded = sorted(aggregator.upload(current.tensors))
        aggregated = noise_aggregation(aggregated, uploaded, len(valid), privacy, noise)
    aggregation, server_state = optimizer.step(current, aggregated, server_state)
    accepted = [c for u in valid for c in (u.members or [u.client])]
    if any(u.members for u in valid):  # secure aggregation: no individual update to measure
        # per-client norms, cosines and inexactness need individual updates: not computed
        diagnostics = {**base_diagnostics(aggregator, current, len(accepted), aggregation), "secure_aggregation": True}
    else:
        diagnostics = round_diagnostics(aggregator, current, full, aggregation)
    return RoundResult(aggregation, accepted, rejected, clipped, diagnostics, server_state)


def base_diagnostics(aggregator: Aggregator, current: Adapter, clients: int, result: Aggregation) -> dict:
    """The figures every round has; those that need individual updates left at None."""
    return {
        "clients": clients,
        "bytes_up": [aggregator.bytes_up(current)] * clients,
        "bytes_down": aggregator.bytes_down(current, clients),
        "inexactness": None,
        "gap": None,
        "update_cosine": None,
        "update_norm": None,
        "merge": dict(result.metrics),
    }


def round_diagnostics(aggregator: Aggregator, current: Adapter, updates: list[Update], result: Aggregation) -> dict:
    """The figures of the module docstring, accumulated one adapted module at a time.

    Dense ΔW are float64 and as large as the adapted base weights (850 MB a client for
    SmolLM2-135M): holding every client's at once took a 5-client demo's server step to
    23 GB of resident memory. Per module, at most K + 4 dense matrices of that module live.
    """
    out = base_diagnostics(aggregator, current, len(updates), result)
    if "B" not in aggregator.uploads:
        return out
    scale = current.scale
    avg = {k: torch.stack([u.tensors[k].double() for u in updates]).mean(0) for k in current.tensors}
    mean_sq = inexact_sq = gap_sq = 0.0
    gram = torch.zeros(len(updates), len(updates), dtype=torch.float64)
    for module in lora_modules(current.tensors):
        before = delta_weight(current.tensors, module, scale).flatten()
        client = torch.stack([delta_weight(u.tensors, module, scale).flatten() for u in updates])
        mean = sum(client.unbind(0)) / len(updates)  # mean_delta's order of summation
        produced = delta_weight(result.adapter.tensors, module, scale).flatten()
        if module in result.base_delta:
            produced = produced + result.base_delta[module].double().flatten()
        mean_sq += float(mean @ mean)
        inexact_sq += float((mean - delta_weight(avg, module, scale).flatten()).square().sum())
        gap_sq += float((mean - produced).square().sum())
        moves = client - before
        gram += moves @ moves.T
    norm = math.sqrt(mean_sq) or 1.0
    out["inexactness"] = math.sqrt(inexact_sq) / norm
    out["gap"] = math.sqrt(gap_sq) / norm
    norms = gram.diagonal().clamp_min(0).sqrt()
    out["update_norm"] = [float(x) for x in norms]
    unit = norms.clamp_min(1e-30)
    out["update_cosine"] = (gram / unit[:, None] / unit[None, :]).tolist()
    return out


def folded_tensors(history: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Rounds' factors as flat named tensors, "<index>:<module>:U" and ":V" (a checkpoint, a message)."""
    return {
        f"{i}:{m}:{side}": t.contiguous()
        for i, factors in enumerate(history)
        for m, (u, v) in factors.items()
        for side, t in (("U", u), ("V", v))
    }


def tensors_folded(tensors: dict[str, torch.Tensor]) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The inverse of `folded_tensors`."""
    rounds: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        index, module, side = name.split(":")
        rounds.setdefault(int(index), {}).setdefault(module, {})[side] = t
    return [{m: (f["U"], f["V"]) for m, f in rounds[i].items()} for i in sorted(rounds)]
