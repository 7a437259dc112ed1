"""The methods an experiment compares, each defined once: a name, its definition, and the
configuration it is (`--set` overrides on the experiment's base configuration).

The paper's baselines (Fed-SE §5.1: Pre-Trained, Local, Centralized, FedIT, all on the static
expert data), Fed-SE and its ablations (§6), and what the paper does not run: the online
variants of Local and Centralized, the other aggregators under the Fed-SE loop, and a server
learning rate. "Static" means no exploration (`explore.tasks = 0`): every round trains on the
expert seeds only, for the same number of rounds and epochs as Fed-SE.
"""

from __future__ import annotations

from dataclasses import dataclass

STATIC = "explore.tasks=0"


@dataclass(frozen=True)
class Method:
    name: str
    definition: str
    overrides: tuple[str, ...] = ()


METHODS: dict[str, Method] = {
    m.name: m
    for m in [
        Method("pretrained", "the base model untrained (round 0 only)", ("fed.rounds=0", "eval.first=true")),
        Method(
            "local-static",
            "each client fine-tunes on its own expert data, no server; each env is evaluated with its own client's adapter",
            ("fed.aggregator='local'", STATIC),
        ),
        Method(
            "centralized-static",
            "one adapter trained on the pooled expert data of every environment (not private)",
            ("fed.centralized=true", STATIC),
        ),
        Method(
            "fedit-static",
            "federated LoRA on the static expert data with FedIT's example-weighted mean of A and B",
            ("fed.aggregator='fedit'", STATIC),
        ),
        Method(
            "fedse",
            "Fed-SE: explore, keep successes, cumulative buffer, unweighted mean of A and B",
        ),
        Method(
            "local-online",
            "each client self-evolves alone (Fed-SE's client loop, no aggregation)",
            ("fed.aggregator='local'",),
        ),
        Method(
            "centralized-online",
            "one adapter explores every environment and trains on the pooled successes (not private)",
            ("fed.centralized=true",),
        ),
        Method(
            "fedse-no-filter",
            "Fed-SE training on every explored trajectory, failed ones too",
            ("explore.filter='none'",),
        ),
        Method(
            "fedse-no-history",
            "Fed-SE training each round on that round's successes only (no buffer)",
            ("buffer.history=false",),
        ),
        Method(
            "fedse-weighted",
            "Fed-SE with the mean weighted by each client's successful trajectories (its training set: "
            "expert seeds and kept successes), i.e. FedIT's rule",
            ("fed.aggregator='fedit'",),
        ),
        *[
            Method(f"fedse-{a}", f"the Fed-SE loop with the {a} aggregator", (f"fed.aggregator='{a}'",))
            for a in ("ffa", "flora", "fedex", "trimmed", "median")
        ],
        Method(
            "fedse-fedsa",
            "the Fed-SE loop with the fedsa aggregator; personalized: each environment is evaluated with its own "
            "client's adapter (the shared A, that client's B)",
            ("fed.aggregator='fedsa'",),
        ),
        Method(
            "fedse-sum",
            "the Fed-SE loop with the weight-space sum of the clients' updates (task arithmetic, λ = 1), "
            "exact through stacked factors, folded into the base",
            ("fed.aggregator='sum'",),
        ),
        Method(
            "fedse-subspace",
            "the Fed-SE loop with the subspace merge: each direction of the clients' updates averaged over "
            "the clients that hold it (shared: a sign-elected consensus; one client's: full strength), "
            "exact at rank K·r, folded into the base",
            ("fed.aggregator='subspace'",),
        ),
        Method(
            "fedse-regmean",
            "the Fed-SE loop with RegMean on the round's updates: the update that best reproduces each "
            "client's own on that client's layer inputs (each client sends a rank-64-plus-diagonal summary "
            "of its inputs' second moment), exact at rank K·r, folded into the base",
            ("fed.aggregator='regmean'",),
        ),
        Method(
            "fedse-personal",
            "the Fed-SE loop with personal adapters on a shared base: each client keeps training its own "
            "adapter and the server folds the exact mean of the clients' adapters into the base they share; "
            "personalized: each environment is evaluated with its own client's adapter",
            ("fed.aggregator='personal'",),
        ),
        Method(
            "fedse-subspace-no-election",
            "the subspace merge without its sign election: shared directions plainly averaged",
            ("fed.aggregator='subspace'", "fed.merge_elect=false"),
        ),
        Method(
            "fedse-subspace-rank8",
            "the subspace merge truncated to rank 8 (the clients' rank r) instead of K·r",
            ("fed.aggregator='subspace'", "fed.merge_rank=8"),
        ),
        Method(
            "fedse-server-lr2",
            "Fed-SE with a server learning rate of 2 (global += 2 × mean update)",
            ("fed.server_lr=2.0",),
        ),
        Method(
            "fedse-fedavgm",
            "Fed-SE with server momentum 0.9 on the mean update (FedAvgM, Hsu et al. 2019), server lr 1",
            ("fed.server_optimizer='momentum'",),
        ),
        Method(
            "fedse-fedadam",
            "Fed-SE with FedAdam on the mean update (Reddi et al. 2021): lr 3e-3, betas 0.9/0.99, eps 1e-3 (not tuned)",
            ("fed.server_optimizer='adam'", "fed.server_lr=0.003"),
        ),
    ]
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose from: {', '.join(METHODS)}")
    return METHODS[name]
