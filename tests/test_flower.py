"""fedse on Flower: the same algorithm as the embedded runtime, what crosses the wire, faults,
and the deployment engine on loopback (SuperLink + SuperNodes as real processes, TLS, node auth).

Most tests drive a federation with the Flower transport through `LoopbackGrid`, a Grid that hands each message to
fedse's ClientApp in this process: Flower's Message objects and records, fedse's client and
server code, no network. The deployment tests start Flower's own processes."""

from __future__ import annotations

import copy
import json
import subprocess
import time
import tomllib
import uuid
from dataclasses import fields
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS
from flwr.supercore.task_identity import TaskIdentity

from fedse.agent.lora import factor_keys
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.errors import UserError
from fedse.experiments.federation import Federation
from fedse.flower import client_app
from fedse.flower.codec import pack, record_json, unpack, wire_bytes
from fedse.flower.commands import APP_DIR, node_threads
from fedse.flower.local import LocalDeployment, run_local
from fedse.flower.options import FlowerOptions
from fedse.flower.server_app import flower_federation
from helpers import TINY, records, tiny_config


class LoopbackGrid:
    """The part of Flower's Grid that FlowerTransport uses, delivering in this process.

    `leave[(round, phase)] = node`: that node disconnects when that phase's messages are pushed
    (it never replies), and connects again for the next phase."""

    def __init__(self, node_configs: list[dict]) -> None:
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1  # what a ServerApp process has
        self.node_configs = {i + 1: c for i, c in enumerate(node_configs)}
        self.connected = set(self.node_configs)
        self.replies: dict[str, Message] = {}
        self.sent: list[Message] = []
        self.received: list[Message] = []
        self.leave: dict[tuple[str, str], int] = {}
        self.contexts: dict[int, Context] = {}
        """Each node's Context, kept across messages as a SuperNode keeps it (SecAgg+'s state)."""

    def get_node_ids(self):
        return sorted(self.connected)

    def push_messages(self, messages):
        self.connected = set(self.node_configs)
        ids = []
        for m in messages:
            m.metadata.__dict__["_message_id"] = mid = uuid.uuid4().hex
            ids.append(mid)
            self.sent.append(m)
            node = m.metadata.dst_node_id
            if self.leave.get((m.metadata.group_id, m.metadata.message_type)) == node:
                self.connected.discard(node)
                continue
            context = self.contexts.setdefault(node, Context(1, node, self.node_configs[node], RecordDict(), {}))
            # the node's copy of the message, its content through the worker's framing (SecAgg+'s
            # own messages are answered by the ClientApp's mod, never forwarded to a worker)
            secagg = RECORD_KEY_CONFIGS in m.content.config_records
            content = copy.deepcopy(m.content) if secagg else unpack(pack(m.content))  # a copy, as on a wire
            delivered = Message(content, node, m.metadata.message_type, group_id=m.metadata.group_id)
            delivered.metadata.__dict__["_message_id"] = mid
            reply = client_app.app(delivered, context)  # the ClientApp with its mods, as a SuperNode runs it
            self.received.append(reply)
            self.replies[mid] = reply
        return ids

    def pull_messages(self, ids):
        return [self.replies.pop(i) for i in ids if i in self.replies]

    def send_and_receive(self, messages, timeout=None):
        return self.pull_messages(list(self.push_messages(messages)))


def flower_run(tmp_path, grid, *extra, name="flower", resume=False, **options) -> Federation:
    fed = flower_federation(
        tiny_config(*extra),
        tmp_path / name,
        grid,
        FlowerOptions(config="tiny", wait_for_nodes=0.0, poll=0.0, **options),
        Policy(load_base("tiny-random")),
    )
    fed.run(resume=resume)
    return fed


def nodes() -> list[dict]:
    return [{"client": "maze"}, {"client": "wordle"}]


PRIVDESK = '[env.privdesk]\nclass = "acme_tickets:TicketRouting"\noptions = { tickets = 12 }\n'
NODE_ONLY = ("fed.clients=['privdesk', 'maze']", "env.privdesk.backend='node'", "fed.rounds=1")


@pytest.mark.parametrize("aggregator", ["fedsa", "fedex", "subspace", "regmean", "personal"])
def test_flower_runtime_reproduces_the_embedded_run(tmp_path, aggregator):
    """Same config and seed: the same final global adapter and the same records (seconds aside).
    fedsa keeps B on the nodes across rounds; fedex, subspace and regmean send the base delta down,
    and regmean's nodes also send their input summaries; personal does both: its nodes keep their
    adapters and receive the shared base's factors. (fedse: the deployment test below; all
    seven rules were checked once by hand.)"""
    embedded = Federation(
        tiny_config(f"fed.aggregator='{aggregator}'"), tmp_path / "emb", Policy(load_base("tiny-random"))
    )
    embedded.run()
    grid = LoopbackGrid(nodes())
    flower = flower_run(tmp_path, grid, f"fed.aggregator='{aggregator}'")
    assert flower.global_adapter.hash == embedded.global_adapter.hash
    carried = {name for m in grid.sent if m.metadata.message_type == "train" for name in m.content}
    if aggregator in ("subspace", "regmean", "personal"):  # low-rank results: factors travel, never a dense matrix
        assert "folded" in carried and "base" not in carried
    elif aggregator == "fedex":
        assert "base" in carried and "folded" not in carried
    assert records(flower.store.root) == records(embedded.store.root)
    assert not (flower.store.root / "clients").exists()  # buffers and personal adapters stay on the nodes
    assert (
        [s["resumed"] for s in flower.store.sittings()] == [s["resumed"] for s in embedded.store.sittings()] == [False]
    )
    if aggregator in ("fedsa", "personal"):  # each node kept its own adapter (fedsa: its B) every round
        kept = sorted(p.name for p in (flower.store.root / "nodes").rglob("round_*"))
        assert kept == ["round_001", "round_001", "round_002", "round_002"]


@pytest.mark.parametrize("aggregator", ["fedse", "ffa"])
def test_secure_aggregation_gives_the_plain_mean_and_the_server_never_holds_one_update(tmp_path, aggregator):
    """SecAgg+ through Flower's workflow and mod (the ClientApp as a SuperNode runs it): the global
    adapter is the plain run's to within one quantisation step, and no record, file or message the
    server holds carries one client's upload."""
    from safetensors.numpy import load_file

    from fedse.flower.secagg import PENDING

    run = ["fed.rounds=1", f"fed.aggregator='{aggregator}'"]
    plain = flower_run(tmp_path, LoopbackGrid(nodes()), *run, name="plain", node_root=str(tmp_path / "plain-nodes"))
    grid = LoopbackGrid(nodes())
    secure = flower_run(
        tmp_path, grid, *run, "privacy.secagg=true", name="secure", node_root=str(tmp_path / "secure-nodes")
    )
    step = 2 * secure.config.privacy.secagg_range / 2**22
    for key, value in plain.global_adapter.tensors.items():
        assert (secure.global_adapter.tensors[key].double() - value.double()).abs().max() <= step + 1e-6, key
    aggregate = next(r for r in records(secure.store.root) if r["event"] == "aggregate")
    assert aggregate["accepted"] == ["maze", "wordle"] and aggregate["secure_aggregation"] is True
    assert aggregate["update_cosine"] is None and aggregate["update_norm"] is None
    from fedse.experiments.report import write_report

    write_report([secure.store.root])
    assert "Secure aggregation (SecAgg+)" in (secure.store.root / "report.md").read_text()
    plain_aggregate = next(r for r in records(plain.store.root) if r["event"] == "aggregate")
    assert not plain_aggregate["secure_aggregation"]
    assert plain_aggregate["update_cosine"] is not None  # what the plain server measures, and this one cannot
    # what each node kept and masked: the entries where the two clients differ are individual
    kept = {c: load_file(str(next((tmp_path / "secure-nodes").glob(f"*/{c}/{PENDING}/round_001.safetensors"))))
            for c in ("maze", "wordle")}  # fmt: skip
    own = [
        a
        for k in kept["maze"]
        for a in (kept["maze"][k], kept["wordle"][k])
        if not (kept["maze"][k] == kept["wordle"][k]).all()
    ]
    assert own, "the two clients uploaded the same factors: nothing individual to look for"

    def individual(array) -> bool:
        array = torch.as_tensor(array).double()
        return any(array.shape == a.shape and torch.allclose(array, torch.from_numpy(a), atol=1e-7) for a in own)

    assert not any("update" in reply.content for reply in grid.received if reply.metadata.message_type == "train")
    for reply in grid.received:
        for record in reply.content.array_records.values():
            assert not any(individual(array.numpy()) for array in record.values())
    for path in secure.store.root.rglob("*.safetensors"):
        from safetensors.torch import load_file as load_torch

        assert not any(individual(t) for t in load_torch(str(path)).values()), path


def test_a_train_reply_carries_only_the_uploaded_factors_and_scalars(tmp_path):
    grid = LoopbackGrid(nodes())
    fed = flower_run(tmp_path, grid, "fed.aggregator='ffa'", "fed.rounds=1")
    replies = [m for m in grid.received if m.metadata.message_type == "train"]
    assert len(replies) == 2
    for reply in replies:
        content = reply.content
        assert set(content.keys()) == {"update", "metrics", "explore"}
        assert set(content.array_records) == {"update"}
        assert list(content["update"].keys()) == factor_keys(fed.global_adapter.tensors, "B")  # ffa: B only
        assert all(isinstance(v, int | float) for v in content["metrics"].values())
        assert all(isinstance(v, int | float) for v in content["explore"].values())
    wire = [json.loads(line) for line in fed.store.metrics.read_text().splitlines() if '"wire"' in line]
    train = next(w for w in wire if w["phase"] == "train")
    assert train["up"] == {"maze": wire_bytes(replies[0]), "wordle": wire_bytes(replies[1])}
    assert all(b > 0 for b in train["down"].values())
    from fedse.experiments.report import write_report

    assert "wire MB up (all)" in write_report([fed.store.root]).read_text()  # beside the nominal sizes


def test_a_node_that_leaves_mid_round_is_recorded_and_rejoins_the_next(tmp_path):
    grid = LoopbackGrid(nodes())
    grid.leave[("1", "train")] = 2  # wordle's SuperNode disappears during round 1's training
    fed = flower_run(tmp_path, grid)
    log = [json.loads(line) for line in fed.store.metrics.read_text().splitlines()]
    wire1 = next(r for r in log if r["event"] == "wire" and r["round"] == 1 and r["phase"] == "train")
    assert wire1["dropped"] == {"wordle": "its SuperNode disconnected"}
    agg = {r["round"]: r for r in log if r["event"] == "aggregate"}
    assert agg[1]["accepted"] == ["maze"]
    assert agg[2]["accepted"] == ["maze", "wordle"]  # back in round 2
    assert [r["client"] for r in log if r["event"] == "client" and r["round"] == 1] == ["maze"]


@pytest.mark.parametrize("aggregator", ["fedse", "subspace"])  # subspace: its factor history resumes too
def test_too_few_replies_stop_the_run_and_a_resume_finishes_it_like_an_uninterrupted_one(tmp_path, aggregator):
    rule = f"fed.aggregator='{aggregator}'"
    uninterrupted = flower_run(tmp_path, LoopbackGrid(nodes()), rule, name="whole")
    grid = LoopbackGrid(nodes())
    grid.leave[("2", "train")] = 1
    with pytest.raises(UserError, match="1 of 2 clients replied"):
        flower_run(tmp_path, grid, rule, name="cut", min_clients=2)
    cut = tmp_path / "cut"
    assert json.loads((cut / "state.json").read_text())["round"] == 1
    again = LoopbackGrid(nodes())
    resumed = flower_run(tmp_path, again, rule, name="cut", resume=True, min_clients=2)
    if aggregator == "subspace":
        assert all("folded" in m.content for m in again.sent if m.metadata.message_type == "train")
    assert resumed.global_adapter.hash == uninterrupted.global_adapter.hash
    assert records(cut) == records(uninterrupted.store.root)


def test_a_node_for_a_client_the_run_lacks_is_ignored(tmp_path):
    fed = flower_run(tmp_path, LoopbackGrid([*nodes(), {"client": "webshop"}]), "fed.rounds=1")
    assert sorted(fed.transport.node_of) == ["maze", "wordle"]


def test_a_node_without_a_client_says_how_to_start_it():
    with pytest.raises(ValueError, match='--node-config "client=<env>'):
        client_app.node_client_name({}, ["maze"])


def test_the_app_declares_every_run_option_with_the_servers_defaults():
    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    defaults = FlowerOptions(config="x")
    names = {f.name.replace("_", "-") for f in fields(FlowerOptions)}
    assert set(declared) == names
    assert all(declared[k] == getattr(defaults, k.replace("-", "_")) for k in declared if k != "config")


def test_the_worker_framing_round_trips_records():
    import torch
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    content = RecordDict(
        {
            "a": ArrayRecord({"z.weight": torch.arange(6.0).reshape(2, 3), "b.weight": torch.ones(2)}),
            "m": MetricRecord({"loss": 0.25, "n": 3}),
            "c": ConfigRecord({"json": json.dumps({"round": 2})}),
        }
    )
    back = unpack(pack(content))
    assert list(back["a"].keys()) == ["z.weight", "b.weight"]
    assert back["a"]["z.weight"].numpy().tolist() == [[0, 1, 2], [3, 4, 5]]
    assert dict(back["m"]) == {"loss": 0.25, "n": 3} and record_json(back["c"]) == {"round": 2}


# --- the deployment engine on loopback: Flower's own processes ----------------------------------


def embedded_like_the_nodes(tmp_path: Path, *extra: str) -> Federation:
    """The embedded run at the nodes' torch thread count: with another count a bf16 matmul
    (AMX) may sum in another order, and the hashes compared would differ in their last bits."""
    threads = torch.get_num_threads()
    torch.set_num_threads(node_threads(len(tiny_config().fed.clients)))
    try:
        embedded = Federation(tiny_config(*extra), tmp_path / "emb", Policy(load_base("tiny-random")))
        embedded.run()
    finally:
        torch.set_num_threads(threads)
    return embedded


def tiny_toml(tmp_path: Path) -> Path:
    lines = []
    for item in TINY:
        key, value = item.split("=", 1)
        lines.append(f"{key} = {value}")
    path = tmp_path / "tiny.toml"
    path.write_text('name = "tiny"\n' + "\n".join(lines) + "\n")
    return path


@pytest.mark.deploy
def test_a_deployment_with_tls_node_auth_secagg_and_a_node_defined_environment(tmp_path, monkeypatch):
    """Real processes with what a production federation turns on at once, in one deployment:
    - TLS and SuperNode authentication: a SuperNode whose key was never registered is refused;
    - the privdesk node defines its environment by its --env-config file (its package importable
      there), unseen by the server; the maze node plays the built-in game;
    - SecAgg+ between the registered nodes: the server's run folder ends with the mean, and the
      individual uploads stay on the nodes' disks."""
    from safetensors.numpy import load_file

    example_src = Path(__file__).resolve().parents[1] / "examples" / "ticket-routing" / "src"
    monkeypatch.setenv("PYTHONPATH", str(example_src))
    file = tmp_path / "privdesk.toml"
    file.write_text(PRIVDESK)
    overrides = [*NODE_ONLY, "privacy.secagg=true"]
    done = run_local(
        tiny_toml(tmp_path), tmp_path / "run", tmp_path / "work", overrides=overrides, node_auth=True, intruder=True,
        node_envs={"privdesk": str(file)}, timeout=500, options={"poll": 0.2},
    )  # fmt: skip
    assert done.ok, done.run.stdout[-3000:] + done.run.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "state.json").read_text())["round"] == 1
    assert done.exit_codes["node-intruder"] not in (None, 0)  # refused: it exited on its own
    assert "No SuperNode found with the given public key" in (done.logs / "superlink.log").read_text()

    log = records(tmp_path / "run")
    assert {(r["round"], r["env"]) for r in log if r["event"] == "eval"} == {
        (n, e) for n in (0, 1) for e in ("privdesk", "maze")
    }
    assert "acme_tickets" not in (tmp_path / "run" / "config.json").read_text()
    [aggregate] = [r for r in log if r["event"] == "aggregate"]
    assert aggregate["accepted"] == ["privdesk", "maze"] and aggregate["secure_aggregation"] is True

    kept = [load_file(str(p)) for p in sorted((tmp_path / "work" / "nodes").rglob("secagg/round_001.safetensors"))]
    assert len(kept) == 2  # on the nodes' own disks, outside the run folder
    assert not list((tmp_path / "run").rglob("secagg"))
    final = load_file(str(sorted((tmp_path / "run" / "checkpoints").rglob("adapter_model.safetensors"))[-1]))
    assert set(kept[0]) <= set(final)
    for key in kept[0]:
        mean = (kept[0][key] + kept[1][key]) / 2
        assert abs(final[key] - mean).max() <= 2 * 8.0 / 2**22 + 1e-6  # within one quantisation step
        if not (kept[0][key] == kept[1][key]).all():
            assert abs(final[key] - kept[0][key]).max() > 1e-6 and abs(final[key] - kept[1][key]).max() > 1e-6


def wait_for(predicate, timeout: float, what: str, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout:g} s")
        time.sleep(poll)


def events(root: Path) -> list[dict]:
    path = root / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.deploy
def test_a_supernode_killed_mid_round_is_dropped_and_rejoins_after_a_restart(tmp_path):
    config = tiny_toml(tmp_path)
    run = tmp_path / "run"
    with LocalDeployment(config, tmp_path / "work", ["fed.rounds=3", "eval.every=3"]) as deployment:
        server = subprocess.Popen(
            deployment.run_command(run, options={"poll": 0.2, "round-timeout": 30.0}),
            env=deployment.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        try:  # kill wordle's node once round 1's messages are out, bring it back after round 1
            wait_for(lambda: any(r["event"] == "eval_avg" for r in events(run)), 300, "round 0")
            deployment.kill_node("wordle")
            wait_for(lambda: any(r["event"] == "aggregate" for r in events(run)), 300, "round 1")
            deployment.start_node("wordle")
            out, _ = server.communicate(timeout=400)
        finally:
            server.kill()
    assert server.returncode == 0, out[-3000:]
    log = events(run)
    wire = {(r["round"], r["phase"]): r for r in log if r["event"] == "wire"}
    assert set(wire[(1, "train")]["dropped"]) == {"wordle"}
    accepted = {r["round"]: r["accepted"] for r in log if r["event"] == "aggregate"}
    assert accepted[1] == ["maze"]
    assert accepted[3] == ["maze", "wordle"]  # the restarted node is back
    assert json.loads((run / "state.json").read_text())["round"] == 3


@pytest.mark.deploy
def test_a_deployed_run_whose_server_app_is_killed_resumes_to_the_embedded_runs_result(tmp_path):
    """Flower's deployment engine on loopback (SuperLink, SuperNodes and their workers as real
    processes): the ServerApp is SIGKILLed in round 2 and the run resumed; it ends with the
    adapter and records of the uninterrupted embedded run, and its wire records count bytes both
    ways for both phases."""
    config = tiny_toml(tmp_path)
    embedded = embedded_like_the_nodes(tmp_path, "eval.every=2")
    run = tmp_path / "run"
    with LocalDeployment(config, tmp_path / "work", ["eval.every=2"]) as deployment:
        server = subprocess.Popen(
            deployment.run_command(run, options={"poll": 0.2}), env=deployment.env,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(
                lambda: (run / "state.json").exists() and '"round": 1' in (run / "state.json").read_text(),
                300,
                "round 1",
            )
            assert deployment.kill_server_app() >= 1
        finally:  # `flwr run --stream` may keep waiting on the dead run: it is only a log stream
            server.kill()
            server.wait(30)
        assert json.loads((run / "state.json").read_text())["round"] == 1  # round 2 was cut short
        done = deployment.run(run, resume=True, options={"poll": 0.2}, timeout=400)
    assert done.ok, done.run.stdout[-3000:] + done.run.stderr[-3000:]
    assert json.loads((run / "state.json").read_text())["global_adapter"] == embedded.global_adapter.hash
    assert records(run) == records(embedded.store.root)
    wire = [r for r in records(run, drop=()) if r["event"] == "wire"]
    assert {r["phase"] for r in wire} == {"train", "evaluate"} and all(r["up"] and r["down"] for r in wire)


def test_a_nodes_own_environment_federates_unseen_by_the_server(tmp_path):
    """The server's configuration names `privdesk` only; its node's env-config defines it. The
    run is the embedded one that names its class, and the class never reaches the run folder."""
    file = tmp_path / "privdesk.toml"
    file.write_text(PRIVDESK)
    grid = LoopbackGrid([{"client": "privdesk", "env-config": str(file)}, {"client": "maze"}])
    flower = flower_run(tmp_path, grid, *NODE_ONLY)
    assert flower.config.env["privdesk"].backend == "node"
    assert "acme_tickets" not in (flower.store.root / "config.json").read_text()
    mine = (*NODE_ONLY[:1], "env.privdesk.class='acme_tickets:TicketRouting'", "env.privdesk.options={tickets=12}")
    embedded = Federation(tiny_config(*mine, "fed.rounds=1"), tmp_path / "emb", Policy(load_base("tiny-random")))
    embedded.run()
    assert flower.global_adapter.hash == embedded.global_adapter.hash
    assert records(flower.store.root) == records(embedded.store.root)


def test_run_options_survive_flowers_run_config_parser_whatever_they_hold():
    from flwr.common.config import parse_config_args

    from fedse.flower.commands import run_config_arg

    sets = ["fed.clients=['privdesk', 'maze']", 'name="a b"', "env.x.instruction='it's \\ \"odd\"'"]
    options = FlowerOptions(config="/a b/c's.toml", overrides=FlowerOptions.join_overrides(sets), poll=0.5)
    parsed = parse_config_args([run_config_arg(options.run_config())])
    back = FlowerOptions.from_run_config(parsed)
    assert back == options and back.override_list() == sets


def test_run_options_round_trip_through_flowers_run_config():
    options = FlowerOptions(config="a.toml", run_dir="/r", resume=True, overrides="fed.rounds=2", round_timeout=5.0)
    assert FlowerOptions.from_run_config(options.run_config()) == options
    declared = tomllib.loads((APP_DIR / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    assert set(options.run_config()) == set(declared)


def test_a_node_plays_its_environment_where_its_own_configuration_says(tmp_path):
    from fedse.envs.http_server import make_app
    from helpers import ServedApp

    app = make_app("maze")
    served = ServedApp(app)
    try:
        embedded = Federation(tiny_config(), tmp_path / "emb", Policy(load_base("tiny-random")))
        embedded.run()
        grid = LoopbackGrid([{"client": "maze", "env-url": served.url}, {"client": "wordle"}])
        flower = flower_run(tmp_path, grid)  # the run configuration names no server for maze
        assert not flower.config.env
        assert next(app.state.sessions["maze"].ids) > 0  # the maze node's episodes ran on that server
        assert flower.global_adapter.hash == embedded.global_adapter.hash
        assert records(flower.store.root) == records(embedded.store.root)
    finally:
        served.stop()


def test_a_worker_socket_fits_however_deep_the_data_dir(tmp_path):
    from fedse.flower.worker import MAX_SOCKET_PATH, socket_path

    shallow = tmp_path / "n"
    assert socket_path(shallow) == shallow.resolve() / "worker.sock"
    deep = tmp_path / ("x" * 60) / ("y" * 60) / "node"
    path = socket_path(deep)
    assert len(str(path)) <= MAX_SOCKET_PATH and path == socket_path(deep) != socket_path(deep.parent / "other")
    assert (path.parent.stat().st_mode & 0o777) == 0o700
