"""The `fedse` command line: envs, play, experts, and one-line errors for bad input."""

import json
import subprocess
import sys

import pytest
import torch

from fedse.cli import build_parser, cmd_play, main
from fedse.envs import make_env


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedse.cli", *args], capture_output=True, text=True, timeout=60)


def test_envs_lists_split_sizes(capsys):
    assert main(["envs"]) == 0
    out = capsys.readouterr().out
    assert "maze" in out and "textcraft" in out
    assert out.splitlines()[3].split()[:4] == ["textcraft", "100", "374", "20"]


def test_wrong_env_name_is_a_one_line_error():
    proc = run_cli("play", "mazee")
    assert proc.returncode == 2
    assert (
        proc.stderr.strip()
        == "fedse: error: unknown environment 'mazee'; choose one of: maze, wordle, textcraft, babyai, webshop"
    )


def test_wrong_task_id_is_a_one_line_error():
    proc = run_cli("play", "maze", "--task", "99")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "fedse: error: maze: unknown task id 99; valid ids are 0..24"


def test_play_reads_actions_until_the_goal(capsys):
    moves = iter(["move down"])
    args = build_parser().parse_args(["play", "maze", "--task", "18"])
    assert cmd_play(args, read=lambda prompt: next(moves)) == 0
    out = capsys.readouterr().out
    assert "Your current position is at position 7, 6." in out
    assert "Success" in out and "reward 1, done True" in out


def test_play_stops_at_the_turn_limit(capsys):
    args = build_parser().parse_args(["play", "maze", "--task", "0"])
    assert cmd_play(args, read=lambda prompt: "Thought: bump.\nAction: move up") == 0
    assert "Out of turns (15)." in capsys.readouterr().out


def test_play_quits_on_end_of_input(capsys):
    prompts = []

    def eof(prompt):
        prompts.append(prompt)
        raise EOFError

    args = build_parser().parse_args(["play", "wordle"])
    assert cmd_play(args, read=eof) == 0
    out = capsys.readouterr().out
    assert prompts == ["[1/8] > "]  # asked once, then stopped at end of input
    assert "--- wordle task 0" in out and "Out of turns" not in out and "Game over" not in out


@pytest.mark.parametrize("env", ["maze", "wordle", "textcraft"])
def test_experts_command_reports_full_success(env, capsys):
    assert main(["experts", "--envs", env]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    assert row[:4] == [env, "test", str(len(make_env(env).splits["test"])), "100.0%"]


def test_info_says_which_dtype_and_why(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("FEDSE_CACHE", str(tmp_path))
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    dtype_line = next(line for line in out.splitlines() if line.startswith("dtype"))
    assert dtype_line.split()[1] in ("bfloat16", "float32") and "measured" in dtype_line
    assert (tmp_path / "dtype").is_dir()  # the decision is kept for the next load


def test_threads_come_from_the_flag_or_the_environment_and_bad_counts_are_one_line_errors(monkeypatch, capsys):
    from fedse.process import thread_count

    monkeypatch.delenv("FEDSE_THREADS", raising=False)
    assert thread_count() is None
    monkeypatch.setenv("FEDSE_THREADS", "1")
    assert thread_count() == 1 and thread_count(3) == 3
    monkeypatch.setenv("FEDSE_THREADS", "two")
    assert main(["envs"]) == 2
    assert "FEDSE_THREADS / --threads must be a positive whole number of threads, got 'two'" in capsys.readouterr().err
    monkeypatch.delenv("FEDSE_THREADS")
    assert main(["--threads", "0", "envs"]) == 2


def test_threads_flag_sets_torch_threads():
    done = run_cli("--threads", "1", "info")
    assert done.returncode == 0, done.stderr
    assert "1 threads" in done.stdout


def test_run_name_dot_dot_with_force_deletes_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("precious")
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "other-run.txt").write_text("also precious")
    for name in ("..", str(tmp_path), "../x"):
        assert main(["run", "--set", "model.name='tiny-random'", "--name", name, "--force"]) == 2
        assert "must be a plain folder name" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "precious"
    assert (runs / "other-run.txt").read_text() == "also precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt", "runs"]


def test_a_bad_key_in_a_runs_config_json_is_a_one_line_error(tmp_path, capsys):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    (run_dir / "config.json").write_text('{"fed": {"roundz": 3}}')
    assert main(["run", "--resume", str(run_dir)]) == 2
    assert (
        capsys.readouterr().err.strip().startswith(f"fedse: error: {run_dir / 'config.json'}: unknown key 'fed.roundz'")
    )


def test_eval_refuses_a_negative_task_count(capsys, tmp_path):
    assert main(["eval", str(tmp_path), "--tasks", "-1"]) == 2
    assert "--tasks must be 0 (the whole test split) or a positive count, got -1" in capsys.readouterr().err


def test_run_says_and_records_the_machine_and_dtype_it_ran_in(tmp_path, capsys):
    from helpers import TINY

    sets = [f"--set={s}" for s in [*TINY, "fed.rounds=1", "fed.clients=['maze']"]]
    assert main(["run", "--runs-dir", str(tmp_path), "--name", "r", *sets]) == 0
    out = capsys.readouterr().out
    assert "base model in float32, " in out and "bf16 measured slower" not in out  # tiny: fp32 by rule
    lines = (tmp_path / "r" / "machine.jsonl").read_text().splitlines()
    assert len(lines) == 1
    sitting = json.loads(lines[0])
    assert sitting["dtype"] == "float32" and sitting["resumed"] is False and sitting["cpu"]
    assert sitting["threads"] == torch.get_num_threads()


def test_run_and_flower_name_and_resume_a_run_folder_the_same_way(tmp_path, capsys):
    from fedse.cli import build_parser
    from helpers import TINY

    sets = [f"--set={s}" for s in [*TINY, "fed.rounds=1", "fed.clients=['maze']"]]
    folder = tmp_path / "mine"
    assert main(["run", "--run-dir", str(folder), *sets]) == 0
    more = [*sets[:-2], "--set=fed.rounds=2", "--set=fed.clients=['maze']", "--change-config"]
    assert main(["run", "--run-dir", str(folder), "--resume", *more]) == 0  # the flag, with --run-dir
    assert (
        main(["run", "--resume", str(folder), "--set=fed.rounds=3", "--change-config"]) == 0
    )  # the folder as its value
    sittings = [json.loads(line)["resumed"] for line in (folder / "machine.jsonl").read_text().splitlines()]
    assert sittings == [False, True, True]
    assert main(["run", "--resume", str(folder), "--run-dir", str(tmp_path / "other")]) == 2
    assert "name two folders" in capsys.readouterr().err
    parser = build_parser()
    flower_run = ["flower", "run", "a.toml", "--superlink", "h:9093"]
    for argv in (["run"], ["flower", "sim", "a.toml"], ["flower", "local", "a.toml"], flower_run):
        args = parser.parse_args([*argv, "--resume", "runs/x"])
        assert args.resume == "runs/x" and args.run_dir is None and args.runs_dir == "runs"
        assert parser.parse_args([*argv, "--run-dir", "d", "--resume"]).resume is True
