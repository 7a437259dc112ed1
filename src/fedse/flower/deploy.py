"""Flower's deployment engine for fedse: certificates, a SuperLink, SuperNodes with their worker, a run.

These are thin wrappers over Flower's own commands (`flower-superlink`, `flower-supernode`,
`flwr supernode register`, `flwr run`), so that a fedse config is all a user writes; the
commands they run are printed, and the README spells them out for machines where fedse's
wrappers are not wanted. Connections go in `$FLWR_HOME/config.toml` as Flower 1.42 expects.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

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


# --- certificates and node keys ----------------------------------------------------------------


@dataclass(frozen=True)
class Certificates:
    """A CA, the SuperLink's certificate signed by it, and SuperNode key pairs (OpenSSH EC keys)."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.pem"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def node_key(self, name: str) -> Path:
        return self.directory / name

    def node_public_key(self, name: str) -> Path:
        return self.directory / f"{name}.pub"


def make_certificates(directory: str | Path, hosts: list[str], nodes: list[str], days: int = 365) -> Certificates:
    """Write a CA, a SuperLink certificate valid for `hosts` (IP addresses or DNS names) and one
    key pair per name in `nodes` into `directory` (private keys mode 0600)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    certs = Certificates(Path(directory))
    certs.directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def write(path: Path, data: bytes, private: bool = False) -> None:
        path.write_bytes(data)
        if private:
            path.chmod(0o600)

    def name(common: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("fedse federation CA"))
        .issuer_name(name("fedse federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    write(certs.ca, ca.public_bytes(serialization.Encoding.PEM))
    server_key = ec.generate_private_key(ec.SECP384R1())
    alt = []
    for host in hosts:
        try:
            alt.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            alt.append(x509.DNSName(host))
    server = (
        x509.CertificateBuilder()
        .subject_name(name(hosts[0]))
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    write(certs.server_cert, server.public_bytes(serialization.Encoding.PEM))
    write(
        certs.server_key,
        server_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ),
        private=True,
    )
    for node in nodes:
        key = ec.generate_private_key(ec.SECP384R1())
        write(
            certs.node_key(node),
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            private=True,
        )
        public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
        write(certs.node_public_key(node), public + b"\n")
    return certs


# --- commands ------------------------------------------------------------------------------------


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
        return "'" + str(v).replace("'", "") + "'"

    return " ".join(f"{k}={value(v)}" for k, v in options.items())


def flwr_run_command(connection: str, options: dict[str, object]) -> list[str]:
    return [str(BIN / "flwr"), "run", str(APP_DIR), connection, "--run-config", run_config_arg(options), "--stream"]


# --- a SuperNode with its long-lived worker (`fedse flower node`) -----------------------------------


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


# --- processes on one machine (tests, `fedse flower local`) ------------------------------------------


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


def node_command(
    client: str,
    data_dir: Path,
    superlink: str,
    port: int,
    ca: Path | None = None,
    key: Path | None = None,
) -> list[str]:
    """`fedse flower node ...`: a SuperNode for `client` with its worker."""
    cmd = [sys.executable, "-m", "fedse.cli", "flower", "node", "--client", client, "--data-dir", str(data_dir)]
    cmd += ["--superlink", superlink, "--port", str(port)]
    if ca is not None:
        cmd += ["--ca", str(ca)]
    if key is not None:
        cmd += ["--key", str(key)]
    return cmd


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
) -> LocalResult:
    """A whole deployment on this machine: a SuperLink, one SuperNode (with its worker) per client
    of `config`, and `flwr run`; every process is stopped at the end. Files and logs go under
    `work_dir`; the run folder is `run_dir`. `intruder`: also start a SuperNode whose key is
    not registered (with `node_auth`, it must be refused)."""
    from fedse.experiments.config import load_config
    from fedse.experiments.run import client_layout

    run_config = load_config(config, list(overrides))
    clients = list(client_layout(run_config)[0])
    work = Path(work_dir).resolve()
    processes = Processes(work / "logs")
    port = free_port()
    address = f"127.0.0.1:{port}"
    names = [*clients, "intruder"] if intruder else clients
    certs = make_certificates(work / "certs", ["127.0.0.1", "localhost"], names) if tls or node_auth else None
    home = work / "flwr-home"
    write_connection(home, "fedse", address, certs.ca if certs else None)
    try:
        env = flower_env(home)  # Flower installs the app bundle under FLWR_HOME: keep it in work_dir
        link = processes.start("superlink", superlink_command("127.0.0.1", port, work, certs, node_auth), env)
        wait_for_port(port, 60, link)
        for client in clients:
            if node_auth:
                register_node(home, "fedse", certs.node_public_key(client))
            node_port = free_port()
            command = node_command(
                client,
                work / "nodes" / client,
                address,
                node_port,
                ca=certs.ca if certs else None,
                key=certs.node_key(client) if node_auth else None,
            )
            processes.start(f"node-{client}", command, env)
        if intruder:
            command = node_command(
                clients[0], work / "nodes" / "intruder", address, free_port(), certs.ca if certs else None,
                certs.node_key("intruder") if certs else None,
            )  # fmt: skip
            processes.start("node-intruder", command, env)
        settings = {
            "config": str(Path(config).resolve()),
            "run-dir": str(Path(run_dir).resolve()),
            "resume": resume,
            "overrides": " ".join(overrides),
            **(options or {}),
        }
        started = time.monotonic()
        done = subprocess.run(
            flwr_run_command("fedse", settings), env=env, capture_output=True, text=True, timeout=timeout
        )
        codes = {name: p.poll() for name, p in processes.running.items()}
        return LocalResult(done, codes, processes.log_dir, time.monotonic() - started)
    finally:
        processes.stop()


@dataclass
class LocalResult:
    run: subprocess.CompletedProcess
    """`flwr run`'s process (its stdout holds the streamed log of the ServerApp)."""
    exit_codes: dict[str, int | None]
    """Each started process's exit code when the run ended (None: still running)."""
    logs: Path
    seconds: float
    """Wall time of `flwr run` (the processes already listening)."""
