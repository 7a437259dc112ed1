"""`fedse flower ...`: a fedse run on Flower, on one machine or across many (see the README)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from fedse.errors import UserError
from fedse.run_options import add_run_folder_options, chosen_run_folder


def cmd_certs(args: argparse.Namespace) -> int:
    from fedse.flower.certificates import make_certificates

    certs = make_certificates(args.dir, args.hosts, args.nodes)
    print(f"wrote {certs.ca}, {certs.server_cert} (+ key) for {', '.join(args.hosts)}")
    for node in args.nodes:
        print(f"  SuperNode key {certs.node_key(node)} (public: {certs.node_public_key(node)})")
    return 0


def cmd_superlink(args: argparse.Namespace) -> int:
    from fedse.flower.certificates import Certificates
    from fedse.flower.commands import flower_env, superlink_command

    state = Path(args.state_dir)
    state.mkdir(parents=True, exist_ok=True)
    certs = Certificates(Path(args.certs)) if args.certs else None
    command = superlink_command(args.host, args.port, state, certs, args.node_auth)
    print("+", " ".join(command), flush=True)
    os.execve(command[0], command, flower_env())


def cmd_register(args: argparse.Namespace) -> int:
    from fedse.flower.commands import register_node, write_connection

    home = Path(args.flwr_home)
    write_connection(home, "fedse", args.superlink, Path(args.ca).resolve() if args.ca else None)
    for key in args.public_keys:
        register_node(home, "fedse", Path(key))
        print(f"registered {key} with {args.superlink}")
    return 0


def cmd_node(args: argparse.Namespace) -> int:
    from fedse.envs import env_class
    from fedse.flower.commands import supernode_command
    from fedse.flower.node_envs import NodeEnvs
    from fedse.flower.processes import run_node

    data_dir = Path(args.data_dir).expanduser().resolve()
    node_config = {"client": args.client, "data-dir": str(data_dir)}
    env_config = str(Path(args.env_config).expanduser().resolve()) if args.env_config else None
    own = {
        "env-config": env_config,
        "env-class": args.env_class,
        "env-url": args.env_url,
        "env-timeout": args.env_timeout,
    }
    node_config.update({k: str(v) for k, v in own.items() if v is not None})
    NodeEnvs.from_node_config(node_config)  # a file or value that cannot be read: one line, before joining
    if args.env_class:
        env_class(args.client, args.env_class)
    command = supernode_command(
        args.superlink, args.port, node_config, Path(args.ca) if args.ca else None, Path(args.key) if args.key else None
    )
    print("+", " ".join(command), flush=True)
    return run_node(command, node_config)


def cmd_run(args: argparse.Namespace) -> int:
    import subprocess

    from fedse.experiments.config import load_config
    from fedse.flower.commands import flower_env, flwr_run_command, write_connection
    from fedse.flower.options import FlowerOptions

    config = load_config(args.config, args.set)  # a bad config fails here, not on the SuperLink
    run_dir, resume = chosen_run_folder(args, config.name)
    run_dir = run_dir.resolve()
    home = Path(args.flwr_home)
    write_connection(home, "fedse", args.superlink, Path(args.ca).resolve() if args.ca else None)
    options = FlowerOptions(
        config=str(Path(args.config).resolve()), run_dir=str(run_dir), resume=resume, force=args.force,
        overrides=FlowerOptions.join_overrides(args.set), min_clients=args.min_clients, round_timeout=args.round_timeout,
    )  # fmt: skip
    command = flwr_run_command("fedse", options.run_config())
    print("+", " ".join(command), flush=True)
    return subprocess.run(command, env=flower_env(home)).returncode


def cmd_local(args: argparse.Namespace) -> int:
    from fedse.experiments.config import load_config
    from fedse.flower.local import run_local

    config = load_config(args.config, args.set)
    run_dir, resume = chosen_run_folder(args, f"{config.name}-flower")
    done = run_local(
        args.config, run_dir, args.work_dir or run_dir.with_name(run_dir.name + "-deploy"), args.set,
        tls=args.tls, node_auth=args.node_auth, resume=resume, node_envs=node_env_files(args.node_env),
    )  # fmt: skip
    sys.stdout.write(done.run.stdout)
    sys.stderr.write(done.run.stderr[-5000:])
    if not done.ok:
        print(f"the run failed (flwr run exited with {done.run.returncode}; see its log above); logs in {done.logs}")
        return done.run.returncode or 1
    print(f"run folder {run_dir} ({done.seconds:.0f} s); logs in {done.logs}")
    return 0


def node_env_files(items: list[str]) -> dict[str, str]:
    """`--node-env CLIENT=FILE` options as client -> its node's env-config file."""
    files = {}
    for item in items:
        client, sep, path = item.partition("=")
        if not sep or not client or not path:
            raise UserError(f"--node-env takes CLIENT=FILE (an env-config file for that client's node), got {item!r}")
        files[client] = str(Path(path).expanduser().resolve())
    return files


def cmd_sim(args: argparse.Namespace) -> int:
    from flwr.simulation import run_simulation

    from fedse.experiments.config import load_config
    from fedse.flower.client_app import app as client_app
    from fedse.flower.options import FlowerOptions
    from fedse.flower.server_app import make_server_app

    config = load_config(args.config, args.set)
    run_dir, resume = chosen_run_folder(args, f"{config.name}-flower-sim")
    run_dir = run_dir.resolve()
    options = FlowerOptions(
        config=str(Path(args.config).resolve()) if args.config else "",
        run_dir=str(run_dir), resume=resume, force=args.force, overrides=FlowerOptions.join_overrides(args.set),
    )  # fmt: skip
    run_simulation(
        server_app=make_server_app(options),
        client_app=client_app,
        num_supernodes=len(config.client_layout()[0]),
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    print(f"run folder {run_dir}")
    return 0


def add_flower_parser(sub) -> None:
    flower = sub.add_parser("flower", help="run on Flower: simulation, or SuperLink + SuperNodes across machines")
    fsub = flower.add_subparsers(dest="flower_command", required=True)

    def run_options(p, local: bool = False) -> None:
        p.add_argument("config", help="the fedse TOML (as for fedse run)")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
        add_run_folder_options(p, "<runs-dir>/<the config's name>, -flower-sim for sim, -flower for local")
        if not local:
            p.add_argument("--force", action="store_true", help="replace an existing run folder")

    sim = fsub.add_parser(
        "sim", help="Flower's simulation engine on this machine (Ray), one virtual SuperNode a client"
    )
    run_options(sim)
    sim.set_defaults(run=cmd_sim)
    local = fsub.add_parser("local", help="the deployment engine on this machine: SuperLink, SuperNodes, run, stop")
    run_options(local, local=True)
    local.add_argument("--work-dir", help="certificates, node data and logs (default: beside the run folder)")
    local.add_argument("--tls", action="store_true", help="TLS between SuperLink and SuperNodes")
    local.add_argument("--node-auth", action="store_true", help="only registered SuperNodes may join (implies TLS)")
    local.add_argument(
        "--node-env", action="append", default=[], metavar="CLIENT=FILE",
        help="that client's node defines its environments by this env-config file (the run config need not)",
    )  # fmt: skip
    local.set_defaults(run=cmd_local)
    certs = fsub.add_parser("certs", help="make a CA, a SuperLink certificate and SuperNode key pairs")
    certs.add_argument("dir")
    certs.add_argument("--hosts", nargs="+", default=["127.0.0.1", "localhost"], help="the SuperLink's addresses")
    certs.add_argument("--nodes", nargs="*", default=[], help="names of the SuperNode key pairs to make")
    certs.set_defaults(run=cmd_certs)
    link = fsub.add_parser("superlink", help="start a SuperLink (flower-superlink)")
    link.add_argument("--host", default="0.0.0.0")
    link.add_argument("--port", type=int, default=9091)
    link.add_argument("--certs", help="folder from `fedse flower certs` (TLS); without it the link is insecure")
    link.add_argument("--node-auth", action="store_true", help="only registered SuperNodes may join")
    link.add_argument("--state-dir", default=".flwr-superlink", help="where the SuperLink keeps its database")
    link.set_defaults(run=cmd_superlink)
    reg = fsub.add_parser("register", help="register SuperNode public keys with a SuperLink (node auth)")
    reg.add_argument("public_keys", nargs="+")
    reg.add_argument("--superlink", required=True, metavar="HOST:PORT")
    reg.add_argument("--ca", help="the CA certificate (TLS)")
    reg.add_argument("--flwr-home", default=".flwr")
    reg.set_defaults(run=cmd_register)
    node = fsub.add_parser("node", help="a SuperNode for one client, with the worker that keeps the model loaded")
    node.add_argument("--client", required=True, help="which client of the run this node is, e.g. maze")
    node.add_argument("--data-dir", required=True, help="where the node keeps its buffer and adapters")
    node.add_argument("--superlink", required=True, metavar="HOST:PORT")
    node.add_argument("--port", type=int, default=9094, help="the SuperNode's own port (one per node on a machine)")
    node.add_argument("--ca", help="the CA certificate (TLS); without it the connection is insecure")
    node.add_argument("--key", help="this node's private key (node auth)")
    node.add_argument(
        "--env-config", metavar="FILE", help="[env.<name>] tables defining this node's environments (known here only)"
    )
    node.add_argument("--env-class", metavar="PACKAGE.MODULE:CLASS", help="this node's environment class")
    node.add_argument("--env-url", metavar="URL", help="the AgentGym-compatible server this node's games run on")
    node.add_argument("--env-timeout", type=float, metavar="SECONDS", help="how long a request to it may take")
    node.set_defaults(run=cmd_node)
    run = fsub.add_parser("run", help="start a fedse run on a SuperLink (flwr run) and stream its log")
    run_options(run)
    run.add_argument("--superlink", required=True, metavar="HOST:PORT")
    run.add_argument("--ca", help="the CA certificate (TLS)")
    run.add_argument("--flwr-home", default=".flwr")
    run.add_argument("--min-clients", type=int, default=1, help="fewest replies a round needs")
    run.add_argument("--round-timeout", type=float, default=3600.0, help="seconds to wait for a phase's replies")
    run.set_defaults(run=cmd_run)
