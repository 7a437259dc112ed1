"""The ServerApp's run options, declared once: Flower's run config (`flwr run --run-config`)
carries them, `fedse flower run` and the local deployment build them here, and the Flower App's
pyproject.toml declares the same keys with the same defaults (a test keeps them equal)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, fields

from fedse.errors import UserError


@dataclass(frozen=True)
class FlowerOptions:
    """The ServerApp's run config (Flower's `--run-config`, keys with dashes)."""

    config: str = ""
    """The fedse TOML of the run (a path on the server machine)."""
    run_dir: str = ""
    """The run folder (default: runs/<name>)."""
    resume: bool = False
    """Continue the run folder from its last completed round."""
    force: bool = False
    overrides: str = ""
    """`--set`-style overrides, space-separated, quoted as a shell would where they hold spaces:
    "fed.rounds=2 'fed.clients=[\"maze\", \"wordle\"]'" (`join_overrides`, `override_list`)."""
    min_clients: int = 1
    """Fewest clients whose updates a round needs; with fewer replies the run stops (resumable)."""
    round_timeout: float = 3600.0
    """Seconds to wait for the replies of one phase before going on with those that came."""
    wait_for_nodes: float = 120.0
    """Seconds to wait at the start for every client's SuperNode to connect."""
    node_root: str = ""
    """Where nodes without a `data-dir` keep their files (simulation; default <run-dir>/nodes)."""
    poll: float = 0.5

    @classmethod
    def from_run_config(cls, run_config: dict) -> FlowerOptions:
        """The options among `run_config`'s keys (Flower already refuses keys the app does not declare)."""
        known = {f.name for f in fields(cls)}
        values = {k.replace("-", "_"): v for k, v in run_config.items() if k.replace("-", "_") in known}
        if not values.get("config"):
            raise UserError(
                "the fedse ServerApp needs a config: flwr run ... --run-config \"config='path/to/run.toml'\""
            )
        return cls(**values)

    @staticmethod
    def join_overrides(items: list[str]) -> str:
        return shlex.join(items)

    def override_list(self) -> list[str]:
        try:
            return shlex.split(self.overrides)
        except ValueError as error:
            raise UserError(f"run config overrides = {self.overrides!r}: {error}") from None

    def run_config(self) -> dict[str, object]:
        """These options as Flower's run config (dashed keys): what `flwr run --run-config` is given."""
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in fields(self)}
