"""`fedse` command line: environments (envs, play, experts) and federated runs (run)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from collections.abc import Callable

from fedse.envs import EnvError, TextEnv, list_envs, make_env
from fedse.errors import UserError


def replay(env: TextEnv, task_id: int, outputs: list[str]) -> tuple[bool, int]:
    """Play `outputs` on task `task_id`; returns (success, turns used)."""
    env.reset(task_id)
    for turn, output in enumerate(outputs, start=1):
        result = env.step(output)
        if result.done:
            return result.success, turn
    return False, len(outputs)


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


def cmd_run(args: argparse.Namespace) -> int:
    import json
    import logging
    from pathlib import Path

    from fedse.experiments.config import RunConfig, load_config
    from fedse.experiments.run import Federation

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # transformers/peft noise
    if args.resume:
        root = Path(args.resume)
        if not (root / "config.json").exists():
            raise EnvError(f"{root} is not a run directory (no config.json)")
        config = RunConfig.model_validate(json.loads((root / "config.json").read_text()))
    else:
        config = load_config(args.config, args.set)
        if args.name:
            config = config.model_copy(update={"name": args.name})
        root = Path(args.runs_dir) / config.name
    print(
        f"run {config.name}: {len(config.fed.clients)} clients ({', '.join(config.fed.clients)}), "
        f"{config.fed.rounds} rounds, aggregator {config.fed.aggregator}, model {config.model.name} -> {root}"
    )
    Federation(config, root).run(resume=bool(args.resume), force=args.force)
    print(f"done: metrics in {root / 'metrics.jsonl'}, checkpoints in {root / 'checkpoints'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fedse", description="Federated self-evolution of LLM agents.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("envs", help="list the environments and their splits").set_defaults(run=cmd_envs)
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
    run.add_argument("--runs-dir", default="runs")
    run.add_argument("--resume", metavar="RUN_DIR", help="continue a run after its last completed round")
    run.add_argument("--force", action="store_true", help="overwrite an existing run directory")
    run.set_defaults(run=cmd_run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (UserError, FileExistsError, FileNotFoundError) as error:
        print(f"fedse: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
