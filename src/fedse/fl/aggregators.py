"""LoRA aggregation rules: one small class per algorithm, each stating its rule and properties.

Notation: client k returns LoRA factors A_k (r x in) and B_k (out x r) for every adapted
linear layer; its weight update is ΔW_k = s · B_k A_k with s = alpha / r. An aggregator is
*exact* when the new global model is base + a combination of the products ΔW_k that the rule
states (the mean for ffa, flora and fedex; the sum or the subspace merge for the rules of the
last section), with none of the cross products B_j A_k that averaging factors makes; *linear* when the server only
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
    LoraSpec,
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
    metrics: dict[str, float] = field(default_factory=dict)
    """Figures the rule measured this round (recorded with the round's diagnostics as `merge`)."""
    folded: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    """The same base delta as factors, module -> (U, V) with base_delta = `densify` of them, for
    the rules whose result is low-rank: what a client needs instead of the dense matrices."""


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

    uploads_kept: ClassVar[bool] = False
    """Whether a client uploads what it keeps from round to round (its own adapter): then an upload
    is not the received model plus one round's move, and clipping that move bounds nothing."""

    reads_inputs: ClassVar[bool] = False
    """Whether clients also send a summary of their layers' inputs (`summarize_inputs`)."""
    weights_by_examples: ClassVar[bool] = False
    """Whether a client's weight in the result is its example count (then one client's influence
    is not bounded by its update's norm)."""

    def summarize_inputs(self, moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What a client sends of its layers' input second moments (module -> in x in), if the
        rule reads inputs (`reads_inputs`); computed on the client."""
        return {}

    def expected_inputs(self, current: Adapter) -> dict[str, torch.Tensor]:
        """Tensors of the shapes `summarize_inputs` sends (what the server checks against)."""
        return {}

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
    weights_by_examples = True

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


RESTARTS_PER_SEED = 2**20
"""How many rounds a run can restart before its restart draws could meet another seed's."""


def restart(current: Adapter, state: dict, seed: int) -> tuple[Adapter, dict]:
    """The fresh adapter (B = 0, seeded A) the folding rules start the next round from, and the
    state that counts it. A is drawn from the run's seed and the round together, so that runs with
    different seeds restart from different factors, and a resumed run from the same ones. Run
    seed 0 draws from the round number alone."""
    round_ = state.get("round", 0) + 1
    return fresh_adapter(current, seed=seed * RESTARTS_PER_SEED + round_), {**state, "round": round_}


class FLoRA(Aggregator):
    """FLoRA (Wang et al., NeurIPS 2024): stack the clients' factors, which gives the exact sum
    of their products; here the mean, mean_k s B_k A_k, is merged into the base weights and
    every round starts from a fresh adapter (B = 0, A drawn from the run's seed and the round).
    Clients receive the stacked factors, so download grows with the number of clients."""

    name = "flora"
    exact = True
    linear = False
    mutates_base = True
    options = ("seed",)

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def aggregate(self, current, updates, state):
        adapter, state = restart(current, state, self.seed)
        return Aggregation(adapter, mean_delta([u.tensors for u in updates], current.scale), state)

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


# --- Weight-space rules: they combine the products ΔW_k, never A and B apart ----------------------
#
# The rules below fold their result into the base weights and start every round from a fresh
# adapter (`restart`: B = 0, A drawn from the run's seed and the round), as FLoRA does: clients
# keep training at rank r. The round's result is factors, U (out x R) and V (in x R) per layer, computed without any
# dense d_out x d_in matrix; `bytes_down` counts them, what a client needs to fold the round into
# its own copy of the base. The embedded runtime holds the folded total densely, as for FLoRA (in
# memory and in checkpoints); on Flower the nodes receive every round's factors (`Aggregation.folded`)
# and fold them themselves (`fedse.fl.server.fold`), never a dense matrix.


def update_factors(current: Adapter, update: Update, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U V^T = ΔW_k = s B_k A_k − s B A, float64: the client's exact change of one
    layer this round. The global term is left out while B = 0 (a folding rule's every round)."""
    s = current.scale
    b_k, a_k = update.tensors[module + B_SUFFIX].double(), update.tensors[module + A_SUFFIX].double()
    b, a = current.tensors[module + B_SUFFIX].double(), current.tensors[module + A_SUFFIX].double()
    if not b.any():
        return s * b_k, a_k.T
    return torch.cat([s * b_k, -s * b], 1), torch.cat([a_k, a], 0).T


def current_factors(current: Adapter, module: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U V^T = s B A, the global adapter's own product (empty while B = 0)."""
    b, a = current.tensors[module + B_SUFFIX].double(), current.tensors[module + A_SUFFIX].double()
    return (current.scale * b, a.T) if b.any() else (b[:, :0], a.T[:, :0])


def densify(factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Module -> U V^T in float32 (the runtime's folded base delta), multiplied in float64."""
    return {m: (u.double() @ v.double().T).float() for m, (u, v) in factors.items()}


def factor_bytes(adapter: Adapter, rank: int) -> int:
    """Bytes of rank-`rank` factors U (out x R) and V (in x R) for every adapted layer, float32."""
    return sum(
        rank * (adapter.tensors[m + B_SUFFIX].shape[0] + adapter.tensors[m + A_SUFFIX].shape[1]) * 4
        for m in lora_modules(adapter.tensors)
    )


class WeightSum(Aggregator):
    """Task arithmetic (Ilharco et al., ICLR 2023, arXiv 2212.04089) on the round's updates:
    W ← W + s B A + λ Σ_k ΔW_k, with ΔW_k = s B_k A_k − s B A, folded into the base.

    Exact through stacking (FLoRA's identity): Σ_k B_k A_k = [B_1 … B_K] [A_1; …; A_K], so the
    server sends the stacked factors and nothing dense. λ = 1 (`scale`) passes every client's
    update at full strength, where the mean passes 1/K of it; λ = 1/K is FLoRA. Interference is
    left as it is: a direction two clients share arrives twice."""

    name = "sum"
    exact = True
    linear = False
    mutates_base = True
    options = ("scale", "seed")

    def __init__(self, scale: float = 1.0, seed: int = 0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale, self.seed = scale, seed

    def merged_factors(self, current: Adapter, updates: list[Update]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Module -> (U, V) with U V^T = s B A + λ Σ_k ΔW_k: the round's folded delta, float32."""
        out = {}
        for m in lora_modules(current.tensors):
            pairs = [current_factors(current, m)] + [update_factors(current, u, m) for u in updates]
            out[m] = (
                torch.cat([pairs[0][0]] + [self.scale * u for u, _ in pairs[1:]], 1).float(),
                torch.cat([v for _, v in pairs], 1).float(),
            )
        return out

    def aggregate(self, current, updates, state):
        factors = self.merged_factors(current, updates)
        adapter, state = restart(current, state, self.seed)
        return Aggregation(adapter, densify(factors), state, folded=factors)

    def bytes_down(self, adapter, num_clients):
        return factor_bytes(adapter, adapter.spec.rank * max(num_clients, 1))


def core_space(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Q_u, Q_v and each update's core C_k, with U_k V_k^T = Q_u C_k Q_v^T (Core Space merging,
    arXiv 2509.17786): one QR of the stacked left factors and one of the right ones; C_k is
    small (at most Σ_k r_k on a side) and keeps every inner product of the updates."""
    q_u, r_u = torch.linalg.qr(torch.cat([u for u, _ in pairs], 1))
    q_v, r_v = torch.linalg.qr(torch.cat([v for _, v in pairs], 1))
    cores, start = [], 0
    for u, _ in pairs:
        stop = start + u.shape[1]
        cores.append(r_u[:, start:stop] @ r_v[:, start:stop].T)
        start = stop
    return q_u, q_v, cores


RANK_TOL = 1e-9
"""Singular values below this fraction of the round's largest are numerical zeros."""
LEVEL_TOL = 1e-6
"""Multiplicities closer than this are one level: within it the split is basis-free."""


class RankBudget:
    """Re-factors merged updates at a declared rank and keeps count of the energy it drops.

    `factors(Q_u, M, Q_v)` returns (U, V) with U V^T the best rank-`rank` approximation of
    Q_u M Q_v^T (0: exact, every non-zero singular value), split evenly between the factors
    (U = Q_u L √Σ, V = Q_v R √Σ), float32; and the layer's energy ‖M‖_F²."""

    def __init__(self, rank: int) -> None:
        self.rank, self.total, self.dropped = rank, 0.0, 0.0

    def factors(self, q_u: torch.Tensor, core: torch.Tensor, q_v: torch.Tensor) -> tuple[tuple, float]:
        left, sv, right_t = torch.linalg.svd(core, full_matrices=False)
        keep = sv > RANK_TOL * float(sv[0]) if sv.numel() and sv[0] > 0 else sv > 0
        kept = int(keep.sum()) if self.rank == 0 else min(int(keep.sum()), self.rank)
        energy = float(sv.square().sum())
        self.total, self.dropped = self.total + energy, self.dropped + float(sv[kept:].square().sum())
        root = sv[:kept].sqrt()
        return ((q_u @ (left[:, :kept] * root)).float(), (q_v @ (right_t[:kept].T * root)).float()), energy

    def figures(self) -> dict[str, float]:
        """The share of the round's merged energy the rank budget dropped."""
        return {"dropped_energy": self.dropped / self.total if self.total else 0.0}


def subspace_merge(cores: list[torch.Tensor], elect: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
    """The merged core M of the updates' cores C_k (see `SubspaceMerge` for the rule), and what
    it measured: the share of the merged energy on directions several clients hold."""
    m, n = cores[0].shape
    svds = [torch.linalg.svd(c, full_matrices=False) for c in cores]
    top = max((float(s[0]) for _, s, _ in svds if s.numel()), default=0.0)
    blocks = []  # per client: left basis L_k, singular values, right basis R_k of its own update
    for left, sv, right_t in svds:
        keep = sv > RANK_TOL * top
        if top > 0 and keep.any():
            blocks.append((left[:, keep], sv[keep], right_t[keep].T))
    if not blocks:
        return torch.zeros(m, n, dtype=torch.float64), {"shared_energy": 0.0}
    sizes = [sv.numel() ** 2 for _, sv, _ in blocks]
    offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
    # Gram of every client's block basis {l_i r_j^T}: the multiplicity operator N = Σ_k Π_k
    # restricted to the blocks' span has the same non-zero eigenvalues as this matrix.
    gram = torch.zeros(offsets[-1], offsets[-1], dtype=torch.float64)
    for a, (la, _, ra) in enumerate(blocks):
        for b, (lb, _, rb) in enumerate(blocks):
            gram[offsets[a] : offsets[a + 1], offsets[b] : offsets[b + 1]] = torch.kron(la.T @ lb, ra.T @ rb)
    levels, vectors = torch.linalg.eigh(gram)
    live = levels > RANK_TOL * len(blocks)
    levels, vectors = levels[live], vectors[:, live]
    # Client k's coefficient on eigen-direction e_i, and its share of e_i (shares sum to λ_i).
    coeff = torch.stack(
        [
            levels.sqrt() * (torch.diag(sv).flatten() @ vectors[offsets[k] : offsets[k + 1]])
            for k, (_, sv, _) in enumerate(blocks)
        ]
    )
    share = torch.stack([levels * vectors[offsets[k] : offsets[k + 1]].square().sum(0) for k in range(len(blocks))])
    merged = torch.zeros_like(levels)
    start = 0
    while start < len(levels):  # eigh sorts ascending: a level is a run of near-equal values
        stop = start + 1
        while stop < len(levels) and levels[stop] - levels[start] <= LEVEL_TOL * max(1.0, float(levels[start])):
            stop += 1
        part, held = coeff[:, start:stop], share[:, start:stop].mean(1)
        agree = torch.ones(len(blocks), dtype=torch.bool)
        if elect:  # TIES' sign election, per level: keep the clients that point along the sum
            agree = (part @ part.sum(0)) > 0
        count = float(held[agree].sum()) if agree.any() else 0.0
        merged[start:stop] = part[agree].sum(0) / max(count, 1.0)
        start = stop
    out = torch.zeros(m, n, dtype=torch.float64)
    for k, (left, _, right) in enumerate(blocks):
        rho = right.shape[1]
        weights = (vectors[offsets[k] : offsets[k + 1]] * (merged / levels.sqrt())).sum(1).reshape(rho, rho)
        out += left @ weights @ right.T
    energy = merged.square()  # "shared": held by two clients or more, to within half a client
    shared = float(energy[levels > 1.5].sum() / energy.sum()) if float(energy.sum()) > 0 else 0.0
    return out, {"shared_energy": shared}


class SubspaceMerge(Aggregator):
    """Each direction of the round's updates averaged over the clients that hold it: what several
    clients share is combined as a consensus, what one client holds passes at full strength.

    Per adapted layer, with ΔW_k = s B_k A_k − s B A (never A and B apart):

    1. Core space (Core Space merging, arXiv 2509.17786; KnOTS, arXiv 2410.19735): QR of the
       stacked factors gives ΔW_k = Q_u C_k Q_v^T with cores of side ≤ Σ_k r_k.
    2. Client k holds the directions P_k X Q_k, with P_k, Q_k the projectors on the column and
       row spaces of C_k; the multiplicity operator N(X) = Σ_k P_k X Q_k counts, for a unit
       direction X, how many clients hold it (N's eigenvalue λ ∈ [0, K]). Its eigen-directions
       e_i come from the Gram of the clients' block bases {l_p r_q^T} (Σ_k r_k² square): small.
    3. Client k's coefficient on e_i is c_ki = ⟨ΔW_k, e_i⟩ and its share h_ki = ‖Π_k e_i‖²
       (Σ_k h_ki = λ_i). Consensus: the clients whose coefficients point along Σ_k c_ki are
       kept (TIES' sign election, per level of equal λ so that it is basis-free), and
       m_i = Σ_kept c_ki / max(Σ_kept h_ki, 1). Directions held by n ≥ 1 clients are averaged
       over n (FedRPCA, arXiv 2506.01194, averages the common part and amplifies the
       client-specific one; Iso-CTS, arXiv 2502.04959, keeps both subspaces apart).
    4. W ← W + s B A + Q_u Σ_i m_i e_i Q_v^T, folded into the base as the section above says, at rank
       `rank` (0: exact, Σ_k r_k; smaller: truncated SVD of the core, the dropped share of the
       energy recorded each round as `dropped_energy`).

    Hence: identical updates give that update (every direction held by K, the mean); mutually
    orthogonal ones (P_j P_k = 0 or Q_j Q_k = 0) give their sum (every direction held by one);
    one client gives its update; a shared direction plus private ones gives the shared one
    averaged plus every private one; client order does not matter; ‖result − s B A‖_F ≤
    Σ_k ‖ΔW_k‖_F (each client's part passes at most whole). Not linear: the server needs each
    client's factors. `elect = False` averages without the sign election (an ablation)."""

    name = "subspace"
    exact = True
    linear = False
    mutates_base = True
    options = ("rank", "elect", "seed")

    def __init__(self, rank: int = 0, elect: bool = True, seed: int = 0) -> None:
        if rank < 0:
            raise ValueError(f"rank must be 0 (exact) or positive, got {rank}")
        self.rank, self.elect, self.seed = rank, elect, seed

    def merged_factors(
        self, current: Adapter, updates: list[Update]
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
        """Module -> (U, V) with U V^T = s B A + the merged update, at the declared rank, float32
        (computed in float64); and the round's figures: energy dropped by the rank budget, energy on
        shared directions, and the merge against the plain sum Σ_k ΔW_k (‖merge − sum‖ / ‖sum‖ and
        ‖merge‖ / ‖sum‖ over all layers, before the rank budget: 0 and 1 when no direction is shared)."""
        out, budget, shared = {}, RankBudget(self.rank), 0.0
        sum_sq = gap_sq = merged_sq = 0.0
        for m in lora_modules(current.tensors):
            pairs = [update_factors(current, u, m) for u in updates]
            q_u, q_v, cores = core_space([current_factors(current, m), *pairs])
            merged, figures = subspace_merge(cores[1:], self.elect)
            out[m], energy = budget.factors(q_u, cores[0] + merged, q_v)
            shared += figures["shared_energy"] * energy
            summed = sum(cores[1:])  # Q_u, Q_v have orthonormal columns: norms are the cores'
            sum_sq += float(summed.square().sum())
            gap_sq += float((merged - summed).square().sum())
            merged_sq += float(merged.square().sum())
        against_sum = {
            "from_sum": math.sqrt(gap_sq / sum_sq) if sum_sq else 0.0,
            "size_vs_sum": math.sqrt(merged_sq / sum_sq) if sum_sq else 1.0,
        }
        return out, {**budget.figures(), "shared_energy": shared / budget.total if budget.total else 0.0, **against_sum}

    def aggregate(self, current, updates, state):
        factors, figures = self.merged_factors(current, updates)
        adapter, state = restart(current, state, self.seed)
        return Aggregation(adapter, densify(factors), state, figures, folded=factors)

    def as_adapter(self, like: Adapter, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Adapter:
        """The merged update as one PEFT adapter of rank R = the largest layer's (B = U, A = V^T,
        alpha = R so that s = 1; smaller layers padded with zero columns): what a client that
        does not fold can load with `PeftModel.from_pretrained` on the previous round's model."""
        rank = max(u.shape[1] for u, _ in factors.values())
        tensors = {}
        for m, (u, v) in factors.items():
            pad = rank - u.shape[1]
            tensors[m + B_SUFFIX] = torch.nn.functional.pad(u, (0, pad)).float()
            tensors[m + A_SUFFIX] = torch.nn.functional.pad(v, (0, pad)).T.contiguous().float()
        spec = LoraSpec(rank, rank, like.spec.dropout, like.spec.target_modules)
        return Adapter(spec, tensors)

    def bytes_down(self, adapter, num_clients):
        exact = adapter.spec.rank * max(num_clients, 1)
        return factor_bytes(adapter, exact if self.rank == 0 else min(self.rank, exact))


TOP_SUFFIX, DIAG_SUFFIX = ".inputs_top", ".inputs_diag"
"""Keys of a client's input summary, per adapted module: F (in x p) and d (in)."""


def summarize_moment(moment: torch.Tensor, alpha: float, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(F, d) with F F^T + diag(d) ≈ G̃ = α G + (1 − α) diag(G), G a layer's input second moment:
    F = the top `rank` eigen-directions of G̃ scaled by √eigenvalue, d = the rest's diagonal, so the
    diagonal is exact and the surrogate stays positive semi-definite. float32."""
    g = moment.double()
    g = alpha * g + (1 - alpha) * torch.diag(g.diagonal())
    values, vectors = torch.linalg.eigh(g)
    p = min(rank, g.shape[0])
    top = vectors[:, g.shape[0] - p :] * values[g.shape[0] - p :].clamp_min(0).sqrt()
    rest = (g.diagonal() - top.square().sum(1)).clamp_min(0)
    return top.float(), rest.float()


def regmean_solve(
    pairs: list[tuple[torch.Tensor, torch.Tensor]], summaries: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """(U, V) with U V^T = (Σ_k ΔW_k Ĝ_k)(Σ_k Ĝ_k)^-1, ΔW_k = U_k V_k^T, Ĝ_k = F_k F_k^T + diag(d_k):
    U = [U_1 … U_K], V = [Y_1 … Y_K] with Y_k = (Σ_j Ĝ_j)^-1 Ĝ_k V_k, by Woodbury's identity on
    diag(Σ_k d_k) + F F^T, F = [F_1 … F_K], when Σ_k p_k < in: nothing of size in x in is formed.
    float64."""
    pairs = [(u.double(), v.double()) for u, v in pairs]
    tops = torch.cat([f.double() for f, _ in summaries], 1)
    diag = sum(d.double().clamp_min(0) for _, d in summaries)  # a diagonal is never negative
    width = tops.shape[0]  # inputs no client excites get a ridge far below the others' scale
    diag = diag.clamp_min(RANK_TOL * max(float(diag.sum() + tops.square().sum()) / width, 1e-30))
    pulled = torch.cat(
        [
            f.double() @ (f.double().T @ v) + d.double().clamp_min(0)[:, None] * v
            for (_, v), (f, d) in zip(pairs, summaries, strict=True)
        ],
        1,
    )
    if tops.shape[1] >= width:  # the summaries are not low-rank here (small layers): solve densely
        solved = torch.linalg.solve(torch.diag(diag) + tops @ tops.T, pulled)
    else:
        scaled = tops / diag[:, None]
        inner = torch.eye(tops.shape[1], dtype=torch.float64) + tops.T @ scaled
        solved = pulled / diag[:, None] - scaled @ torch.linalg.solve(inner, scaled.T @ pulled)
    return torch.cat([u for u, _ in pairs], 1), solved


class RegMeanMerge(Aggregator):
    """The update that best reproduces every client's own update on that client's own inputs:
    per adapted layer, ΔW = argmin Σ_k ‖(ΔW − ΔW_k) X_k‖² / n_k = (Σ_k ΔW_k G_k)(Σ_k G_k)^-1,
    G_k = X_k X_k^T / n_k the second moment of the layer's inputs on client k's training data
    (RegMean, Jin et al., ICLR 2023, arXiv 2212.09849, applied to the round's updates
    ΔW_k = s B_k A_k − s B A, each client's inputs weighted equally).

    Why: the clients' updates are nearly orthogonal as matrices yet not on each other's inputs
    (‖ΔW_j X_k‖ is as large as ‖ΔW_k X_k‖, measured in results/bench/learnability-interference.md),
    so their sum moves every environment's activations by the others' updates. RegMean keeps each
    update where its own client's inputs are and settles where the inputs overlap.

    What crosses: each client sends its factors and, per adapted layer, a summary of G̃_k =
    α G_k + (1 − α) diag(G_k) (RegMean's shrinkage, `alpha`): its top `input_rank` eigen-directions
    scaled, F_k (in x p), and the rest's diagonal d_k; the server uses Ĝ_k = F_k F_k^T + diag(d_k)
    for G̃_k. ΔW's rank is at most Σ_k r_k: U = [U_1 … U_K], V_k = (Σ_j Ĝ_j)^-1 Ĝ_k V_k,
    solved by Woodbury's identity (no in x in matrix), re-factored at `rank` and folded into the
    base with a fresh adapter each round as FLoRA does (see the section's comment).

    Hence: identical updates give that update, whatever the moments; one client gives its update;
    updates whose row spaces lie in disjoint sets of input coordinates that only their own client
    excites give their sum; client order does not matter. Not linear. The summary is more than
    the factors reveal: the principal directions of a client's hidden states at every adapted
    layer (its prompts' statistics, not its tokens)."""

    name = "regmean"
    exact = True
    linear = False
    mutates_base = True
    reads_inputs = True
    options = ("rank", "input_rank", "alpha", "seed")

    def __init__(self, rank: int = 0, input_rank: int = 64, alpha: float = 0.9, seed: int = 0) -> None:
        if rank < 0:
            raise ValueError(f"rank must be 0 (exact) or positive, got {rank}")
        if input_rank < 1:
            raise ValueError(f"input_rank must be at least 1, got {input_rank}")
        if not 0 <= alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.rank, self.input_rank, self.alpha, self.seed = rank, input_rank, alpha, seed

    def summarize_inputs(self, moments: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for module, moment in moments.items():
            out[module + TOP_SUFFIX], out[module + DIAG_SUFFIX] = summarize_moment(moment, self.alpha, self.input_rank)
        return out

    def expected_inputs(self, current: Adapter) -> dict[str, torch.Tensor]:
        out = {}
        for m in lora_modules(current.tensors):
            width = current.tensors[m + A_SUFFIX].shape[1]
            out[m + TOP_SUFFIX] = torch.zeros(width, min(self.input_rank, width))
            out[m + DIAG_SUFFIX] = torch.zeros(width)
        return out

    def merged_factors(
        self, current: Adapter, updates: list[Update]
    ) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, float]]:
        """Module -> (U, V) with U V^T = s B A + the merged update, at the declared rank, float32."""
        out, budget = {}, RankBudget(self.rank)
        for m in lora_modules(current.tensors):
            pairs = [update_factors(current, u, m) for u in updates]
            summaries = [(u.inputs[m + TOP_SUFFIX], u.inputs[m + DIAG_SUFFIX]) for u in updates]
            q_u, q_v, cores = core_space([current_factors(current, m), regmean_solve(pairs, summaries)])
            out[m], _ = budget.factors(q_u, cores[0] + cores[1], q_v)
        return out, budget.figures()

    def aggregate(self, current, updates, state):
        factors, figures = self.merged_factors(current, updates)
        adapter, state = restart(current, state, self.seed)
        return Aggregation(adapter, densify(factors), state, figures, folded=factors)

    def bytes_up(self, adapter):
        return super().bytes_up(adapter) + tensor_bytes(self.expected_inputs(adapter))

    def bytes_down(self, adapter, num_clients):
        exact = adapter.spec.rank * max(num_clients, 1)
        return factor_bytes(adapter, exact if self.rank == 0 else min(self.rank, exact))


HELD = "held/"
"""Prefix of the tensors in a rule's state that it keeps between rounds, "held/<client>/<tensor>"
(the personal rule: each client's last uploaded factors); the checkpoint stores them apart from
the state's JSON."""


def held_adapters(state: dict) -> dict[str, dict[str, torch.Tensor]]:
    """Client -> the factors `state` holds for it (`HELD`)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if key.startswith(HELD):
            client, name = key[len(HELD) :].split("/", 1)
            out.setdefault(client, {})[name] = tensor
    return out


class PersonalOnSharedBase(Aggregator):
    """Each client keeps training its own adapter, as local training does, on a base model that
    all clients share and that the server moves by λ times the mean of the clients' adapters:

        client k's model = W_0 + s B_k A_k + (λ/N) Σ_j s B_j A_j   (N clients heard from so far)

    so its own update counts 1 + λ/N and each other client's λ/N: a fraction of what the others
    learnt is added to an environment's own update, never averaged over it. λ → 0 is local
    training; with λ = 1 the shared part is FLoRA's exact mean of the products. The client trains
    its adapter on the shared base it is evaluated on, so it can undo, round by round, what of
    the others' (or its own doubled) update hurts its environment.

    The server keeps each client's last upload (the state's `HELD` tensors, checkpointed) and folds
    the change of the shared part, (λ/N') Σ_j s B'_j A'_j − (λ/N) Σ_j s B_j A_j, exact through
    stacking (FLoRA's identity): factors of rank ≤ 2·K·r cross the wire, never a dense matrix.
    A client absent from a round keeps its last adapter in the mean. The global adapter is the
    initial one, which a client starts from until it has its own. Personalized: each environment
    is evaluated with its own client's adapter.

    From: FedDPA (Yang et al., NeurIPS 2024, arXiv 2403.19211: a global and a local LoRA per
    client) and APFL (Deng et al., 2020, arXiv 2003.13461: a personal model mixed with a global
    one), with the global part here the exact mean of the personal products rather than a
    separately trained adapter, so each client trains one adapter. Hence: one client gives its own
    adapter with the base moved by λ times it; identical adapters give every client
    (1 + λ)·s B A; client order does not matter. Not linear: the server needs each client's
    factors."""

    name = "personal"
    exact = True
    linear = False
    personalized = True
    mutates_base = True
    uploads_kept = True
    options = ("scale",)

    def __init__(self, scale: float = 1.0) -> None:
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.scale = scale

    def client_start(self, received, local):
        return received if local is None else local

    def aggregate(self, current, updates, state):
        before = held_adapters(state)
        after = {**before, **{u.client: self.upload(u.tensors) for u in updates}}
        moved = {u.client for u in updates} if len(after) == len(before) else set(after)
        terms = [(self.scale / len(after), after[c]) for c in sorted(moved)]
        terms += [(-self.scale / len(before), before[c]) for c in sorted(moved & set(before))]
        s, factors = current.scale, {}
        for m in lora_modules(current.tensors):
            factors[m] = (
                torch.cat([w * s * t[m + B_SUFFIX].double() for w, t in terms], 1).float(),
                torch.cat([t[m + A_SUFFIX].double().T for _, t in terms], 1).float(),
            )
        held = {f"{HELD}{c}/{k}": t for c, tensors in after.items() for k, t in tensors.items()}
        state = {**{k: v for k, v in state.items() if not k.startswith(HELD)}, **held}
        return Aggregation(current, densify(factors), state, folded=factors)

    def bytes_down(self, adapter, num_clients):
        return factor_bytes(adapter, 2 * adapter.spec.rank * max(num_clients, 1))


AGGREGATORS: dict[str, type[Aggregator]] = {
    cls.name: cls
    for cls in (
        FedSE,
        FedIT,
        FFALoRA,
        FedSALoRA,
        FLoRA,
        FedExLoRA,
        TrimmedMean,
        CoordinateMedian,
        LocalOnly,
        WeightSum,
        SubspaceMerge,
        RegMeanMerge,
        PersonalOnSharedBase,
    )
}


def make_aggregator(name: str, **options) -> Aggregator:
    """The aggregator `name`, given those of `options` it takes (`Aggregator.options`)."""
    if name not in AGGREGATORS:
        raise ValueError(f"unknown aggregator {name!r}; choose one of: {', '.join(AGGREGATORS)}")
    cls = AGGREGATORS[name]
    return cls(**{k: v for k, v in options.items() if k in cls.options})
