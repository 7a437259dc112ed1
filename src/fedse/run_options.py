"""The command-line options that name a run folder, spelt and meant the same in `fedse run` and
`fedse flower` (no torch here: the CLI builds its parsers before it imports the model stack)."""

from __future__ import annotations

from pathlib import Path

from fedse.errors import UserError


def add_run_folder_options(parser, default: str = "<runs-dir>/<the config's name>") -> None:
    """The options that name a run folder, spelt and meant the same in `fedse run` and `fedse flower`."""
    parser.add_argument("--run-dir", help=f"the run folder (default: {default})")
    parser.add_argument("--runs-dir", default="runs", help="where run folders go by default (default: runs)")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=False,
        metavar="RUN_DIR",
        help="continue the run folder after its last completed round (--resume RUN_DIR: --run-dir RUN_DIR --resume)",
    )


def chosen_run_folder(args, name: str) -> tuple[Path, bool]:
    """(the run folder, whether to resume it) from `add_run_folder_options`' arguments; `name`:
    the default folder's name under --runs-dir."""
    if isinstance(args.resume, str):
        if args.run_dir and Path(args.run_dir).resolve() != Path(args.resume).resolve():
            raise UserError(f"--resume {args.resume} and --run-dir {args.run_dir} name two folders; give one of them")
        return Path(args.resume), True
    return (Path(args.run_dir) if args.run_dir else Path(args.runs_dir) / name), bool(args.resume)
