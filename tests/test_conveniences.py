"""What researchers expect of a tool around the runs: a version, the configuration as fedse
resolves it, TensorBoard during a run, and output that reads well in a log file."""

import tomllib

import pytest

from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.cli import main
from fedse.experiments.config import load_config, to_toml, validate_config
from fedse.experiments.federation import Federation
from fedse.progress import progress_bar
from helpers import TINY, tiny_config


def test_version_names_the_installed_package(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0 and capsys.readouterr().out.strip().startswith("fedse 0.")


@pytest.mark.parametrize(
    "path", ["configs/demo.toml", "configs/experiments/table1-cpu-v2-base.toml", "configs/paper.toml", None]
)
def test_config_show_prints_toml_that_reads_back_to_the_same_configuration(path, capsys):
    args = ["config", "show", *([path] if path else []), "--set", "fed.rounds=7"]
    assert main(args) == 0
    shown = capsys.readouterr().out
    back = validate_config(tomllib.loads(shown))
    assert back == load_config(path, ["fed.rounds=7"]) and back.fed.rounds == 7
    assert "[fed]" in shown and "[train]" in shown  # every section, defaults included


def test_config_check_validates_without_running(tmp_path, capsys):
    assert main(["config", "check", "configs/demo.toml"]) == 0
    assert "valid" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text("[fed]\nrounds = -1\n")
    assert main(["config", "check", str(bad)]) == 2
    assert "fed.rounds" in capsys.readouterr().err
    assert not list(tmp_path.glob("runs"))


def test_a_run_streams_its_metrics_to_tensorboard_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fed = Federation(tiny_config("log.tensorboard=true"), tmp_path / "run", Policy(load_base("tiny-random")))
    fed.run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"success/maze", "success/wordle", "success/avg", "client/maze/train_loss", "server/bytes_up"} <= tags
    assert [e.step for e in events.Scalars("success/avg")] == [0, 1, 2]  # every evaluated round
    assert [e.step for e in events.Scalars("client/wordle/train_loss")] == [1, 2]
    back = [e.value for e in events.Scalars("success/maze")]
    evals = [r for r in fed.store.records() if r.event == "eval" and r.env == "maze"]
    assert back == pytest.approx([r.success for r in evals])
    # a run folder with event files is still a run folder --force may replace
    Federation(tiny_config("fed.rounds=0"), tmp_path / "run", Policy(load_base("tiny-random"))).run(force=True)


def test_progress_in_a_log_file_is_one_summary_line_per_phase(capsys):
    bar = progress_bar(3, "maze: train", unit="step")  # pytest's stderr is not a terminal
    for _ in range(3):
        bar.update()
        bar.set_postfix(loss="0.500")
    bar.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "\r" not in err
    assert err.startswith("maze: train: 3/3 step in ") and err.rstrip().endswith("(loss=0.500)")


def test_the_toml_writer_leaves_out_what_toml_cannot_hold():
    config = load_config(None, [*TINY, "eval.tasks=2"])
    assert "max_batch" not in tomllib.loads(to_toml(config))["eval"]  # None: unset


@pytest.mark.slow
def test_loading_the_embedded_model_draws_no_progress_bar(capfd):
    load_base("smollm2-135m", dtype="float32")
    captured = capfd.readouterr()
    assert "Loading weights" not in captured.err + captured.out
