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


def node_threads(nodes: int) -> int:
    """Torch threads per SuperNode when `nodes` of them share this machine's cores."""
    return max(1, (os.cpu_count() or 1) // nodes)


class LocalDeployment:
    """Flower's deployment engine on this machine for the run `config` describes: a SuperLink and
    one SuperNode (with its worker) per client, each a process in its own group, files and logs
    under `work_dir`. A context manager: every process is stopped on exit.

    `node_auth` implies TLS; `intruder` adds a SuperNode whose key is never registered. Each
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
    ) -> None:
        from fedse.experiments.config import load_config

        self.config, self.overrides = Path(config).resolve(), list(overrides)
        self.clients = list(load_config(config, self.overrides).client_layout()[0])
        self.work = Path(work_dir).resolve()
        self.processes = Processes(self.work / "logs")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.node_auth, self.intruder = node_auth, intruder
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
        settings = {
            "config": str(self.config),
            "run-dir": str(Path(run_dir).resolve()),
            "resume": resume,
            "overrides": " ".join(self.overrides),
            **(options or {}),
        }
        return flwr_run_command("fedse", settings)

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
) -> LocalResult:
    """A whole deployment on this machine (`LocalDeployment`) running `config` to its end into
    `run_dir`, then stopped."""
    with LocalDeployment(config, work_dir, overrides, tls, node_auth, intruder) as deployment:
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
