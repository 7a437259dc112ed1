"""A whole deployment on this machine (`fedse flower local`, the deployment tests): certificates,
a SuperLink, one SuperNode and worker per client, and the run, all on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from fedse.errors import UserError
from fedse.flower.certificates import make_certificates
from fedse.flower.commands import (
    flower_env,
    flwr_run_command,
    node_command,
    node_threads,
    register_node,
    superlink_command,
    write_connection,
)
from fedse.flower.options import FlowerOptions
from fedse.flower.processes import Processes, free_port, wait_for_port

SERVER_APP_FAILED = "ServerApp raised an exception"
"""What Flower's streamed log says when the ServerApp failed."""


class LocalDeployment:
    """Flower's deployment engine on this machine for the run `config` describes: a SuperLink and
    one SuperNode (with its worker) per client, each a process in its own group, files and logs
    under `work_dir`. A context manager: every process is stopped on exit.

    `node_auth` implies TLS; `intruder` adds a SuperNode whose key is never registered;
    `node_envs` gives a client's node an env-config file (`fedse.flower.node_envs`). Each
    node gets `os.cpu_count() // clients` torch threads (at least 1), so nodes sharing one
    machine do not oversubscribe its cores (which slows them far more than their share)."""

    def __init__(
        self,
        config: str | Path,
        work_dir: str | Path,
        overrides: list[str] = (),
        tls: bool = False,
        node_auth: bool = False,
        intruder: bool = False,
        node_envs: dict[str, str] | None = None,
    ) -> None:
        from fedse.experiments.config import load_config

        self.config, self.overrides = Path(config).resolve(), list(overrides)
        self.clients = list(load_config(config, self.overrides).client_layout()[0])
        self.work = Path(work_dir).resolve()
        self.processes = Processes(self.work / "logs")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_auth, self.intruder = node_auth, intruder
        self.node_envs = dict(node_envs or {})
        unknown = sorted(set(self.node_envs) - set(self.clients))
        if unknown:
            raise UserError(
                f"--node-env {unknown[0]}=...: the run has no client {unknown[0]!r} ({', '.join(self.clients)})"
            )
        names = [*self.clients, "intruder"] if intruder else self.clients
        hosts = ["127.0.0.1", "localhost"]
        self.certs = make_certificates(self.work / "certs", hosts, names) if tls or node_auth else None
        self.home = self.work / "flwr-home"
        write_connection(self.home, "fedse", self.address, self.certs.ca if self.certs else None)
        self.env = flower_env(self.home)  # Flower installs the app bundle under FLWR_HOME: keep it here
        cores = os.cpu_count() or 1
        self.env["FEDSE_THREADS"] = str(node_threads(len(self.clients)))
        if len(self.clients) > cores:  # more nodes than cores: threads that wait must not spin
            self.env["OMP_WAIT_POLICY"] = "PASSIVE"

    def __enter__(self) -> LocalDeployment:
        try:
            link = self.processes.start(
                "superlink", superlink_command("127.0.0.1", self.port, self.work, self.certs, self.node_auth), self.env
            )
            wait_for_port(self.port, 60, link)
            for client in self.clients:
                if self.node_auth:
                    register_node(self.home, "fedse", self.certs.node_public_key(client))
                self.start_node(client)
            if self.intruder:
                self.start_node(self.clients[0], key_name="intruder", name="node-intruder")
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start_node(self, client: str, key_name: str | None = None, name: str | None = None) -> None:
        """(Re)start `client`'s SuperNode and worker; its data dir is kept across restarts."""
        key_name = key_name or client
        command = node_command(
            client,
            self.work / "nodes" / key_name,
            self.address,
            free_port(),
            ca=self.certs.ca if self.certs else None,
            key=self.certs.node_key(key_name) if self.certs and self.node_auth else None,
            env_config=self.node_envs.get(client),
        )
        self.processes.start(name or f"node-{client}", command, self.env)

    def kill_node(self, client: str) -> None:
        """SIGKILL `client`'s SuperNode and its worker (the whole process group)."""
        self.processes.kill(f"node-{client}")

    def kill_server_app(self) -> int:
        """SIGKILL the ServerApp processes of this SuperLink (Flower starts them detached, outside
        the SuperLink's process group); returns how many were killed."""
        marker = f"--runtime-api-address 127.0.0.1:{self.port}".encode()
        killed = 0
        for proc in Path("/proc").iterdir():
            try:
                cmdline = (proc / "cmdline").read_bytes().replace(b"\0", b" ")
            except (OSError, ValueError):
                continue
            if b"flwr-serverapp" in cmdline and marker in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(proc.name), signal.SIGKILL)
                    killed += 1
        return killed

    def run_command(self, run_dir: str | Path, resume: bool = False, options: dict | None = None) -> list[str]:
        chosen = FlowerOptions(
            config=str(self.config),
            run_dir=str(Path(run_dir).resolve()),
            resume=resume,
            overrides=FlowerOptions.join_overrides(self.overrides),
            **{k.replace("-", "_"): v for k, v in (options or {}).items()},
        )
        return flwr_run_command("fedse", chosen.run_config())

    def run(self, run_dir: str | Path, resume: bool = False, options: dict | None = None, timeout: float = 3600.0):
        """`flwr run` of the config to its end; returns a `LocalResult`."""
        started = time.monotonic()
        done = subprocess.run(
            self.run_command(run_dir, resume, options), env=self.env, capture_output=True, text=True, timeout=timeout
        )
        codes = {name: p.poll() for name, p in self.processes.running.items()}
        return LocalResult(done, codes, self.processes.log_dir, time.monotonic() - started)

    def stop(self) -> None:
        self.kill_server_app()
        self.processes.stop()


def run_local(
    config: str | Path,
    run_dir: str | Path,
    work_dir: str | Path,
    overrides: list[str] = (),
    tls: bool = False,
    node_auth: bool = False,
    resume: bool = False,
    timeout: float = 3600.0,
    options: dict[str, object] | None = None,
    intruder: bool = False,
    node_envs: dict[str, str] | None = None,
) -> LocalResult:
    """A whole deployment on this machine (`LocalDeployment`) running `config` to its end into
    `run_dir`, then stopped."""
    with LocalDeployment(config, work_dir, overrides, tls, node_auth, intruder, node_envs) as deployment:
        return deployment.run(run_dir, resume, options, timeout)


@dataclass
class LocalResult:
    run: subprocess.CompletedProcess
    """`flwr run`'s process (its stdout holds the streamed log of the ServerApp)."""
    exit_codes: dict[str, int | None]
    """Each started process's exit code when the run ended (None: still running)."""
    logs: Path
    seconds: float
    """Wall time of `flwr run` (the processes already listening)."""

    @property
    def ok(self) -> bool:
        """Whether the run ended well: `flwr run --stream` exits 0 even when the ServerApp raised
        (it only streams the log), so its log is read too."""
        return self.run.returncode == 0 and SERVER_APP_FAILED not in self.run.stdout + self.run.stderr
