"""What the subspace merge does to real updates: the same round's client updates merged by the sum
and by the subspace rule (with and without its sign election), compared in weight space.

    .venv/bin/python bench/subspace_vs_sum.py results/table1-cpu-v2/fedse-sum/seed{0,1,2} \\
        --out results/bench/subspace-vs-sum.md

A run of the `sum` rule keeps, in its checkpoint's folded history, every round's clients'
updates exactly: a folding rule starts each round from B = 0, so the round's folded factors are
[ΔW_1 … ΔW_K] stacked (times λ). Each round's updates are split out of them and merged again by
`subspace_merge`, and per round the figures are: ‖Σ_k ΔW_k‖_F over every adapted layer; the mean
pairwise cosine of the ΔW_k; the subspace merge's norm over the sum's and its distance from the sum
over the sum's norm, with the election and without; and its `shared_energy` (the share on
directions held by more than 1.5 clients). With `--check` the round-1 merge is also compared with
the first round folded by a subspace run of the same seed, which played that round from the same
start (so its updates were these): the relative distance should be float32 rounding (≤ 1e-6).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from datetime import date
from pathlib import Path

import torch

from fedse.agent.dtype import cpu_model
from fedse.errors import UserError
from fedse.experiments.store import RunStore
from fedse.fl.aggregators import core_space, subspace_merge

Factors = dict[str, tuple[torch.Tensor, torch.Tensor]]


def square_norm(u: torch.Tensor, v: torch.Tensor) -> float:
    """‖U V^T‖_F² from the factors alone: trace((U^T U)(V^T V))."""
    u, v = u.double(), v.double()
    return float(((u.T @ u) * (v.T @ v)).sum())


def rounds_of(run: Path) -> tuple[list[Factors], int, float]:
    """A finished sum run's folded rounds, its LoRA rank and its λ; UserError for anything else."""
    store = RunStore(run)
    config = store.read_config()
    if config["fed"]["aggregator"] != "sum":
        raise UserError(f"{run} ran the {config['fed']['aggregator']!r} rule; give runs of the 'sum' rule")
    last = store.last_round()
    history = store.load_checkpoint(last).folded if last else None
    if not history:
        raise UserError(f"{run} has no folded round in its last checkpoint; give a run with a finished round")
    return history, int(config["model"]["lora_rank"]), float(config["fed"].get("merge_scale", 1.0))


def updates(u: torch.Tensor, v: torch.Tensor, rank: int, scale: float) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One layer's folded sum [λ U_1 … λ U_K], [V_1 … V_K] split back into the clients' (U_k, V_k), float64."""
    return [
        (u[:, k * rank : (k + 1) * rank].double() / scale, v[:, k * rank : (k + 1) * rank].double())
        for k in range(u.shape[1] // rank)
    ]


def compare(factors: Factors, rank: int, scale: float) -> dict[str, float]:
    """The module docstring's figures for one round."""
    total = {"sum": 0.0, "elect": 0.0, "elect_gap": 0.0, "plain": 0.0, "plain_gap": 0.0, "shared": 0.0}
    clients = 0
    gram = None
    for u, v in factors.values():
        pairs = updates(u, v, rank, scale)
        clients = len(pairs)
        _, _, cores = core_space(pairs)  # Q_u, Q_v have orthonormal columns: norms are the cores'
        summed = sum(cores)
        elected, figures = subspace_merge(cores, elect=True)
        plain, _ = subspace_merge(cores, elect=False)
        energy = float(elected.square().sum())
        total["sum"] += float(summed.square().sum())
        total["elect"] += energy
        total["elect_gap"] += float((elected - summed).square().sum())
        total["plain"] += float(plain.square().sum())
        total["plain_gap"] += float((plain - summed).square().sum())
        total["shared"] += figures["shared_energy"] * energy
        flat = torch.stack([c.flatten() for c in cores])
        gram = flat @ flat.T if gram is None else gram + flat @ flat.T
    norm = total["sum"] ** 0.5
    norms = gram.diagonal().sqrt()
    cosines = [float(gram[j, k] / (norms[j] * norms[k])) for j in range(clients) for k in range(j + 1, clients)]
    return {
        "clients": clients,
        "sum_norm": norm,
        "cosine": statistics.fmean(cosines),
        "elect_ratio": total["elect"] ** 0.5 / norm,
        "elect_gap": total["elect_gap"] ** 0.5 / norm,
        "plain_ratio": total["plain"] ** 0.5 / norm,
        "plain_gap": total["plain_gap"] ** 0.5 / norm,
        "shared_energy": total["shared"] / total["elect"] if total["elect"] else 0.0,
    }


def check(factors: Factors, rank: int, scale: float, subspace_run: Path) -> float:
    """‖round-1 subspace merge recomputed − the one `subspace_run` folded‖ / ‖the latter‖."""
    store = RunStore(subspace_run)
    folded = store.load_checkpoint(store.last_round()).folded
    if store.read_config()["fed"]["aggregator"] != "subspace" or not folded:
        raise UserError(f"{subspace_run} is not a subspace run with a folded round")
    gap = norm = 0.0
    for module, (u, v) in factors.items():
        q_u, q_v, cores = core_space(updates(u, v, rank, scale))
        merged, _ = subspace_merge(cores, elect=True)
        their_u, their_v = folded[0][module]
        gap += square_norm(torch.cat([q_u @ merged, -their_u.double()], 1), torch.cat([q_v, their_v.double()], 1))
        norm += square_norm(their_u, their_v)
    return max(gap, 0.0) ** 0.5 / norm**0.5  # the trace form loses ~1e-16 of ‖·‖²: distances below ~1e-8 read as 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="finished runs of the sum rule")
    parser.add_argument("--check", type=Path, nargs="*", default=[], help="subspace runs of the same seeds, in order")
    parser.add_argument("--out", type=Path, help="markdown file to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    lines = [
        "| run | round | clients | ‖Σ ΔW_k‖ | mean cosine | subspace / sum | ‖subspace − sum‖ / ‖sum‖ "
        "| no election / sum | ‖no election − sum‖ / ‖sum‖ | shared energy |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    try:
        for i, run in enumerate(args.runs):
            history, rank, scale = rounds_of(run)
            for round_, factors in enumerate(history, 1):
                f = compare(factors, rank, scale)
                lines.append(
                    f"| {run} | {round_} | {f['clients']} | {f['sum_norm']:.2f} | {f['cosine']:+.3f} | "
                    f"{f['elect_ratio']:.3f} | {f['elect_gap']:.3f} | {f['plain_ratio']:.3f} | {f['plain_gap']:.3f} | "
                    f"{f['shared_energy']:.3f} |"
                )
            if i < len(args.check):
                checks.append(f"- round 1 of {run} recomputed against {args.check[i]}: relative distance "
                              f"{check(history[0], rank, scale, args.check[i]):.1e}")  # fmt: skip
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    command = " ".join(["bench/subspace_vs_sum.py", *sys.argv[1:]])
    text = f"<!-- .venv/bin/python {command}\n     {cpu_model()}, {date.today()} -->\n\n" + "\n".join(lines)
    text += "\n" + ("\n" + "\n".join(checks) + "\n" if checks else "")
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
