"""The server's side of a round: validate what clients sent, aggregate, measure the round.

Diagnostics are computed from what the server receives (never from client data):

- `inexactness` = ‖mean_k B_k A_k − B̄ Ā‖_F / ‖mean_k B_k A_k‖_F over all adapted layers: how far
  averaging the factors is from averaging the products (Fed-SE's rule is inexact by this much);
- `gap` = the same distance measured on the model the aggregator actually produced
  (base delta + s·B_new A_new): 0 for exact aggregators, equal to `inexactness` for fedse;
- `update_cosine[j][k]` = cosine similarity of clients' weight updates ΔW_k − ΔW_global (the
  "gradient conflict" Fed-SE describes and never measures);
- `update_norm[k]` = ‖ΔW_k − ΔW_global‖_F, and the bytes each client sent and received.
For personalized rules where B_k stays on the client (fedsa) the product-based figures are None.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from fedse.agent.lora import Adapter, delta_weights, mean_delta
from fedse.fl.aggregators import Aggregation, Aggregator
from fedse.fl.update import Update, update_problems

log = logging.getLogger(__name__)


@dataclass
class RoundResult:
    aggregation: Aggregation
    accepted: list[str]
    rejected: dict[str, list[str]] = field(default_factory=dict)
    diagnostics: dict = field(default_factory=dict)


def aggregate_round(aggregator: Aggregator, current: Adapter, updates: list[Update], state: dict) -> RoundResult:
    """Drop invalid updates (saying which client and tensor), aggregate the rest.

    With no valid update the global adapter stays as it was.
    """
    expected = aggregator.upload(current.tensors)
    valid, rejected = [], {}
    for u in updates:
        problems = update_problems(u, expected)
        if problems:
            rejected[u.client] = problems
            log.warning("rejected the update of client %s: %s", u.client, "; ".join(problems))
        else:
            valid.append(u)
    if rejected:
        log.warning("round continues with %d of %d clients", len(valid), len(updates))
    if not valid:
        return RoundResult(Aggregation(current, {}, state), [], rejected, {"clients": 0})
    # Factors a client does not send are the global ones (ffa: A), as far as the server knows.
    full = [Update(u.client, {**current.tensors, **u.tensors}, u.num_examples, u.metrics) for u in valid]
    aggregation = aggregator.aggregate(current, full, state)
    diagnostics = round_diagnostics(aggregator, current, full, aggregation)
    return RoundResult(aggregation, [u.client for u in valid], rejected, diagnostics)


def _flat(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([deltas[m].flatten() for m in sorted(deltas)])


def round_diagnostics(aggregator: Aggregator, current: Adapter, updates: list[Update], result: Aggregation) -> dict:
    scale = current.scale
    out: dict = {
        "clients": len(updates),
        "bytes_up": [aggregator.bytes_up(current)] * len(updates),
        "bytes_down": aggregator.bytes_down(current, len(updates)),
        "inexactness": None,
        "gap": None,
        "update_cosine": None,
        "update_norm": None,
    }
    if "B" not in aggregator.uploads:
        return out
    before = _flat(delta_weights(current.tensors, scale))
    deltas = [delta_weights(u.tensors, scale) for u in updates]
    client = torch.stack([_flat(d) for d in deltas])
    mean = _flat(mean_delta(deltas))
    norm = float(mean.norm()) or 1.0
    avg_a = {k: torch.stack([u.tensors[k].double() for u in updates]).mean(0) for k in current.tensors}
    out["inexactness"] = float((mean - _flat(delta_weights(avg_a, scale))).norm()) / norm
    produced = delta_weights(result.adapter.tensors, scale)
    for module, extra in result.base_delta.items():
        produced[module] = produced[module] + extra.double()
    out["gap"] = float((mean - _flat(produced)).norm()) / norm
    moves = client - before
    out["update_norm"] = [float(x) for x in moves.norm(dim=1)]
    unit = moves / moves.norm(dim=1, keepdim=True).clamp_min(1e-30)
    out["update_cosine"] = (unit @ unit.T).tolist()
    return out
