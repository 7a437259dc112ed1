"""`fedse report`: report.md and PNG plots from one or more runs' metrics.jsonl.

Every figure in the report is read from the runs' records; nothing is recomputed except the
95 % Wilson score intervals on success rates (Wilson, 1927), which suit the small eval sets
of a demo (they stay inside [0, 1] and are not degenerate at 0 or n successes).
Several runs are overlaid in the same plots, one line per run.
"""

from __future__ import annotations

import math
from pathlib import Path

from fedse.experiments.records import AggregateRecord, ClientRecord, RoundRecords, RunRecords
from fedse.experiments.store import RunStore


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval for a binomial rate.

    >>> [round(x, 3) for x in wilson(0, 10)]
    [0.0, 0.278]
    >>> [round(x, 3) for x in wilson(5, 10)]
    [0.237, 0.763]
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def load_run(root: str | Path) -> RunRecords:
    return RunStore(root).load()


# --- markdown ----------------------------------------------------------------------------------


def _rate(successes: int, n: int) -> str:
    lo, hi = wilson(successes, n)
    return f"{successes}/{n} = {successes / n:.0%} [{lo:.0%}, {hi:.0%}]" if n else "–"


def _success_table(run: RunRecords) -> list[str]:
    envs = run.envs
    lines = [
        "| round | " + " | ".join(envs) + " | Avg (task-weighted) | mean over envs "
        "| exploration successes added | explore / train / eval s |",
        "|---:|" + "---|" * len(envs) + "---|---:|---|---|",
    ]
    for round_ in sorted({r.round for r in [*run.eval_avg, *run.explore, *run.aggregate]}):
        this = run.round(round_)
        cells = [_rate(r.successes, r.tasks) if (r := this.eval_of(env)) else "–" for env in envs]
        avg = this.eval_avg
        added = ", ".join(f"{c.client} {c.added}" for c in this.clients if c.added) or ("none" if this.clients else "–")
        explore = this.explore.seconds if this.explore else 0.0
        train = sum(c.train_seconds for c in this.clients)
        pooled, mean, seconds = (
            ("–", "–", 0.0) if avg is None else (_rate(*this.pooled()), f"{avg.avg_mean:.1%}", avg.seconds)
        )
        lines.append(
            f"| {round_} | " + " | ".join(cells) + f" | {pooled} | {mean} "
            f"| {added} | {explore:.0f} / {train:.0f} / {seconds:.0f} |"
        )
    return lines


def _loss(loss: float | None) -> str:
    return "–" if loss is None else f"{loss:.3f}"


def _client_table(run: RunRecords) -> list[str]:
    lines = [
        "| round | client | explored | explore success | kept | buffer | train examples | train loss | explore tokens | train s |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in run.client:
        lines.append(
            f"| {r.round} | {r.client} | {r.explored} | {r.explore_success:.0%} | {r.kept} | {r.buffer} "
            f"| {r.train_examples} | {_loss(r.train_loss)} | {r.explore_tokens} | {r.train_seconds:.0f} |"
        )
    return lines


def _mean_off_diagonal(matrix: list[list[float]]) -> float:
    values = [v for i, row in enumerate(matrix) for j, v in enumerate(row) if i != j]
    return sum(values) / len(values) if values else float("nan")


def _aggregate_table(run: RunRecords) -> list[str]:
    lines = [
        "| round | accepted | inexactness | mean pairwise update cosine | MB up (all clients) | MB down (per client) |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    wire = {r.round: r for r in run.wire if r.phase == "train"}
    if wire:  # a Flower run: what its messages measured, beside the adapter's nominal size
        lines[0] += " wire MB up (all) | wire MB down (all) | dropped |"
        lines[1] += "---:|---:|---|"
    for r in run.aggregate:
        inexact = f"{r.inexactness:.4f}" if r.inexactness is not None else "–"
        cosine = f"{_mean_off_diagonal(r.update_cosine):.3f}" if r.update_cosine else "–"
        line = (
            f"| {r.round} | {len(r.accepted)} | {inexact} | {cosine} "
            f"| {sum(r.bytes_up) / 1e6:.1f} | {r.bytes_down / 1e6:.1f} |"
        )
        if wire:
            w = wire.get(r.round)
            dropped = ", ".join(f"{c} ({why})" for c, why in w.dropped.items()) if w else ""
            up, down = (sum(w.up.values()) / 1e6, sum(w.down.values()) / 1e6) if w else (0.0, 0.0)
            line += f" {up:.2f} | {down:.2f} | {dropped or '–'} |"
        lines.append(line)
    return lines


def _timing(run: RunRecords) -> str:
    rollout = sum(r.seconds for r in run.explore)
    train = sum(r.train_seconds for r in run.client)
    evaluation = sum(r.seconds for r in run.eval_avg)
    return (
        f"Time spent: exploration rollouts {rollout / 60:.1f} min, local training {train / 60:.1f} min, "
        f"evaluation {evaluation / 60:.1f} min (the embedded runtime plays all clients' exploration in one batched "
        "rollout, then trains the clients one after another)."
    )


def _setup(run: RunRecords) -> str:
    c = run.config
    fed, explore, train, ev = c["fed"], c["explore"], c["train"], c["eval"]
    return (
        f"`{run.root}`: model `{c['model']['name']}` with LoRA r={c['model']['lora_rank']}, "
        f"clients {', '.join(fed['clients'])}, aggregator `{fed['aggregator']}`, {fed['rounds']} rounds planned, "
        f"seed {fed['seed']}; per round each client explores {explore['tasks']} train tasks at temperature "
        f"{explore['temperature']} (from round {explore.get('first_round', 1)}) and trains {train['epochs']} "
        f"epoch{'s' * (train['epochs'] != 1)} "
        f"at lr {train['lr']:g}; server lr {fed.get('server_lr', 1.0):g}; "
        f"evaluation: {ev['tasks'] or 'all'} test tasks per env, greedy.{_privacy_setup(run)}"
    )


def _privacy_setup(run: RunRecords) -> str:
    p = run.config.get("privacy", {})
    secure = (
        " Secure aggregation (SecAgg+): the server saw only the mean of each round's updates, so the per-client "
        "update norms and cosines, and the inexactness, were not computed."
        if p.get("secagg")
        else ""
    )
    if p.get("dp", "off") == "off":
        return secure
    spent = [a.privacy["epsilon"] for a in run.aggregate if a.privacy]
    eps = f"ε = {spent[-1]:.2f} after the last round" if spent else "no round aggregated yet"
    return (
        f" Differential privacy ({p['dp']}): each client's round update clipped to C = {p['clip']:g}, noise "
        f"σ = {p['noise_multiplier']:g}; {eps} at δ = {p['delta']:g} (unit: one client's round of data)."
    ) + secure


_LEAKAGE_MODELS = {"base": "base model", "global": "global adapter", "own": "the client's last upload"}


def _mean(values: list[float]) -> str:
    return f"{sum(values) / len(values):.2f}" if values else "–"


def _leakage_section(run: RunRecords) -> list[str]:
    """The leakage measured by `bench/privacy.py` (none: no section)."""
    out = []
    for r in run.leakage:
        cap = math.log2(r.candidates + 1) if r.candidates > 0 else float("nan")
        canaries = max((len(v) for v in r.exposure.values()), default=0)
        out += [
            f"Measured after round {r.round}: {canaries} canary secrets planted in client {r.client}'s training "
            f"data, each ranked among {r.candidates} random secrets (rank exposure at most {cap:.2f} bits); "
            f"membership: its {r.members} trained-on demonstrations against as many others.",
            "",
            "| model | exposure (bits, mean) | per canary | exposure, normal fit (mean) | membership AUC |",
            "|---|---:|---|---:|---:|",
        ]
        for model, label in _LEAKAGE_MODELS.items():
            if model not in r.exposure and model not in r.membership_auc:
                continue
            bits, fit, auc = r.exposure.get(model, []), r.exposure_fit.get(model, []), r.membership_auc.get(model)
            out.append(
                f"| {label} | {_mean(bits)} | {', '.join(f'{b:.2f}' for b in bits) or '–'} "
                f"| {_mean(fit)} | {'–' if auc is None else f'{auc:.3f}'} |"
            )
        out.append("")
    return out


def render_markdown(runs: list[RunRecords], plots: list[str]) -> str:
    out = ["# fedse report", ""]
    for run in runs:
        out.append(f"- **{run.name}** — {_setup(run)}")
    out += [
        "",
        "Success rates are greedy test-split successes with 95 % Wilson intervals. "
        "*Avg* is Fed-SE's average, weighted by test tasks per environment; *mean over envs* weighs each environment equally.",
        "",
    ]
    for run in runs:
        out += [f"## {run.name}", ""]
        if run.eval_avg:
            first, last = run.eval_avg[0], run.eval_avg[-1]
            out += [
                f"Avg test success: round {first.round} {first.avg_weighted:.1%} → "
                f"round {last.round} {last.avg_weighted:.1%}.",
                "",
            ]
        out += ["### Test success per round", "", *_success_table(run), ""]
        out += ["### Clients", "", *_client_table(run), ""]
        out += ["### Aggregation and communication", "", *_aggregate_table(run), "", _timing(run), ""]
        if run.leakage:
            out += ["### Leakage: canary exposure and membership inference", "", *_leakage_section(run)]
    out += ["## Plots", ""]
    out += [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(out) + "\n"


def _client_columns(c: ClientRecord) -> str:
    return (
        f" {c.explored:>8} {c.explore_success:>5.0%} {c.kept:>5} {c.buffer:>6} {_loss(c.train_loss):>7}"
        f" {c.train_seconds:>5.0f}s"
    )


def _aggregate_line(agg: AggregateRecord, aggregator: str) -> str:
    parts = [f"{len(agg.accepted)} updates accepted"]
    if agg.rejected:
        parts.append(f"rejected {agg.rejected}")
    if agg.clipped:
        parts.append("clipped " + ", ".join(f"{c} (norm {n:.3g})" for c, n in agg.clipped.items()))
    if agg.secure_aggregation:
        parts.append("securely aggregated (no per-client figures)")
    if agg.inexactness is not None:
        parts.append(f"inexactness {agg.inexactness:.4f}")
    if agg.update_cosine:
        parts.append(f"mean update cosine {_mean_off_diagonal(agg.update_cosine):.3f}")
    parts += [f"{name.replace('_', ' ')} {value:.3f}" for name, value in agg.merge.items()]
    parts.append(f"{sum(agg.bytes_up) / 1e6:.1f} MB up, {agg.bytes_down / 1e6:.1f} MB down per client")
    if agg.privacy:
        p = agg.privacy
        parts.append(
            f"DP {p['dp']}: ε = {p['epsilon']:.2f} after this round (δ = {p['delta']:g}, σ = {p['noise_multiplier']:g}, C = {p['clip']:g})"
        )
    return f"aggregate ({aggregator}): " + ", ".join(parts)


def round_summary(records: RoundRecords, planned: int, aggregator: str) -> str:
    """The one-screen summary printed after each round, from that round's records."""
    took = f" ({records.seconds:.0f} s)" if records.seconds is not None else ""
    lines = [f"── round {records.round}/{planned}{took} " + "─" * 40]
    clients = {r.client: r for r in records.clients}
    header = f"{'env / client':<12} {'test success':<22}"
    if clients:
        header += f" {'explored':>8} {'ok':>5} {'kept':>5} {'buffer':>6} {'loss':>7} {'train':>6}"
    lines.append(header)
    for env in dict.fromkeys([*(r.env for r in records.evals), *clients]):
        r = records.eval_of(env)
        line = f"{env:<12} {_rate(r.successes, r.tasks) if r else '–':<22}"
        if env in clients:
            line += _client_columns(clients[env])
        lines.append(line)
    if (explore := records.explore) is not None and not explore.episodes:
        lines.append("explore: none this round (before explore.first_round: training on the buffer as it is)")
    elif explore is not None:
        lines.append(
            f"explore: {explore.episodes} episodes, {explore.turns} turns in one batch, {explore.seconds:.0f} s "
            f"({explore.processed_tokens / max(explore.seconds, 1e-9):.0f} tok/s)"
        )
    if records.eval_avg is not None:
        lines.append(f"Avg (task-weighted) {_rate(*records.pooled())}; mean over envs {records.eval_avg.avg_mean:.1%}")
    if records.aggregate is not None:
        lines.append(_aggregate_line(records.aggregate, aggregator))
    return "\n".join(lines)


# --- plots -------------------------------------------------------------------------------------


def _round_axis(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)


def _save(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_success(runs: list[RunRecords], path: Path) -> None:
    import matplotlib.pyplot as plt

    envs = list(dict.fromkeys(e for run in runs for e in run.envs))
    panels = [*envs, "Avg (task-weighted)"]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), sharey=True, squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for run in runs:
            xs, counts = [], []
            for round_ in run.rounds:
                this = run.round(round_)
                if panel in envs:
                    r = this.eval_of(panel)
                    if r is None:
                        continue
                    counts.append((r.successes, r.tasks))
                else:
                    counts.append(this.pooled())
                xs.append(round_)
            if not xs:
                continue
            rates = [s / n for s, n in counts]
            lo, hi = zip(*(wilson(s, n) for s, n in counts))
            ax.plot(xs, rates, marker="o", label=run.name)
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_title(panel)
        ax.set_ylim(-0.02, 1.02)
        _round_axis(ax)
    axes[0][0].set_ylabel("test success (95% Wilson)")
    axes[0][-1].legend(fontsize=8)
    _save(fig, path)


def _plot_clients(runs: list[RunRecords], path: Path) -> None:
    import matplotlib.pyplot as plt

    fields = [("kept", "kept successful trajectories"), ("buffer", "buffer size"), ("train_loss", "train loss")]
    fig, axes = plt.subplots(1, len(fields), figsize=(11, 3.2))
    for ax, (key, title) in zip(axes, fields):
        for run in runs:
            for client in run.clients:
                rows = [r for r in run.client if r.client == client and getattr(r, key) is not None]
                label = client if len(runs) == 1 else f"{run.name}/{client}"
                ax.plot([r.round for r in rows], [getattr(r, key) for r in rows], marker="o", label=label)
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        _round_axis(ax)
    axes[0].legend(fontsize=8)
    _save(fig, path)


def _plot_aggregation(runs: list[RunRecords], path: Path) -> None:
    import matplotlib.pyplot as plt

    with_cos = [run for run in runs if run.aggregate and run.aggregate[-1].update_cosine]
    fig, axes = plt.subplots(1, 1 + len(with_cos), figsize=(4 + 3.6 * len(with_cos), 3.4), squeeze=False)
    ax = axes[0][0]
    for run in runs:
        rows = [r for r in run.aggregate if r.inexactness is not None]
        ax.plot([r.round for r in rows], [r.inexactness for r in rows], marker="o", label=run.name)
    ax.set_title("inexactness ‖B̄Ā − mean BA‖ / ‖mean BA‖")
    _round_axis(ax)
    ax.legend(fontsize=8)
    for ax, run in zip(axes[0][1:], with_cos):
        last = run.aggregate[-1]
        names = last.accepted or run.clients
        image = ax.imshow(last.update_cosine, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_xticks(range(len(names)), names, rotation=45, fontsize=8)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        for i, row in enumerate(last.update_cosine):
            for j, v in enumerate(row):
                ax.text(
                    j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="white" if abs(v) > 0.5 else "black"
                )
        ax.set_title(f"{run.name}: update cosine, round {last.round}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046)
    _save(fig, path)


def _plot_communication(runs: list[RunRecords], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for run in runs:
        rounds = [r.round for r in run.aggregate]
        ax.plot(rounds, [sum(r.bytes_up) / 1e6 for r in run.aggregate], marker="o", label=f"{run.name} up (all)")
        ax.plot(
            rounds,
            [r.bytes_down * len(r.accepted) / 1e6 for r in run.aggregate],
            marker="s",
            linestyle="--",
            label=f"{run.name} down (all)",
        )
    ax.set_title("communication per round")
    ax.set_ylabel("MB")
    ax.set_ylim(bottom=0)
    _round_axis(ax)
    ax.legend(fontsize=8)
    _save(fig, path)


def write_report(run_dirs: list[str | Path], out: str | Path | None = None) -> Path:
    """Write report.md and its plots into `out` (default: the run's folder, or `<first>-vs-...` for several)."""
    import matplotlib

    matplotlib.use("Agg")
    runs = [load_run(d) for d in run_dirs]
    if out is None:
        first = runs[0].root
        out = first if len(runs) == 1 else first.parent / "-vs-".join(r.root.name for r in runs)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    plots = {
        "success.png": _plot_success,
        "clients.png": _plot_clients,
        "aggregation.png": _plot_aggregation,
        "communication.png": _plot_communication,
    }
    for name, plot in plots.items():
        plot(runs, out / name)
    report = out / "report.md"
    report.write_text(render_markdown(runs, list(plots)))
    return report
