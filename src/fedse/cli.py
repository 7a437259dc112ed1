"""`fedse` command line: the machine (info), environments (envs, play, experts) and federated runs (run, eval, report)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from fedse.envs import list_envs, make_env, replay
from fedse.errors import UserError
from fedse.flower.cli import add_flower_parser
from fedse.process import set_up_process
from fedse.run_options import add_run_folder_options, chosen_run_folder


def cmd_envs(args: argparse.Namespace) -> int:
    print(f"{'env':<10} {'test':>5} {'train':>6} {'max turns':>9}  task ids")
    for name in list_envs():
        env = make_env(name)
        print(
            f"{name:<10} {len(env.splits['test']):>5} {len(env.splits['train']):>6} {env.max_turns:>9}  {env.valid_ids_text()}"
        )
    return 0


def cmd_play(args: argparse.Namespace, read: Callable[[str], str] = input) -> int:
    env = make_env(args.env)
    task = args.task if args.task is not None else env.splits["test"][0]
    observation = env.reset(task)
    print(
        f"{env.instruction}\n\n--- {env.name} task {task} (type an action, or 'Thought: ...' with 'Action: ...'; Ctrl-D quits)"
    )
    print(observation)
    for turn in range(1, env.max_turns + 1):
        try:
            text = read(f"[{turn}/{env.max_turns}] > ")
        except EOFError:
            print()
            return 0
        result = env.step(text if "Action:" in text else f"Action: {text}")
        print(result.observation.rstrip("\n"))
        print(f"(action {result.action!r}, reward {result.reward:g}, done {result.done})")
        if result.done:
            print("Success!" if result.success else "Game over.")
            return 0
    print(f"Out of turns ({env.max_turns}).")
    return 0


def cmd_experts(args: argparse.Namespace) -> int:
    """Replay each environment's expert on a split; print success rates and turns."""
    print(f"{'env':<10} {'split':<5} {'tasks':>5} {'solved':>7} {'in limit':>9} {'mean turns':>10} {'s':>6}")
    all_solved = True
    for name in args.envs or list_envs():
        env = make_env(name)
        ids = env.splits[args.split]
        start = time.perf_counter()
        results = [replay(env, i, env.expert(i)) for i in ids]
        solved = sum(ok for ok, _ in results)
        in_limit = sum(ok and turns <= env.max_turns for ok, turns in results)
        mean_turns = sum(t for _, t in results) / len(results)
        all_solved &= solved == len(ids)
        print(
            f"{name:<10} {args.split:<5} {len(ids):>5} {solved / len(ids):>7.1%} {in_limit / len(ids):>9.1%}"
            f" {mean_turns:>10.2f} {time.perf_counter() - start:>6.2f}"
        )
    return 0 if all_solved else 1


def cmd_info(args: argparse.Namespace) -> int:
    """The machine as fedse sees it: CPU, threads, torch, and the base model's dtype with the reason."""
    import os

    import torch

    from fedse.agent.dtype import choose_dtype, cpu_model, describe_bf16_flags
    from fedse.agent.model import cache_dir

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"cpu        {cpu_model()} ({os.cpu_count()} logical cores; {describe_bf16_flags()})")
    print(
        f"torch      {torch.__version__}, {torch.get_num_threads()} threads "
        f"(OMP_WAIT_POLICY {os.environ.get('OMP_WAIT_POLICY', 'unset')}), kernels {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"device     {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    choice = choose_dtype(device, 576, 1536, cache_dir())  # SmolLM2-135M's hidden and MLP sizes
    print(f'dtype      {choice.dtype} for model.dtype = "auto": {choice.reason}')
    if choice.fp32_ms is not None:
        print(
            f"           micro-benchmark: fp32 {choice.fp32_ms:.2f} ms, bf16 {choice.bf16_ms:.2f} ms per round of linears"
        )
    print(f"cache      {cache_dir()}")
    return 0


def _quiet_libraries() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers/peft noise


def _run_config(root: Path):
    from fedse.experiments.config import validate_config
    from fedse.experiments.store import RunStore

    return validate_config(RunStore(root).read_config(), where=str(root / "config.json"))


def cmd_run(args: argparse.Namespace) -> int:
    from fedse.agent.model import TINY
    from fedse.experiments.config import check_run_name, load_config
    from fedse.experiments.federation import Federation
    from fedse.experiments.report import round_summary, write_report
    from fedse.experiments.store import machine_record

    _quiet_libraries()
    named = None if isinstance(args.resume, str) and not args.config else load_config(args.config, args.set)
    if named is not None and args.name is not None:
        named = named.model_copy(update={"name": check_run_name(args.name)})
    root, resume = chosen_run_folder(args, named.name if named is not None else "")
    if resume:
        config = _run_config(root)
        if args.config or args.set:  # checked against the run's own when it resumes (--change-config)
            changed = load_config(args.config, args.set, base=None if args.config else config.model_dump())
            config = changed.model_copy(update={"name": config.name})
    else:
        config = named
    print(
        f"run {config.name}: {len(config.fed.clients)} clients ({', '.join(config.fed.clients)}), "
        f"{config.fed.rounds} rounds, aggregator {config.fed.aggregator}, model {config.model.name} -> {root}"
    )
    start = time.perf_counter()
    federation = Federation(config, root, progress=True)
    sitting = machine_record(federation.policy.dtype, resume)
    auto_fp32 = config.base_dtype() == "auto" and sitting["dtype"] == "float32"
    slower = " (bf16 measured slower here; the README's demo times are bf16's, expect 1.5-4x)"
    print(
        f"on {sitting['cpu']}: base model in {sitting['dtype']}, {sitting['threads']} threads"
        f"{slower if auto_fp32 and config.model.name != TINY else ''}; `fedse info` says why"
    )
    federation.run(
        resume=resume,
        force=args.force,
        change_config=args.change_config,
        echo=lambda records: print(round_summary(records, config.fed.rounds, config.fed.aggregator)),
        finish=lambda: write_report([root]),  # under the run's lock
    )
    report = root / "report.md"
    print(
        f"done in {(time.perf_counter() - start) / 60:.1f} min: report {report}, plots beside it, metrics {root / 'metrics.jsonl'}"
    )
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from fedse.experiments.federation import Federation
    from fedse.experiments.report import wilson

    _quiet_libraries()
    if args.tasks is not None and args.tasks < 0:
        raise UserError(f"--tasks must be 0 (the whole test split) or a positive count, got {args.tasks}")
    root = Path(args.run_dir)
    config = _run_config(root)
    if args.tasks is not None:
        config = config.model_copy(update={"eval": config.eval.model_copy(update={"tasks": args.tasks or None})})
    result, out = Federation(config, root, progress=True).evaluate_checkpoint(args.round)
    print(f"round {result['round']} of {root}, greedy, {config.eval.tasks or 'all'} test tasks per env:")
    for env, r in result["eval"].items():
        lo, hi = wilson(r["successes"], r["tasks"])
        print(
            f"  {env:<10} {r['successes']:>3}/{r['tasks']:<3} {r['success']:6.1%}  [{lo:.0%}, {hi:.0%}]  mean reward {r['reward']:.3f}"
        )
    print(f"  Avg (task-weighted) {result['avg_weighted']:.1%}, mean over envs {result['avg_mean']:.1%} -> {out}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    """`fedse config show|check CONFIG`: the resolved configuration (defaults and --set applied),
    as TOML that `fedse run` takes back; or only whether it is valid."""
    from fedse.experiments.config import load_config, to_toml

    config = load_config(args.config, args.set)
    if args.action == "show":
        sys.stdout.write(to_toml(config))
        return 0
    clients = list(config.client_layout()[0])
    print(
        f"{args.config or 'the defaults'}: valid; run {config.name!r}, {len(clients)} clients ({', '.join(clients)}), "
        f"{config.fed.rounds} rounds, aggregator {config.fed.aggregator}, model {config.model.name}"
    )
    return 0


def cmd_docs(args: argparse.Namespace) -> int:
    """`fedse docs tables [--check]`: regenerate the README's and the docs' generated tables."""
    from fedse.doc_tables import regenerate

    repo = Path(args.repo).resolve()
    changed = regenerate(repo)
    if args.check:
        if changed:
            names = ", ".join(str(p.relative_to(repo)) for p in changed)
            raise UserError(f"generated tables out of date in {names}: run `fedse docs tables`")
        print("generated tables are up to date")
        return 0
    for path, text in changed.items():
        path.write_text(text)
        print(f"updated {path.relative_to(repo)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedse.experiments.report import write_report

    report = write_report(args.run_dirs, args.out)
    print(f"wrote {report} and its plots ({', '.join(p.name for p in sorted(report.parent.glob('*.png')))})")
    return 0


def cmd_experiment(args: argparse.Namespace) -> int:
    from fedse.experiments.experiment_report import experiment_report
    from fedse.experiments.federation import Federation
    from fedse.experiments.grid import load_experiment, run_grid
    from fedse.experiments.methods import METHODS

    _quiet_libraries()
    experiment, cells = load_experiment(args.file)
    if args.methods:
        unknown = sorted(set(args.methods) - set(experiment.methods))
        if unknown:
            raise UserError(
                f"--methods {', '.join(unknown)}: not in {args.file} (it has {', '.join(experiment.methods)})"
            )
        cells = [c for c in cells if c.method in args.methods]
    root = cells[0].root.parents[1]
    if not args.report_only:

        def run_cell(cell, resume):
            federation = Federation(cell.config, cell.root, progress=True)
            federation.run(
                resume=resume,
                force=not resume,
                echo=lambda records: print(f"  {cell.method} seed {cell.seed}: round {records.round} done"),
            )

        counts = run_grid(cells, run_cell)
        print(", ".join(f"{n} {k}" for k, n in counts.items()))
    definitions = {m: METHODS[m].definition for m in experiment.methods}
    seeds = {m: experiment.seeds_of(m) for m in experiment.methods}
    report = experiment_report(root, seeds, definitions, experiment.references)
    print(f"report {report}")
    return 0


def cmd_serve_env(args: argparse.Namespace) -> int:
    from fedse.envs.http_server import serve

    if args.env_class:
        from fedse.envs import register_env

        register_env(args.env, args.env_class)
    serve(args.env, host=args.host, port=args.port, ttl=args.ttl)
    return 0


def cmd_traj(args: argparse.Namespace) -> int:
    from fedse.evolve.agenttraj import read_agenttraj, write_agenttraj
    from fedse.evolve.buffer import ExperienceBuffer
    from fedse.experiments.store import RunStore

    if args.action == "check":
        for path in args.paths:
            records = read_agenttraj(path)
            print(f"{path}: {len(records)} AgentTraj records, {sum(r.success for r in records)} successful")
        return 0
    if len(args.paths) != 1 or not args.out:
        raise UserError("traj export takes one run folder and --out FILE.json")
    buffers = RunStore(args.paths[0]).buffers()
    if not buffers:
        raise UserError(f"{args.paths[0]}: no client buffers (clients/*/buffer.jsonl); is it a fedse run folder?")
    kept = [t for path in buffers for _, t in ExperienceBuffer(path).entries if t.success or args.all]
    count = write_agenttraj(kept, args.out)
    print(f"wrote {count} trajectories from {len(buffers)} client buffers to {args.out}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("fedse")
    except PackageNotFoundError:  # a source tree on sys.path, not installed
        return "unknown (not installed)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedse", description="Federated self-evolution of LLM agents.")
    parser.add_argument(
        "--threads",
        type=int,
        help="torch threads (default: $FEDSE_THREADS, else one per core); 1 on a machine shared with other busy work",
    )
    parser.add_argument("--version", action="version", version=f"fedse {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("envs", help="list the environments and their splits").set_defaults(run=cmd_envs)
    sub.add_parser("info", help="the machine, threads and the dtype fedse runs the model in, and why").set_defaults(
        run=cmd_info
    )
    play = sub.add_parser("play", help="play an environment in the terminal")
    play.add_argument("env", help=f"one of: {', '.join(list_envs())}")
    play.add_argument("--task", type=int, help="task id (default: the first test id)")
    play.set_defaults(run=cmd_play)
    experts = sub.add_parser("experts", help="check the expert solvers on a split")
    experts.add_argument("--split", choices=["test", "train"], default="test")
    experts.add_argument("--envs", nargs="*", help="environments (default: all)")
    experts.set_defaults(run=cmd_experts)
    run = sub.add_parser("run", help="run a federated self-evolution experiment")
    run.add_argument("config", nargs="?", help="TOML file (e.g. configs/demo.toml); defaults apply without one")
    run.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. fed.rounds=3")
    run.add_argument("--name", help="run name (default: the config's)")
    add_run_folder_options(run)
    run.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    run.add_argument(
        "--change-config",
        action="store_true",
        help="with --resume: apply a changed config (--set, a config file, an edited config.json) that changes "
        "only how long the run goes, how it is evaluated, batched and kept, or where its environments' servers "
        "are (a refused change names the keys that may change)",
    )
    run.set_defaults(run=cmd_run)
    config = sub.add_parser("config", help="show a run configuration as fedse resolves it, or check it")
    config.add_argument("action", choices=["show", "check"], help="show: print it as TOML; check: validate only")
    config.add_argument("config", nargs="?", help="TOML file (defaults apply without one)")
    config.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override, e.g. fed.rounds=3")
    config.set_defaults(run=cmd_config)
    ev = sub.add_parser("eval", help="evaluate a run's checkpoint on the test splits")
    ev.add_argument("run_dir")
    ev.add_argument("--round", type=int, help="checkpoint round (default: the last completed)")
    ev.add_argument("--tasks", type=int, help="test tasks per env (0: all; default: the run's eval.tasks)")
    ev.set_defaults(run=cmd_eval)
    exp = sub.add_parser("experiment", help="run (or continue) a grid of methods x seeds and write its report")
    exp.add_argument("file", help="experiment TOML, e.g. configs/experiments/table1-cpu.toml")
    exp.add_argument("--methods", nargs="+", help="run only these of the file's methods")
    exp.add_argument("--report-only", action="store_true", help="rebuild the report from the results, run nothing")
    exp.set_defaults(run=cmd_experiment)
    report = sub.add_parser("report", help="write report.md and plots for one or more runs")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    report.add_argument("--out", help="output folder (default: the run's own, or <first>-vs-<second>... beside it)")
    report.set_defaults(run=cmd_report)
    docs = sub.add_parser("docs", help="the README's and the docs' tables, generated from the code and results/")
    docs.add_argument("action", choices=["tables"])
    docs.add_argument("--check", action="store_true", help="fail if a generated table is out of date; write nothing")
    docs.add_argument("--repo", default=".", help="the repository root (default: here)")
    docs.set_defaults(run=cmd_docs)
    serve_env = sub.add_parser("serve-env", help="serve an environment over AgentGym's HTTP protocol")
    from fedse.envs.http_server import SERVERS

    serve_env.add_argument(
        "env", help=f"an environment (yours too: installed, or --class), or a group: {', '.join(SERVERS)}"
    )
    serve_env.add_argument("--class", dest="env_class", metavar="PKG.MODULE:CLASS", help="serve this TextEnv as ENV")
    serve_env.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    serve_env.add_argument("--port", type=int, default=36001)
    serve_env.add_argument("--ttl", type=float, default=600.0, help="seconds an idle session lives")
    serve_env.set_defaults(run=cmd_serve_env)
    traj = sub.add_parser("traj", help="AgentTraj files: check them, or export a run's trajectories as one")
    traj.add_argument("action", choices=["check", "export"])
    traj.add_argument("paths", nargs="+", metavar="PATH", help="check: AgentTraj JSON files; export: a run folder")
    traj.add_argument("--out", help="export: the AgentTraj JSON file to write")
    traj.add_argument("--all", action="store_true", help="export: every kept trajectory, not only successful ones")
    traj.set_defaults(run=cmd_traj)
    add_flower_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        set_up_process(args.threads)
        return args.run(args)
    except (UserError, FileExistsError, FileNotFoundError) as error:
        print(f"fedse: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fedse: interrupted; a run continues from its last completed round with --resume", file=sys.stderr)
        return 130
    except OSError as error:  # a full disk, a path that is a file, permissions: the system's words, one line
        where = f" ({error.filename})" if error.filename else ""
        print(f"fedse: error: {error.strerror or error}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
