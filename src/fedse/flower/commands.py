"""The commands of Flower's deployment engine as fedse runs them: thin wrappers over Flower's own
(`flower-superlink`, `flower-supernode`, `flwr supernode register`, `flwr run`), so that a fedse
config is all a user writes; the commands are printed, and the README spells them out for machines
where fedse's wrappers are not wanted. Connections go in `$FLWR_HOME/config.toml` as Flower 1.42
expects."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from fedse.flower.certificates import Certificates

APP_DIR = Path(__file__).parent / "app"
"""The Flower App folder (`pyproject.toml` naming fedse's ServerApp and ClientApp)."""
BIN = Path(sys.executable).parent
QUIET_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",  # no call to Flower's servers
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # uv would pull a CUDA torch
    "FLWR_TELEMETRY_ENABLED": "0",
}


def flower_env(home: Path | None = None) -> dict[str, str]:
    env = {**os.environ, **QUIET_ENV}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # Flower starts its helpers by name
    if home is not None:
        env["FLWR_HOME"] = str(home)
    return env


def superlink_command(
    host: str, port: int, state_dir: Path, certs: Certificates | None = None, node_auth: bool = False
) -> list[str]:
    cmd = [str(BIN / "flower-superlink"), "--host", host, "--port", str(port)]
    cmd += ["--disable-runtime-dependency-installation", "--database", str(state_dir / "state.db")]
    if certs is None:
        cmd.append("--insecure")
    else:
        cmd += ["--ssl-ca-certfile", str(certs.ca), "--ssl-certfile", str(certs.server_cert)]
        cmd += ["--ssl-keyfile", str(certs.server_key)]
    if node_auth:
        cmd.append("--enable-supernode-auth")
    return cmd


def supernode_command(
    superlink: str,
    port: int,
    node_config: dict[str, str],
    ca: Path | None = None,
    key: Path | None = None,
    host: str = "127.0.0.1",
) -> list[str]:
    config = " ".join(f'{k}="{v}"' for k, v in node_config.items())
    cmd = [str(BIN / "flower-supernode"), "--superlink", superlink, "--host", host, "--port", str(port)]
    cmd += ["--node-config", config]
    cmd += ["--root-certificates", str(ca)] if ca is not None else ["--insecure"]
    if key is not None:
        cmd += ["--auth-supernode-private-key", str(key)]
    return cmd


def write_connection(home: Path, name: str, address: str, ca: Path | None = None) -> None:
    """`$FLWR_HOME/config.toml` with one connection `name` (Flower 1.42's format), replacing it."""
    home.mkdir(parents=True, exist_ok=True)
    lines = ["[superlink]", f'default = "{name}"', "", f"[superlink.{name}]", f'address = "{address}"']
    lines += [f'root-certificates = "{ca}"'] if ca is not None else ["insecure = true"]
    (home / "config.toml").write_text("\n".join(lines) + "\n")


def register_node(home: Path, connection: str, public_key: Path) -> None:
    """Allow the SuperNode holding `public_key`'s private key to join (`flwr supernode register`)."""
    cmd = [str(BIN / "flwr"), "supernode", "register", str(public_key), connection]
    done = subprocess.run(cmd, env=flower_env(home), capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")


def run_config_arg(options: dict[str, object]) -> str:
    """Flower's `--run-config` string: TOML values, strings quoted."""

    def value(v: object) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int | float):
            return repr(v)
        # a TOML basic string with no literal '"' (Flower's parser ends a value at the next one)
        text = str(v).replace("\\", "\\\\").replace('"', "\\u0022").replace("\n", "\\n")
        return f'"{text}"'

    return " ".join(f"{k}={value(v)}" for k, v in options.items())


def flwr_run_command(connection: str, options: dict[str, object]) -> list[str]:
    return [str(BIN / "flwr"), "run", str(APP_DIR), connection, "--run-config", run_config_arg(options), "--stream"]


def node_command(
    client: str,
    data_dir: Path,
    superlink: str,
    port: int,
    ca: Path | None = None,
    key: Path | None = None,
    env_config: str | None = None,
) -> list[str]:
    """`fedse flower node ...`: a SuperNode for `client` with its worker (its environments
    defined by the `env_config` file, if given)."""
    cmd = [sys.executable, "-m", "fedse.cli", "flower", "node", "--client", client, "--data-dir", str(data_dir)]
    cmd += ["--superlink", superlink, "--port", str(port)]
    if env_config is not None:
        cmd += ["--env-config", env_config]
    if ca is not None:
        cmd += ["--ca", str(ca)]
    if key is not None:
        cmd += ["--key", str(key)]
    return cmd


def node_threads(nodes: int) -> int:
    """Torch threads per SuperNode when `nodes` of them share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // nodes)
