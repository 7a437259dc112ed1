"""Processes on one machine: a SuperNode beside its long-lived worker (`fedse flower node`), and
child processes started and stopped together (`fedse flower local`, the deployment tests)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

from fedse.flower.commands import flower_env


def run_node(command: list[str], node_config: dict[str, str]) -> int:
    """Run the worker (`fedse.flower.worker.serve`) here and the SuperNode `command` as a child;
    the SuperNode starts once the worker listens, and the node ends when either ends."""
    from fedse.flower.worker import serve

    child: list[subprocess.Popen] = []

    def start() -> None:
        child.append(subprocess.Popen(command, env=flower_env()))
        threading.Thread(target=watch, daemon=True).start()

    def watch() -> None:
        code = child[0].wait()
        os._exit(code)  # the SuperNode ended (refused, or stopped): so does its worker

    def stop(signum, frame) -> None:
        if child and child[0].poll() is None:
            child[0].terminate()
            try:
                child[0].wait(10)
            except subprocess.TimeoutExpired:
                child[0].kill()
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    serve(node_config, ready=start)
    return 0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float, process: subprocess.Popen | None = None, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode} before listening on {port}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout:g} s")


class Processes:
    """Child processes started in their own process groups, stopped together."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.running: dict[str, subprocess.Popen] = {}

    def start(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 -- the child holds it
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.running[name] = process
        return process

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        process = self.running.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        process.wait(30)

    def log(self, name: str) -> str:
        path = self.log_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        for name in list(self.running):
            process = self.running[name]
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            with contextlib.suppress(ProcessLookupError):  # whatever the group left (superexec, clientapps)
                os.killpg(process.pid, signal.SIGKILL)
            self.running.pop(name)
