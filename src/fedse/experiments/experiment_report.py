"""The experiment report: the paper's Table 1 over methods x seeds, the paired bootstrap of
a reference method (Fed-SE unless the experiment names another) against every other method, what exploration found round by round, learning curves with
bands, and what each method cost.

Units of uncertainty: a (seed, environment, test task) triple. A method's interval resamples
its triples; a comparison resamples the triples both methods played (paired: the same seed
and task on both sides), so the task-to-task variation that both share cancels. Both resample
in two stages, as the triples were made: seeds first, then the triples within each drawn seed
(`clustered_bootstrap`), because the triples of one seed share one trained model.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from fedse.experiments.records import RunRecords
from fedse.experiments.store import ExperimentStore, RunStore
from fedse.files import atomic_write_text
from fedse.fl.aggregators import AGGREGATORS

BOOTSTRAP_SAMPLES = 10_000


def clustered_bootstrap(
    units: dict[tuple, float], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """(mean over the units, 2.5th, 97.5th percentile) of that mean under a two-stage resampling:
    draw as many seeds (a unit key's first element) as there are, with replacement, then for each
    drawn seed as many of its units as it has, with replacement; each draw is a fresh one.

    The units of one seed were all played by one trained model, so they are not independent:
    resampling them flat treats seed-to-seed variation as if it averaged out over tasks, and the
    interval is too narrow when seeds disagree. With one seed this is the flat bootstrap."""
    if not units:
        raise ValueError("bootstrap of no values")
    by_seed: dict = {}
    for key in sorted(units):
        by_seed.setdefault(key[0], []).append(float(units[key]))
    groups = [torch.tensor(v, dtype=torch.float64) for v in by_seed.values()]
    counts = torch.tensor([len(g) for g in groups], dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    drawn = torch.randint(len(groups), (samples, len(groups)), generator=gen)  # the seeds of each resample
    total = torch.zeros(samples, dtype=torch.float64)
    for slot in range(len(groups)):
        for i, g in enumerate(groups):  # the resamples that drew seed i in this slot draw its units
            rows = (drawn[:, slot] == i).nonzero().squeeze(1)
            total[rows] += g[torch.randint(len(g), (len(rows), len(g)), generator=gen)].sum(1)
    means = total / counts[drawn].sum(1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return float(torch.cat(groups).mean()), lo, hi


def paired_bootstrap(
    ours: dict[tuple, int], theirs: dict[tuple, int], samples: int = BOOTSTRAP_SAMPLES, seed: int = 0
) -> tuple[float, float, float, int]:
    """Mean of ours − theirs over the units both have, its 95 % interval (`clustered_bootstrap`),
    and the number of units. Units are keys such as (seed, env, task)."""
    common = sorted(ours.keys() & theirs.keys())
    if not common:
        raise ValueError("the two methods share no (seed, env, task) unit to compare")
    mean, lo, hi = clustered_bootstrap({k: ours[k] - theirs[k] for k in common}, samples, seed)
    return mean, lo, hi, len(common)


@dataclass
class SeedResult:
    """One run's last evaluated round."""

    method: str
    seed: int
    run: RunRecords
    round: int
    per_env: dict[str, tuple[int, int]]
    """env -> (successes, tasks)."""
    outcomes: dict[tuple, int]
    """(seed, env, task) -> 1/0; empty for runs written before per-task outcomes were kept."""

    @classmethod
    def of(cls, method: str, seed: int, root: Path) -> SeedResult:
        run = RunStore(root).load()
        round_ = max(run.rounds)
        evals = run.round(round_).evals
        outcomes = {}
        for e in evals:
            outcomes |= {(seed, e.env, t): s for t, s in zip(e.task_ids, e.task_successes, strict=True)}
        return cls(method, seed, run, round_, {e.env: (e.successes, e.tasks) for e in evals}, outcomes)

    def cost(self) -> dict[str, float]:
        run = self.run
        seconds = sum(r.seconds for r in run.eval_avg) + sum(r.seconds for r in run.explore)
        # a client's compute includes the input summary an input-aware rule asks of it (RegMean)
        seconds += sum(r.train_seconds + (r.inputs_seconds or 0.0) for r in run.client)
        sent = sum(sum(a.bytes_up) + a.bytes_down * a.clients for a in run.aggregate)
        return {"minutes": seconds / 60, "train_tokens": sum(r.train_tokens for r in run.client), "mb": sent / 1e6}


def exploration(results: list[SeedResult]) -> str:
    """Successful episodes / episodes explored per round, summed over seeds, e.g.
    "r2 9/54 · r3 14/54" ("–" for a method that never explores)."""
    found: dict[int, list[int]] = {}
    for r in results:
        for c in r.run.client:
            if c.explored:
                tally = found.setdefault(c.round, [0, 0])
                tally[0] += round(c.explore_success * c.explored)
                tally[1] += c.explored
    return " · ".join(f"r{k} {s}/{n}" for k, (s, n) in sorted(found.items())) or "–"


def aggregation(results: list[SeedResult]) -> str | None:
    """What the server saw, over every aggregated round of every seed: the mean pairwise cosine of
    the clients' updates; for the subspace merge, its share of the merged energy on directions two
    or more clients hold and its distance from the plain sum (rounds that recorded it), and None
    for a method without a server step."""
    rounds = [a for r in results for a in r.run.aggregate if a.update_cosine]
    if not rounds:
        return None
    cosines = [v for a in rounds for i, row in enumerate(a.update_cosine) for j, v in enumerate(row) if i != j]
    text = f"cosine {statistics.fmean(cosines):+.3f} [{min(cosines):+.3f}, {max(cosines):+.3f}]" if cosines else "–"
    for key, label in (("shared_energy", "shared energy"), ("from_sum", "from the sum")):
        figures = [a.merge[key] for a in rounds if key in a.merge]
        if figures:
            text += f"; {label} {statistics.fmean(figures):.3f} [{min(figures):.3f}, {max(figures):.3f}]"
    return text


def evaluated_with(results: list[SeedResult]) -> str:
    """'personal' when the method's rule keeps an adapter on each client and every environment was
    evaluated with its own client's (local, fedsa), 'global' when one adapter served them all."""
    for r in results:
        rule = AGGREGATORS.get(r.run.config.get("fed", {}).get("aggregator", ""))
        if rule is not None and rule.personalized and r.round > 0:
            return "personal"
    return "global"


def machines(method_dir: Path, results: list[SeedResult]) -> str:
    """The machines a method's seeds ran on, e.g. "Xeon (bfloat16) ×3" ("not recorded": a run
    from before machine.jsonl was kept)."""
    seen: dict[str, int] = {}
    for r in results:
        records = RunStore(method_dir / f"seed{r.seed}").sittings()
        names = dict.fromkeys(f"{m['cpu']} ({m['dtype']})" for m in records) or {"not recorded": None}
        for name in names:
            seen[name] = seen.get(name, 0) + 1
    return "; ".join(f"{name} ×{n}" for name, n in seen.items())


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _cell(per_seed: list[float], units: dict[tuple, int]) -> str:
    mean = statistics.fmean(per_seed)
    std = statistics.stdev(per_seed) if len(per_seed) > 1 else 0.0
    if not units:
        return f"{_pct(mean)} ± {_pct(std)}"
    _, lo, hi = clustered_bootstrap(units)
    return f"{_pct(mean)} ± {_pct(std)} [{_pct(lo)}, {_pct(hi)}]"


def collect(root: Path, seeds: dict[str, list[int]]) -> dict[str, list[SeedResult]]:
    """method -> the results of its finished seeds (unfinished ones are left out)."""
    out: dict[str, list[SeedResult]] = {}
    cells = ExperimentStore(root)
    for m in seeds:
        found = []
        for s in seeds[m]:
            if cells.status(m, s) == "done":
                found.append(SeedResult.of(m, s, cells.cell(m, s)))
        if found:
            out[m] = found
    return out


def experiment_report(
    root: Path, seeds: dict[str, list[int]], definitions: dict[str, str], references: list[str] = ("fedse",)
) -> Path:
    """Write `root/report.md` and `root/curves.png` from the runs under `root` (method -> its
    seeds); the paired bootstrap compares each of `references` with every other method. Returns
    the report."""
    results = collect(root, seeds)
    if not results:
        raise FileNotFoundError(f"{root} holds no evaluated run of {', '.join(seeds)} yet")
    envs = list(dict.fromkeys(e for rs in results.values() for r in rs for e in r.per_env))
    lines = [
        f"# Experiment {root.name}",
        "",
        "Test success (%) after each finished run's last round (unfinished runs are left out): mean over seeds ± their standard deviation "
        "[95 % bootstrap interval: seeds resampled, then test tasks within each]; Avg is weighted by test tasks (Fed-SE's). "
        "Adapter: global (one adapter evaluated on every environment) or personal (each environment evaluated with "
        "the adapter its own client kept).",
        "",
        "| method | seeds | adapter | " + " | ".join(envs) + " | Avg |",
        "|---|---|---|" + "---|" * (len(envs) + 1),
    ]
    for m, rs in results.items():
        cells = []
        for env in envs:
            per_seed = [r.per_env[env][0] / r.per_env[env][1] for r in rs if env in r.per_env]
            units = {k: v for r in rs for k, v in r.outcomes.items() if k[1] == env}
            cells.append(_cell(per_seed, units) if per_seed else "–")
        avg = [sum(s for s, _ in r.per_env.values()) / sum(t for _, t in r.per_env.values()) for r in rs]
        cells.append(_cell(avg, {k: v for r in rs for k, v in r.outcomes.items()}))
        lines.append(f"| {m} | {len(rs)} | {evaluated_with(rs)} | " + " | ".join(cells) + " |")
    for reference in references:
        if reference not in results:
            continue
        ours = {k: v for r in results[reference] for k, v in r.outcomes.items()}
        lines += [
            "",
            f"{reference} − method (points), paired over the (seed, test task) units both played, "
            f"95 % percentile interval of {BOOTSTRAP_SAMPLES:,} bootstrap resamples (seeds resampled, then the "
            "units within each), on Avg and per environment:",
            "",
            f"| method | {reference} − method | 95 % interval | units | " + " | ".join(envs) + " |",
            "|---|---|---|---|" + "---|" * len(envs),
        ]
        for m, rs in results.items():
            theirs = {k: v for r in rs for k, v in r.outcomes.items()}
            if m == reference or not ours or not theirs or not ours.keys() & theirs.keys():
                continue
            mean, lo, hi, n = paired_bootstrap(ours, theirs)
            per_env = []
            for env in envs:
                mine = {k: v for k, v in ours.items() if k[1] == env}
                other = {k: v for k, v in theirs.items() if k[1] == env}
                if mine.keys() & other.keys():
                    d, a, b, _ = paired_bootstrap(mine, other)
                    per_env.append(f"{100 * d:+.1f} [{100 * a:+.1f}, {100 * b:+.1f}]")
                else:
                    per_env.append("–")
            lines.append(
                f"| {m} | {100 * mean:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] | {n} | " + " | ".join(per_env) + " |"
            )
    lines += [
        "",
        "Exploration: successful episodes / episodes explored at temperature 1.0 on train tasks, "
        "per round, summed over seeds (what self-evolution has to learn from):",
        "",
        "| method | successes / explored |",
        "|---|---|",
    ]
    lines += [f"| {m} | {exploration(rs)} |" for m, rs in results.items()]
    seen = {m: text for m, rs in results.items() if (text := aggregation(rs))}
    if seen:
        lines += [
            "",
            "Aggregation: the clients' updates as the server saw them, over every aggregated round and seed: "
            "mean pairwise cosine [min, max]; for the subspace merge, the share of the merged update's energy "
            "on directions two or more clients hold [min, max] (0: every direction passed as one client's) and, "
            "in the runs that recorded it, ‖merge − sum of the updates‖ / ‖sum‖ [min, max]:",
            "",
            "| method | updates |",
            "|---|---|",
        ]
        lines += [f"| {m} | {text} |" for m, text in seen.items()]
    lines += [
        "",
        "Cost per run (mean over seeds): wall time of exploration, training (with the clients' input "
        "summaries, for a rule that reads inputs) and evaluation; tokens "
        "trained; adapter bytes sent and received; the machines the runs ran on (minutes compare only "
        "within one machine).",
        "",
        "| method | minutes | tokens trained | MB communicated | ran on (CPU, base dtype) × seeds |",
        "|---|---|---|---|---|",
    ]
    for m, rs in results.items():
        costs = [r.cost() for r in rs]
        mean = {k: statistics.fmean(c[k] for c in costs) for k in costs[0]}
        ran_on = machines(root / m, rs)
        lines.append(f"| {m} | {mean['minutes']:.1f} | {mean['train_tokens']:,.0f} | {mean['mb']:.1f} | {ran_on} |")
    lines += ["", "Methods:", ""] + [f"- `{m}`: {definitions[m]}" for m in results]
    lines += ["", "![Avg per round](curves.png)", ""]
    _plot_curves(results, root / "curves.png")
    out = root / "report.md"
    atomic_write_text(out, "\n".join(lines))
    return out


def _plot_curves(results: dict[str, list[SeedResult]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Runs that leave round 0 to the pretrained cell (eval.first = false) start from its score.
    start = None
    if "pretrained" in results:
        pooled = [r.run.round(0).pooled() for r in results["pretrained"] if 0 in r.run.rounds]
        start = statistics.fmean(s / n for s, n in pooled) if pooled else None
    fig, ax = plt.subplots(figsize=(7, 4))
    for m, rs in results.items():
        rounds = sorted(set.intersection(*(set(r.run.rounds) for r in rs)))
        curves = [[r.run.round(t).pooled() for t in rounds] for r in rs]
        values = torch.tensor([[s / n for s, n in c] for c in curves], dtype=torch.float64) * 100
        if start is not None and m != "pretrained" and rounds and rounds[0] > 0:
            rounds = [0, *rounds]
            values = torch.cat([torch.full((len(rs), 1), 100 * start, dtype=torch.float64), values], 1)
        if len(rounds) == 1:
            ax.axhline(float(values.mean()), linestyle="--", linewidth=1, label=m)
            continue
        (line,) = ax.plot(rounds, values.mean(0), marker="o", label=m)
        ax.fill_between(rounds, values.min(0).values, values.max(0).values, alpha=0.15, color=line.get_color())
    ax.set_xlabel("round")
    ax.set_ylabel("test Avg (%)  (band: min-max over seeds)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
