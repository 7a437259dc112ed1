"""What a SuperNode's own configuration says about the environments it holds.

A node may keep its environment to itself. The server's run configuration names the client
(`fed.clients`) and, for an environment the server cannot know, `[env.<name>] backend = "node"`;
the node's configuration (`fedse flower node`, or Flower's `--node-config`) says what it is and
where it runs:

- `env-config`: a TOML file of `[env.<name>]` tables, the tables a run configuration takes (a
  class and its options, or a game on its server only), for the environments this node holds;
  a relative `instruction_file` in it is read beside the file;
- `env-class`: "package.module:ClassName" of this node's environment;
- `env-url` / `env-timeout`: the AgentGym-compatible server its games run on.

They replace the run configuration's table of that environment, on this node only (in that
order: the file's table, then the class, then the address). A package installed on the node that
registers the environment (entry point `fedse.envs`) needs none of them.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from fedse.envs import defined_on_its_node
from fedse.errors import UserError
from fedse.experiments.config import RunConfig, validate_config


def read_env_tables(path: Path) -> dict[str, dict]:
    """The `[env.<name>]` tables of the TOML file at `path`, or a one-line UserError."""
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UserError(f"env-config {path}: cannot read it ({error.strerror or error})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"env-config {path}: not valid TOML ({error})") from None
    other = sorted(set(tree) - {"env"})
    if other or not isinstance(tree.get("env"), dict):
        found = f"[{other[0]}]" if other else "no [env.<name>] table"
        raise UserError(f"env-config {path}: holds only [env.<name>] tables, found {found}")
    tables = {}
    for name, table in tree["env"].items():
        if not isinstance(table, dict):
            raise UserError(f"env-config {path}: env.{name} is not a table; write [env.{name}]")
        table = dict(table)
        if isinstance(table.get("instruction_file"), str):  # beside the file, wherever the node starts
            table["instruction_file"] = str(path.parent / Path(table["instruction_file"]).expanduser())
        tables[name] = table
    return tables


@dataclass(frozen=True)
class NodeEnvs:
    """A node's own environment settings (its node configuration's `env-*` keys)."""

    tables: dict[str, dict] = field(default_factory=dict)
    """From `env-config`: environment -> its `[env.<name>]` table."""
    class_: str | None = None
    url: str | None = None
    timeout: float | None = None

    @classmethod
    def from_node_config(cls, node_config: dict) -> NodeEnvs:
        path = node_config.get("env-config")
        tables = read_env_tables(Path(str(path)).expanduser().resolve()) if path else {}
        timeout = node_config.get("env-timeout")
        try:
            timeout = float(timeout) if timeout is not None else None
        except ValueError:
            raise UserError(f"env-timeout = {timeout!r}: give the seconds a request may take, e.g. 30") from None
        class_, url = node_config.get("env-class"), node_config.get("env-url")
        return cls(tables, str(class_) if class_ else None, str(url) if url else None, timeout)

    def run_config(self, tree: dict, client: str) -> RunConfig:
        """The server's run configuration `tree` as client `client` runs it on this node: the
        tables of the environments it holds replaced by this node's."""
        run = validate_config(tree, where="the server's run configuration")
        envs = run.client_layout()[0].get(client)
        if envs is None:
            return run  # NodeClient says which clients the run has
        unknown = sorted(set(self.tables) - set(envs))
        if unknown:
            raise UserError(
                f"env-config: [env.{unknown[0]}] is not an environment this node holds (client {client} holds "
                f"{', '.join(envs)})"
            )
        if (self.class_ or self.url or self.timeout) and len(envs) != 1:
            raise UserError(
                f"env-class, env-url and env-timeout name one environment; client {client} holds {len(envs)}: "
                "give each its [env.<name>] table in env-config"
            )
        tables = dict(tree.get("env") or {})
        for env in envs:
            table = self.tables.get(env, tables.get(env) or {})
            table = {} if table.get("backend") == "node" else dict(table)
            if self.class_:
                table["class"] = self.class_
            if self.url:
                table.update(backend="http", url=self.url)
            if self.timeout is not None:
                table["timeout"] = self.timeout
            tables[env] = table
        if self.tables or self.class_ or self.url or self.timeout is not None:
            run = validate_config({**tree, "env": tables}, where="this node's environments")
        for env in envs:
            if defined_on_its_node(env):
                raise UserError(
                    f"environment {env!r}: this node holds it but does not define it: start the node with "
                    "--env-config FILE or --env-class PACKAGE.MODULE:CLASS, or install the package that registers it"
                )
        return run
