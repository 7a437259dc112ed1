"""`fedse report`: markdown tables with Wilson intervals and plots, for one run or several overlaid."""

import pytest

from fedse.cli import main
from fedse.experiments.config import load_config
from fedse.experiments.records import AggregateRecord, ClientRecord, EvalAvgRecord, EvalRecord, ExploreRecord
from fedse.experiments.report import load_run, render_markdown, wilson
from fedse.experiments.store import RunStore


def fake_run(root, name, successes):
    """A run folder built from typed records: per round, maze and wordle successes out of 4."""
    overrides = ["fed.clients=['maze', 'wordle']", f"fed.rounds={len(successes) - 1}", "model.name='tiny-random'",
                 "model.lora_rank=4", "explore.tasks=2", "train.epochs=1", "train.lr=0.001", "eval.tasks=4"]  # fmt: skip
    store = RunStore(root)
    store.create(load_config(None, [f"name='{name}'", *overrides]).model_dump())
    for round_, (maze, wordle) in enumerate(successes):
        if round_:
            store.append(ExploreRecord(round_, ["maze", "wordle"], episodes=4, turns=9, processed_tokens=900,
                                       generated_tokens=100, seconds=3.0))  # fmt: skip
            for client in ("maze", "wordle"):
                store.append(ClientRecord(round_, client, num_examples=2 + round_, explored=2, explore_success=0.5,
                                          explore_tokens=300, kept=1, added=1, buffer=2 + round_,
                                          train_examples=2 + round_, train_tokens=1000, train_seconds=4.0,
                                          truncated=0, train_loss=1.0 / round_))  # fmt: skip
            store.append(AggregateRecord(round_, ["maze", "wordle"], {}, clients=2, bytes_up=[1_000_000, 1_000_000],
                                         bytes_down=1_000_000, inexactness=0.05,
                                         update_cosine=[[1.0, 0.2], [0.2, 1.0]]))  # fmt: skip
        for env, s in (("maze", maze), ("wordle", wordle)):
            store.append(EvalRecord(round_, env, tasks=4, successes=s, success=s / 4, reward=s / 4))
        store.append(EvalAvgRecord(round_, avg_weighted=(maze + wordle) / 8, avg_mean=(maze + wordle) / 8, seconds=1.0))
    return root


def test_wilson_interval_contains_the_rate_and_narrows_with_more_tasks():
    for s, n in [(0, 4), (2, 4), (4, 4), (30, 100)]:
        lo, hi = wilson(s, n)
        assert 0 <= lo <= s / n <= hi <= 1
    assert wilson(50, 100)[1] - wilson(50, 100)[0] < wilson(5, 10)[1] - wilson(5, 10)[0]


def test_markdown_tables_carry_counts_rates_and_intervals(tmp_path):
    run = load_run(fake_run(tmp_path / "a", "a", [(0, 0), (2, 1)]))
    text = render_markdown([run], ["success.png"])
    assert "| 1 | 2/4 = 50% [15%, 85%] | 1/4 = 25% [5%, 70%] | 3/8 = 38% [14%, 69%] | 37.5% |" in text
    assert "Avg test success: round 0 0.0% → round 1 37.5%." in text
    assert "| 1 | 2 | 0.0500 | 0.200 | 2.0 | 1.0 |" in text
    assert "![success](success.png)" in text


def test_report_command_writes_plots_and_overlays_runs(tmp_path, capsys):
    a = fake_run(tmp_path / "a", "a", [(0, 0), (2, 1), (3, 1)])
    b = fake_run(tmp_path / "b", "b", [(0, 0), (1, 0), (1, 1)])
    assert main(["report", str(a)]) == 0
    assert (a / "report.md").exists()
    assert main(["report", str(a), str(b)]) == 0
    out = tmp_path / "a-vs-b"
    text = (out / "report.md").read_text()
    assert "## a" in text and "## b" in text
    for name in ("success.png", "clients.png", "aggregation.png", "communication.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"


def test_report_on_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a run directory (it needs config.json and metrics.jsonl" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["eval", "nowhere"]])
def test_eval_on_a_folder_that_is_not_a_run_is_a_clear_error(tmp_path, capsys, bad):
    assert main([bad[0], str(tmp_path / bad[1])]) == 2
    assert "is not a run directory (no config.json)" in capsys.readouterr().err


def test_a_leakage_record_gets_a_section_and_one_missing_a_model_shows_dashes(tmp_path):
    from fedse.experiments.records import LeakageRecord

    root = tmp_path / "run"
    fake_run(root, "leaky", [(0, 0), (2, 1)])
    assert "### Leakage" not in render_markdown([load_run(root)], [])
    full = LeakageRecord(1, client="maze", candidates=7, exposure={"base": [0.5, 1.5], "global": [3.0, 2.0]},
                         exposure_fit={"base": [1.0, 1.0], "global": [4.0, 2.0]},
                         membership_auc={"base": 0.5, "global": 0.75}, members=4)  # fmt: skip
    partial = LeakageRecord(1, client="maze", candidates=0, exposure={"own": []}, exposure_fit={},
                            membership_auc={}, members=0)  # fmt: skip
    RunStore(root).append(full, partial)
    markdown = render_markdown([load_run(root)], [])
    assert "2 canary secrets planted in client maze's training data, each ranked among 7 random secrets" in markdown
    assert "(rank exposure at most 3.00 bits)" in markdown
    assert "| base model | 1.00 | 0.50, 1.50 | 1.00 | 0.500 |" in markdown
    assert "| global adapter | 2.50 | 3.00, 2.00 | 3.00 | 0.750 |" in markdown
    assert "| the client's last upload | – | – | – | – |" in markdown
