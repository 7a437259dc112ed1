"""The README and the documentation site: generated tables up to date, every configuration field
documented, the site building with warnings as errors, and every command the README shows
working as written (on the tiny model)."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedse.doc_tables import config_sections, regenerate, section_rows
from fedse.fl.aggregators import AGGREGATORS

REPO = Path(__file__).resolve().parents[1]
SMALL = [
    "model.name='tiny-random'", "model.lora_rank=4", "model.lora_alpha=8", "explore.tasks=2",
    "explore.max_new_tokens=6", "buffer.expert_seeds=2", "train.epochs=1", "train.max_length=1024",
    "train.batch_tokens=2048", "eval.tasks=2", "eval.max_new_tokens=6", "log.tensorboard=false",
]  # fmt: skip
"""What makes a README command run on the tiny model in seconds (its own settings stay)."""


def test_every_generated_table_is_up_to_date():
    stale = regenerate(REPO)
    assert not stale, f"run `fedse docs tables`: {', '.join(str(p.relative_to(REPO)) for p in stale)}"


def test_the_configuration_reference_lists_every_field_of_every_section():
    page = (REPO / "docs" / "configuration.md").read_text()
    for table, model in config_sections():
        heading = f"#### `[{table}]`" if table else "#### `top level`"
        section = page.split(heading, 1)[1].split("#### ", 1)[0]
        for key, _, default, _, text in section_rows(model, ""):
            if table == "" and default == "(table)":
                assert f"#### `[{key}]`" in page  # a section of its own
                continue
            assert f"| `{key}` |" in section, f"[{table}] {key} is missing from docs/configuration.md"
            assert text, f"[{table}] {key} has no docstring to document it with"


def test_the_aggregators_page_declares_what_each_class_declares():
    rows = {
        r.split("|")[1].strip(" `"): r
        for r in (REPO / "docs" / "aggregators.md").read_text().splitlines()
        if r.startswith("| `")
    }
    for name, cls in AGGREGATORS.items():
        cells = [c.strip() for c in rows[name].split("|")[4:10]]
        flags = [getattr(cls, f) for f in ("exact", "linear", "personalized", "mutates_base", "robust", "reads_inputs")]
        assert cells == ["✓" if f else "" for f in flags], name


def test_the_docs_site_builds_with_warnings_as_errors(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (tmp_path / "site" / "configuration" / "index.html").exists()


def readme_commands() -> list[str]:
    """Each command line of the README's bash blocks, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    lines = [line.split("  #")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line]


def test_the_readme_is_short_and_its_commands_are_the_ones_tested_here():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200
    assert "make test" in (REPO / ".ci" / "run").read_text()  # CI runs the README's test command
    assert "$(VENV)/bin/fedse run configs/demo.toml --force" in (REPO / "Makefile").read_text()
    assert readme_commands()[:2] == ["make demo", "make test"]


def as_run_here(line: str) -> tuple[list[str], dict[str, str]]:
    """A README command as this test runs it: fedse's CLI in this interpreter, the tiny model."""
    words = shlex.split(line)
    env = {**os.environ}
    while "=" in words[0]:  # VAR=value prefixes
        key, value = words.pop(0).split("=", 1)
        env[key] = str(REPO / value)
    if words == ["make", "demo"]:  # the Makefile's recipe, one round of it
        words = [".venv/bin/fedse", "run", "configs/demo.toml", "--force", "--set=fed.rounds=1"]
    assert words[0] == ".venv/bin/fedse", line
    args = words[1:]
    if args[0] in ("run",) or args[:2] == ["flower", "local"]:
        args += [f"--set={s}" for s in SMALL]
    return [sys.executable, "-m", "fedse.cli", *args], env


def here(tmp_path: Path) -> Path:
    """A working folder that looks like the repository to the commands (they write runs/ here)."""
    for name in ("configs", "examples"):
        (tmp_path / name).symlink_to(REPO / name)
    # what a clone holds: a run's checkpoints and clients' files are gitignored (results/.gitignore),
    # and a working copy that ran a grid holds gigabytes of them
    untracked = shutil.ignore_patterns("checkpoints", "clients", "evals", ".lock", "*.tmp")
    shutil.copytree(REPO / "results", tmp_path / "results", ignore=untracked)
    return tmp_path


def test_every_command_in_the_readme_runs_as_written(tmp_path):
    cwd = here(tmp_path)
    for line in readme_commands():
        if line == "make test" or "flower local" in line:
            continue  # CI runs the one; the deployment test below the other
        command, env = as_run_here(line)
        done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, f"{line}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
    assert (cwd / "runs" / "demo" / "report.md").exists() and (cwd / "runs" / "demo-regmean" / "report.md").exists()
    assert '"round": 3' in (cwd / "runs" / "demo-regmean" / "state.json").read_text()  # resumed to round 3
    assert (cwd / "runs" / "tickets-demo" / "report.md").exists()


@pytest.mark.deploy
def test_the_readmes_flower_command_runs_as_written(tmp_path):
    cwd = here(tmp_path)
    [line] = [line for line in readme_commands() if "flower local" in line]
    command, env = as_run_here(line)
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert list((cwd / "runs").glob("*-flower/report.md"))
