"""The tables of the README and the documentation, generated from the code and from result files
(`fedse docs tables`), so that re-measuring or adding an option never means re-typing a table.

A generated table sits between two markers in a Markdown file:

    <!-- table: aggregators -->
    ...written by `fedse docs tables`...
    <!-- /table -->

`fedse docs tables --check` fails when a table is out of date (a test runs it).
"""

from __future__ import annotations

import json
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

MARKER = re.compile(r"(<!-- table: ([a-z0-9-]+) -->\n)(.*?)(<!-- /table -->)", re.S)
DOCUMENTS = ("README.md", "docs/*.md")


# --- from the code -------------------------------------------------------------------------------


def aggregator_table(repo: Path) -> str:
    """Every aggregation rule with the properties its class declares."""
    from fedse.fl.aggregators import AGGREGATORS

    flags = ("exact", "linear", "personalized", "mutates_base", "robust", "reads_inputs")
    lines = ["| rule | class | uploads | " + " | ".join(flags) + " | what it does |", "|---" * (4 + len(flags)) + "|"]
    for name, cls in AGGREGATORS.items():
        marks = " | ".join("✓" if getattr(cls, f) else "" for f in flags)
        summary = " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
        lines.append(f"| `{name}` | `{cls.__name__}` | {cls.uploads} | {marks} | {summary} |")
    return "\n".join(lines)


def privacy_table(repo: Path) -> str:
    """Each rule under each privacy mode: supported, or refused and why (`fedse.fl.privacy.dp_refusal`,
    `secagg_refusal`)."""
    from fedse.fl.aggregators import AGGREGATORS
    from fedse.fl.privacy import dp_refusal, secagg_refusal

    lines = ["| rule | plain | central DP | local DP | SecAgg+ |", "|---|---|---|---|---|"]
    for name, cls in AGGREGATORS.items():
        cells = [dp_refusal(cls, mode) for mode in ("central", "local")] + [secagg_refusal(cls, "off")]
        shown = ["✓" if c is None else f"refused: {c}" for c in cells]
        lines.append(f"| `{name}` | ✓ | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def _type_name(annotation: object) -> str:
    if isinstance(annotation, type) and not isinstance(annotation, types.GenericAlias):
        return annotation.__name__
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(annotation))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(annotation))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    return "None" if annotation is type(None) else str(annotation)


def _bounds(field) -> str:
    parts = []
    for item in field.metadata:
        for key, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            if getattr(item, key, None) is not None:
                parts.append(f"{sign} {getattr(item, key)}")
    return ", ".join(parts)


def _default(field) -> str:
    if field.default_factory is not None:
        value = field.default_factory()
    elif field.default is PydanticUndefined:
        return "required"
    else:
        value = field.default
    if isinstance(value, BaseModel):
        return "(table)"
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def section_rows(model: type[BaseModel], prefix: str) -> list[tuple[str, str, str, str, str]]:
    """(key, type, default, bounds, description) of every field of `model` under `prefix`."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        description = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append((key, _type_name(field.annotation), _default(field), _bounds(field), description))
    return rows


def config_sections() -> list[tuple[str, type[BaseModel]]]:
    """The TOML tables of a run configuration and the section class each is validated into."""
    from fedse.envs.remote import Dialect, EnvBackend
    from fedse.experiments.config import RunConfig

    tables = [("", RunConfig)]
    for name, field in RunConfig.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            tables.append((name, field.annotation))
    return [*tables, ("env.<name>", EnvBackend), ("env.<name>.dialect", Dialect)]


def config_table(repo: Path) -> str:
    """The configuration reference: every field of every section, its type, default, bounds and help."""
    out = []
    for table, model in config_sections():
        title = f"[{table}]" if table else "top level"
        out += [f"#### `{title}`", "", " ".join((model.__doc__ or "").strip().split("\n\n")[0].split()), ""]
        out += ["| key | type | default | bounds | meaning |", "|---|---|---|---|---|"]
        for key, kind, default, bounds, text in section_rows(model, ""):
            if table == "" and default == "(table)":
                continue  # a section of its own, below
            if table == "" and key == "env":
                text = "per environment: the `[env.<name>]` tables below"
            out.append(f"| `{key}` | {kind} | {default} | {bounds} | {text} |")
        out.append("")
    return "\n".join(out).rstrip()


# --- from result files ---------------------------------------------------------------------------


def _rate(pair: list[int]) -> str:
    return f"{pair[0]}/{pair[1]}"


def demo_table(repo: Path) -> str:
    """`make demo` per machine and dtype, from results/demo/*.json."""
    from fedse.experiments.report import wilson

    lines = [
        "| machine | config | dtype | seed | minutes | peak RSS | test success after the last round (95 % Wilson) |"
    ]
    lines.append("|---|---|---|---:|---:|---:|---|")
    for path in sorted((repo / "results" / "demo").glob("*.json")):
        data = json.loads(path.read_text())
        config = "this demo" if data["config"].startswith("configs/demo.toml") else "previous demo (3 × 2 epochs)"
        for run in data["runs"]:
            won = sum(s for s, _ in run["last"].values())
            tasks = sum(n for _, n in run["last"].values())
            lo, hi = wilson(won, tasks)
            per_env = ", ".join(f"{env} {_rate(p)}" for env, p in run["last"].items())
            lines.append(
                f"| {data['machine']} | {config} | {run['dtype']} | {run['seed']} | {run['minutes']:.1f} | "
                f"{run['peak_rss_gb']:.2f} GB | {won}/{tasks} = {won / tasks:.0%} [{lo:.0%}, {hi:.0%}] ({per_env}) |"
            )
    return "\n".join(lines)


def markdown_table(path: Path, header: str) -> str:
    """The table of the Markdown result file `path` whose header row starts with `header`."""
    table = re.search(rf"^{re.escape(header)}.*?(?=\n\n|\n[^|]|\Z)", path.read_text(), re.S | re.M)
    if table is None:
        raise ValueError(f"{path} has no table starting {header!r}")
    return table.group(0).strip()


def experiment_table(root: Path) -> str:
    """The main table of an experiment's committed report (`fedse experiment … --report-only`)."""
    return markdown_table(root / "report.md", "| method | seeds |")


def aggregate_bench_table(repo: Path) -> str:
    """`bench/aggregate.py`: one server step for 5 clients, from results/bench/aggregate.json."""
    data = json.loads((repo / "results" / "bench" / "aggregate.json").read_text())
    lines = ["| adapter shapes | rule | seconds | peak MB | step MB |", "|---|---|---:|---:|---:|"]
    for row in data["rows"]:
        approx = "*" if row.get("per_layer") else ""
        lines.append(
            f"| {row['model']} | {row['rule']} | {row['seconds']:.2f}{approx} | {row['peak_mb']:,.0f} | {row['step_mb']:,.0f} |"
        )
    return (
        "\n".join(lines)
        + f"\n\n{data['cpu']}, {data['rows'][0]['threads']} threads; * extrapolated from one layer per module kind."
    )


def _bench(repo: Path) -> Path:
    return repo / "results" / "bench"


TABLES: dict[str, Callable[[Path], str]] = {
    "aggregators": aggregator_table,
    "privacy": privacy_table,
    "config": config_table,
    "demo": demo_table,
    "table1-cpu": lambda repo: experiment_table(repo / "results" / "table1-cpu"),
    "table1-cpu-v2": lambda repo: experiment_table(repo / "results" / "table1-cpu-v2"),
    "bench-aggregate": aggregate_bench_table,
    "interference": lambda repo: markdown_table(_bench(repo) / "learnability-interference.md", "| update of |"),
    "interference-nll": lambda repo: markdown_table(_bench(repo) / "learnability-interference.md", "| model |"),
    "regmean-probe": lambda repo: markdown_table(_bench(repo) / "learnability-regmean.md", "| model |"),
    "privacy-leakage": lambda repo: (_bench(repo) / "privacy-demo.md").read_text().strip(),
}


def documents(repo: Path) -> list[Path]:
    return [p for pattern in DOCUMENTS for p in sorted(repo.glob(pattern))]


def regenerate(repo: Path) -> dict[Path, str]:
    """Each document whose generated tables differ from what the code and results give now,
    with its new text."""
    changed = {}
    for path in documents(repo):
        text = path.read_text()
        unknown = sorted({m.group(2) for m in MARKER.finditer(text)} - set(TABLES))
        if unknown:
            raise ValueError(f"{path}: unknown generated table {unknown[0]!r}; known: {', '.join(TABLES)}")
        new = MARKER.sub(lambda m: f"{m.group(1)}{TABLES[m.group(2)](repo)}\n{m.group(4)}", text)
        if new != text:
            changed[path] = new
    return changed
