"""An experiment: a grid of methods x seeds over one base configuration, run to completion in
as many sittings as it takes.

    # configs/experiments/table1-cpu.toml
    name = "table1-cpu"
    base = "../demo.toml"            # a run configuration, relative to this file
    methods = ["pretrained", "fedit-static", "fedse"]
    seeds = [0, 1, 2]
    set = ["fed.rounds=3"]           # overrides for every run (before the method's own)
    reference = "fedse"              # the method (or list of them) the report compares every other with
    [seeds_for]                      # methods run on other seeds than `seeds`
    fedse = [0, 1, 2, 3, 4]

Each run lives in `results/<name>/<method>/seed<k>/` (a normal run folder: `fedse report` and
`fedse eval` work on it). The seed is `fed.seed`: the adapter's init, every exploration draw
and the data order. Running the grid again skips finished runs, resumes interrupted ones and
starts missing ones, so it can be stopped at any time. Only each run's config.json,
metrics.jsonl, state.json and machine.jsonl are meant for git (see results/.gitignore); the experiment report
is rebuilt from them (`fedse experiment FILE --report-only`).

A grid completed over several sittings may run on several machines: each sitting of a run appends
one line to its `machine.jsonl` (`fedse.experiments.store.machine_record`), and the report lists
them per method.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import Field, ValidationError, field_validator, model_validator

from fedse.experiments.config import (
    ConfigError,
    RunConfig,
    check_run_name,
    config_changes,
    load_config,
    validate_config,
)
from fedse.experiments.methods import METHODS, method
from fedse.experiments.store import ExperimentStore, RunStore
from fedse.sections import Section


class ExperimentConfig(Section):
    name: str
    base: str
    """The run configuration every cell starts from (a path relative to the experiment file)."""
    methods: list[str] = Field(min_length=1)
    seeds: list[int] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    set: list[str] = Field(default_factory=list)
    seeds_for: dict[str, list[int]] = Field(default_factory=dict)
    """Method -> its seeds, for the methods that run on other seeds than `seeds`."""
    reference: str | list[str] = "fedse"
    """The method (or methods, one table each) the report's paired bootstrap compares every other
    method with."""
    results: str = "results"
    """The results folder, relative to the current directory."""

    @property
    def references(self) -> list[str]:
        return [self.reference] if isinstance(self.reference, str) else list(self.reference)

    def seeds_of(self, method: str) -> list[int]:
        return self.seeds_for.get(method, self.seeds)

    def seeds_order(self, seed: int) -> tuple[int, int]:
        """`seeds` first, in their order; the extra seeds of `seeds_for` after them."""
        return (0, self.seeds.index(seed)) if seed in self.seeds else (1, seed)

    @model_validator(mode="after")
    def _methods_named(self) -> ExperimentConfig:
        unknown = sorted(set(self.seeds_for) - set(self.methods))
        if unknown:
            raise ValueError(f"seeds_for names {unknown[0]!r}, which is not one of the experiment's methods")
        if any(not seeds or len(set(seeds)) != len(seeds) for seeds in self.seeds_for.values()):
            raise ValueError("each seeds_for entry is a non-empty list of distinct seeds")
        for reference in self.references:
            if reference not in self.methods:
                raise ValueError(f"reference {reference!r} is not one of the experiment's methods")
        return self

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        return check_run_name(v)

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in METHODS]
        if unknown or len(set(v)) != len(v):
            raise ValueError(f"methods must be distinct names among: {', '.join(METHODS)}")
        return v


@dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    method: str
    seed: int
    config: RunConfig
    results: ExperimentStore

    @property
    def root(self) -> Path:
        """The cell's run folder."""
        return self.results.cell(self.method, self.seed)

    def status(self) -> str:
        """'done', 'partial' or 'absent' (`ExperimentStore.status`)."""
        return self.results.status(self.method, self.seed)

    def changes(self) -> list[str]:
        """The keys in which the run on disk differs from this cell's configuration ([] if
        there is no run yet): an edited base or method makes a finished run stale."""
        store = RunStore(self.root)
        if not store.config_path.exists():
            return []
        recorded = validate_config(store.read_config(), where=str(store.config_path))
        return config_changes(recorded, self.config)


def load_experiment(path: str | Path) -> tuple[ExperimentConfig, list[Cell]]:
    """The experiment at `path` and its cells, every cell's configuration validated up front."""
    path = Path(path)
    try:
        experiment = ExperimentConfig.model_validate(tomllib.loads(path.read_text()))
    except FileNotFoundError:
        raise ConfigError(f"no experiment file at {path}") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML ({error})") from None
    except ValidationError as error:
        first = error.errors()[0]
        key = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{path}: bad value for {key!r}: {first['msg']}") from None
    base = path.parent / experiment.base
    results = ExperimentStore(Path(experiment.results) / experiment.name)
    cells = []
    every_seed = sorted({s for m in experiment.methods for s in experiment.seeds_of(m)}, key=experiment.seeds_order)
    for seed in every_seed:  # seed-major: each sitting completes whole seeds of the table
        for name in (m for m in experiment.methods if seed in experiment.seeds_of(m)):
            overrides = [*experiment.set, *method(name).overrides, f"fed.seed={seed}", f"name='{name}-seed{seed}'"]
            cells.append(Cell(name, seed, load_config(base, overrides), results))
    return experiment, cells


def run_grid(
    cells: list[Cell], run_cell: Callable[[Cell, bool], None], echo: Callable[[str], None] = print
) -> dict[str, int]:
    """Bring every cell to 'done': `run_cell(cell, resume)` runs or resumes one. Returns how
    many cells were skipped, resumed and started. A finished run whose configuration is no
    longer the cell's is not silently kept in the table: a ConfigError names it, before
    anything runs (a partial one is checked when it resumes)."""
    check_not_stale(cells)
    counts = {"skipped": 0, "resumed": 0, "started": 0}
    for i, cell in enumerate(cells, start=1):
        status = cell.status()
        label = f"[{i}/{len(cells)}] {cell.method} seed {cell.seed}"
        if status == "done":
            counts["skipped"] += 1
            echo(f"{label}: done, skipped")
            continue
        echo(f"{label}: {'resuming' if status == 'partial' else 'starting'} in {cell.root}")
        run_cell(cell, status == "partial")
        counts["resumed" if status == "partial" else "started"] += 1
    return counts


def check_not_stale(cells: list[Cell]) -> None:
    """A ConfigError listing the finished runs that another configuration produced."""
    stale = [(cell, changes) for cell in cells if cell.status() == "done" and (changes := cell.changes())]
    if stale:
        shown = "; ".join(f"{cell.root} ({', '.join(changes[:3])})" for cell, changes in stale[:3])
        more = f" and {len(stale) - 3} more" if len(stale) > 3 else ""
        raise ConfigError(
            f"{len(stale)} finished run(s) were made with another configuration than the experiment's "
            f"now: {shown}{more}. Restore the experiment's settings, or delete those folders to rerun them"
        )
