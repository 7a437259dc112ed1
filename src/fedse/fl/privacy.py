"""Differential privacy of a federation's rounds (`[privacy]`): clipping, Gaussian noise, accounting.

The mechanism is DP-FedAvg's (McMahan et al., "Learning Differentially Private Recurrent
Language Models", ICLR 2018). Each client's round update, the difference between the factors it
uploads and the global ones, is clipped to norm C (`fedse.fl.update.bound_update`, the same
clipping the server's norm bound uses); then Gaussian noise of standard deviation σ·C is added

- `central`: by the server, to the sum of the clipped updates, i.e. N(0, (σC/K)²) on each entry of
  the mean over the K clients that reported (the server sees individual updates: it is trusted);
- `local`: by each client to its own clipped update before it sends it (the server is not
  trusted; every rule that only reads the uploaded factors is post-processing of the noisy ones).

**The unit of privacy is one client's whole round of data** (user-level DP with respect to what
the client sends, or for `central` to the released global adapter): changing every trajectory of
one client changes what it contributes by at most C. It is not per-trajectory DP; local training
is plain SFT, not DP-SGD.

The accountant is Rényi DP (Mironov, 2017) for the Gaussian mechanism composed over rounds,
converted to (ε, δ) with Balle et al.'s bound (2020), computed by Opacus over the integer orders
2..128. No amplification by sampling is claimed (q = 1): fedse's client sample is seeded and
recorded in the run's metrics, so it is not secret.

The noise is drawn from a generator seeded by a secret (`PrivateSeed`) kept beside the party
that adds it (the client's folder, or the server's run folder for `central`) and never sent:
reproducible across a crash and resume, unknowable to anyone who holds only the configuration.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Literal

import torch
from pydantic import Field

from fedse.files import atomic_write_text
from fedse.fl.aggregators import Aggregation, Aggregator
from fedse.fl.update import Update, bound_update
from fedse.sections import Section

ORDERS = tuple(range(2, 129))
"""The Rényi orders the accountant minimises over."""
SECRET_FILE = "dp_secret"
CLIP_MARGIN = 1e-6


class PrivacySection(Section):
    """The `[privacy]` section: differential privacy of what crosses the boundary."""

    dp: Literal["off", "central", "local"] = "off"
    """off; central: the server clips every update and noises their mean; local: each client clips
    and noises its own update before sending it."""
    clip: float = Field(1.0, gt=0)
    """C: the bound on ‖a client's uploaded factors − the global ones‖_F."""
    noise_multiplier: float = Field(1.0, gt=0)
    """σ: the noise's standard deviation is σ·C on a client's update (local) or on the sum (central)."""
    delta: float = Field(1e-5, gt=0, lt=1)
    """δ of the (ε, δ) the accountant reports."""
    secagg: bool = False
    """Flower runtime only: clients mask their uploads with SecAgg+, so the server learns only
    their mean (`fedse.flower.secagg`); for rules that need nothing else."""
    secagg_range: float = Field(8.0, gt=0, le=1e3)
    """Largest |entry| of an upload SecAgg+ quantises (to 2²² levels over ±range); a client with a
    larger one drops out of the round rather than be clipped."""


def dp_refusal(rule: type[Aggregator], mode: str) -> str | None:
    """Why `rule` cannot run under `mode` (None: it can), from the properties the rule declares."""
    if mode == "off":
        return None
    if not rule.uploads:
        return "nothing leaves a client under this rule, so there is nothing to make private"
    if rule.reads_inputs:
        return "its clients also send summaries of their layer inputs, which this mechanism does not privatise"
    if mode == "local" and rule.uploads_kept:
        return (
            "a client uploads its whole kept adapter, not the received one plus this round's move, so the "
            "clip on that move does not bound what the upload reveals"
        )
    if mode == "central" and not rule.linear:
        return "its server needs each client's update, not only their sum, so noise on the sum does not cover it"
    if mode == "central" and rule.weights_by_examples:
        return "it weights clients by their example counts, so one client's influence on the mean is not bounded by C"
    return None


def secagg_refusal(rule: type[Aggregator], dp: str) -> str | None:
    """Why `rule` (under DP mode `dp`) cannot run with secure aggregation (None: it can)."""
    if not rule.uploads:
        return "nothing leaves a client under this rule, so there is nothing to aggregate"
    if not rule.linear:
        return "its server needs each client's update, not only their mean"
    if rule.reads_inputs:
        return "its server reads each client's summary of its layer inputs"
    if rule.weights_by_examples:
        return (
            "it weights clients by their example counts, and SecAgg+ scales an update by its weight before "
            "quantising it, which costs a small client's update its precision"
        )
    if dp == "central":
        return "central DP clips each update on the server, which secure aggregation hides from it (use dp = 'local')"
    return None


def clip_update(update: Update, current: dict[str, torch.Tensor], clip: float) -> tuple[Update, float]:
    """`update` with ‖uploaded − global‖_F ≤ `clip`, and its norm before clipping. It aims a
    millionth inside the bound so that rounding the result to the factors' dtype stays within it
    (the sensitivity the noise is calibrated to)."""
    return bound_update(update, current, clip * (1 - CLIP_MARGIN), "clip")


def gaussian(like: dict[str, torch.Tensor], std: float, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """N(0, std²) noise shaped like each tensor of `like`, drawn in float64 in key order."""
    return {k: torch.randn(t.shape, generator=generator, dtype=torch.float64) * std for k, t in sorted(like.items())}


def privatize_update(
    update: Update, current: dict[str, torch.Tensor], section: PrivacySection, generator: torch.Generator
) -> Update:
    """Local DP: the client's update clipped to C, then N(0, (σC)²) added to every uploaded entry."""
    clipped, _ = clip_update(update, current, section.clip)
    noise = gaussian(clipped.tensors, section.noise_multiplier * section.clip, generator)
    tensors = {k: (t.double() + noise[k]).to(t.dtype) for k, t in clipped.tensors.items()}
    return replace(clipped, tensors=tensors)


def noise_aggregation(
    aggregation: Aggregation, keys: list[str], clients: int, section: PrivacySection, generator: torch.Generator
) -> Aggregation:
    """Central DP: N(0, (σC/K)²) added to the aggregated factors `keys` (the mean over K clipped updates)."""
    tensors = dict(aggregation.adapter.tensors)
    std = section.noise_multiplier * section.clip / max(clients, 1)
    noise = gaussian({k: tensors[k] for k in keys}, std, generator)
    for k in keys:
        tensors[k] = (tensors[k].double() + noise[k]).to(tensors[k].dtype)
    return replace(aggregation, adapter=replace(aggregation.adapter, tensors=tensors))


def epsilon(noise_multiplier: float, rounds: int, delta: float, sample_rate: float = 1.0) -> float:
    """ε after `rounds` compositions of the (subsampled) Gaussian mechanism of multiplier σ, at δ."""
    if rounds <= 0:
        return 0.0
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    rdp = compute_rdp(q=sample_rate, noise_multiplier=noise_multiplier, steps=rounds, orders=list(ORDERS))
    eps, _ = get_privacy_spent(orders=list(ORDERS), rdp=rdp, delta=delta)
    return float(eps)


class PrivateSeed:
    """A secret that seeds one party's noise: 32 random bytes in `<folder>/dp_secret`, made on
    first use and never sent anywhere."""

    def __init__(self, folder: str | Path) -> None:
        path = Path(folder) / SECRET_FILE
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, secrets.token_hex(32))
        self.secret = path.read_text().strip()

    def generator(self, *labels: object) -> torch.Generator:
        """A generator for the draw `labels` name (e.g. round and client): the same on a resumed run."""
        digest = hashlib.sha256(":".join([self.secret, *map(str, labels)]).encode()).digest()
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
