"""AgentGym interop on loopback: fedse's HTTP client against `fedse serve-env`, reply shapes as
upstream's servers give them, bad requests, a server that dies, and AgentTraj files in and out."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import pytest

from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.envs import EnvBackend, EnvError, EnvServerError, make_env
from fedse.envs.http_server import MAX_BODY, SessionTable, make_app
from fedse.evolve.agenttraj import AgentTrajError, read_agenttraj, to_agenttraj, write_agenttraj
from fedse.experiments.federation import Federation
from fedse.fl.client import expert_seeds
from helpers import ServedApp

SERVED = {"babyai": "babyai", "maze": "lmrlgym", "wordle": "lmrlgym", "textcraft": "textcraft", "webshop": "webshop"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served(ServedApp):
    """A `fedse serve-env` server on a loopback port, in a thread of this process."""

    def __init__(self, server: str, **options) -> None:
        super().__init__(make_app(server, **options))

    def open_sessions(self) -> int:
        return sum(len(t.sessions) for t in self.server.config.app.state.sessions.values())

    def call(self, method: str, path: str, body: bytes | dict | None = None):
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        request = urllib.request.Request(self.url + path, data=data, method=method)
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())


@pytest.fixture(scope="module")
def servers():
    started = {name: Served(name) for name in sorted(set(SERVED.values()))}
    yield started
    for s in started.values():
        s.stop()


def remote(servers, env: str, **options) -> EnvBackend:
    return EnvBackend(backend="http", url=servers[SERVED[env]].url, **options)


def transcript(env, task: int, outputs: list[str]) -> list:
    out = [env.reset(task)]
    for text in outputs:
        if env.done:
            break
        out.append(env.step(text))
    return out


MALFORMED = [
    "Thought: hm\nAction: fly away",
    "no action at all",
    "Action: move left\nAction: move right",
    "Action: click[nothing here]",
    "Action: search[red shoes]",
    "Action: g e t 1 stick",
    "",
]


@pytest.mark.parametrize("env_name", list(SERVED))
def test_a_remote_episode_has_the_in_process_transcript(servers, env_name):
    local, far = make_env(env_name), make_env(env_name, remote(servers, env_name))
    tasks = list(local.splits["test"])[:2]
    for task in tasks:
        expert = local.expert(task)
        assert transcript(far, task, expert) == transcript(local, task, expert)
        assert far.done  # the expert's episode ended on the server too
        noisy = MALFORMED + expert[:2] + MALFORMED
        assert transcript(far, task, noisy) == transcript(local, task, noisy)
    assert (far.instruction, far.max_turns, far.splits) == (local.instruction, local.max_turns, local.splits)


def test_upstream_reply_shapes(servers):
    lmrl, shop, craft, baby = servers["lmrlgym"], servers["webshop"], servers["textcraft"], servers["babyai"]
    assert lmrl.call("GET", "/") == (200, "This is environment LMRL-Gym.")
    _, created = lmrl.call("POST", "/wordle/create")
    assert lmrl.call("POST", "/wordle/reset", {"id": created["id"], "seed": 3})[1] == {
        "id": created["id"],
        "observation": "Let's start Wordle!",
    }
    assert len(lmrl.call("GET", f"/wordle/filtered_vocab?id={created['id']}")[1]) == 40
    assert sorted(lmrl.call("GET", "/maze/available_actions")[1]) == ["move down", "move left", "move right", "move up"]
    _, env_idx = shop.call("POST", "/create")
    assert isinstance(env_idx, int)  # WebShop answers a bare integer
    reset = shop.call("POST", "/reset", {"env_idx": env_idx, "session_id": 0})[1]
    assert reset[1] is None and reset[0].startswith("WebShop [SEP] Instruction:")
    assert shop.call("GET", f"/available_actions?env_idx={env_idx}")[1] == {"has_search_bar": True, "clickables": []}
    step = shop.call("POST", "/step", {"env_idx": env_idx, "action": "search[shoes]"})[1]
    assert set(step) == {"state", "reward", "done", "info"} and step["done"] is False
    made = craft.call("POST", "/create", {"commands": None, "goal": None})[1]
    assert set(made) == {"id", "observation", "done", "reward"} and "Goal: craft" in made["observation"]
    _, b = baby.call("POST", "/create")
    first = baby.call("POST", "/reset", {"id": b["id"], "data_idx": 0})[1]
    assert set(first) == {"observation", "reward", "score", "deleted", "done"}
    assert first["observation"].startswith("Your goal:")


def test_bad_requests_get_an_error_reply_and_the_server_keeps_serving(servers):
    lmrl = servers["lmrlgym"]
    _, made = lmrl.call("POST", "/maze/create")
    bad = [
        ("/maze/reset", {"id": 10**9, "game": 0}, "unknown id"),
        ("/maze/reset", {"id": made["id"]}, "missing field 'game'"),
        ("/maze/reset", {"id": "zero", "game": 0}, "must be an integer"),
        ("/maze/reset", {"id": made["id"], "game": 99}, "unknown task id 99"),
        ("/maze/step", {"id": made["id"], "action": "move up"}, "POST /reset first"),
        ("/maze/step", {"id": made["id"], "action": ["move up"]}, "must be a string"),
        ("/maze/step", {"id": made["id"], "action": "x" * 1_000_000}, "over the limit"),
        ("/maze/step", b"{not json", "bad request"),
        ("/maze/step", b"[1, 2]", "JSON object"),
    ]
    for path, body, message in bad:
        status, reply = lmrl.call("POST", path, body)
        assert status == 200 and message in reply["error"], (path, reply)
    assert lmrl.call("POST", "/maze/reset", {"id": made["id"], "game": 0})[1]["observation"].startswith("The goal")
    assert lmrl.call("POST", "/maze/step", {"id": made["id"], "action": "move right"})[1]["done"] is False
    assert MAX_BODY < 1_000_000


def test_sixteen_concurrent_sessions_on_one_server_stay_isolated(servers):
    tasks = list(make_env("maze").splits["train"])[:16]

    def play(task):
        env = make_env("maze", remote(servers, "maze"))
        return transcript(env, task, make_env("maze").expert(task))

    with ThreadPoolExecutor(16) as pool:
        played = list(pool.map(play, tasks))
    assert played == [transcript(make_env("maze"), t, make_env("maze").expert(t)) for t in tasks]
    assert all(p[-1].success for p in played)


def test_idle_sessions_expire():
    table = SessionTable(lambda: make_env("maze"), ttl=0.05, max_sessions=2)
    first = table.create()
    table.create()
    with pytest.raises(Exception, match="server full"):
        table.create()
    time.sleep(0.1)
    third = table.create()  # the idle two expired
    with pytest.raises(Exception, match=f"unknown id {first}"):
        table.get(first)
    assert table.get(third).env.name == "maze"


@pytest.mark.deploy
def test_a_server_killed_mid_episode_gives_a_clear_error(tmp_path):
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "fedse.cli", "serve-env", "lmrlgym", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        env = make_env("maze", EnvBackend(backend="http", url=f"http://127.0.0.1:{port}", retries=2, timeout=5))
        deadline = time.monotonic() + 60
        while True:  # the CLI's start (imports) takes a few seconds
            try:
                observation = env.reset(0)
                break
            except EnvServerError:
                assert time.monotonic() < deadline, process.stdout.read1().decode()
                time.sleep(0.3)
        assert observation.startswith("The goal")
        env.step("Action: move right")
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
        started = time.monotonic()
        with pytest.raises(EnvServerError, match=rf"maze server http://127.0.0.1:{port}: POST /maze/step failed"):
            env.step("Action: move right")
        assert time.monotonic() - started < 10  # bounded retries, no hang
        assert not env.done  # the episode is not quietly ended
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


class Garbage(BaseHTTPRequestHandler):
    """A server that answers every request with `reply` (bytes) and status `status`."""

    reply, status = b"<html>nope</html>", 200

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(self.status)
        self.end_headers()
        self.wfile.write(self.reply)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize(
    ("reply", "status", "message"),
    [
        (b"<html>nope</html>", 200, "answered something that is not JSON"),
        (b'{"error": "The task with environment 0 has finished."}', 200, "answered an error: The task with"),
        (b'{"identifier": 3}', 200, "answered without field 'id'"),
        (b"oops", 500, "answered HTTP 500"),
    ],
)
def test_a_server_answering_garbage_is_a_one_line_error_naming_the_endpoint(reply, status, message):
    handler = type("G", (Garbage,), {"reply": reply, "status": status})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        env = make_env("babyai", EnvBackend(backend="http", url=f"http://127.0.0.1:{httpd.server_port}", retries=0))
        with pytest.raises(EnvServerError, match=f"POST /create {message}"):
            env.reset(0)
    finally:
        httpd.shutdown()


def test_the_env_backend_config_says_what_is_wrong():
    with pytest.raises(ValueError, match="needs url = 'http://host:port'"):
        EnvBackend(backend="http")
    with pytest.raises(ValueError, match="only for backend = 'http'"):
        EnvBackend(url="http://x:1")
    from fedse.experiments.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="env.alfworld"):
        load_config(None, ["env.alfworld.backend='local'"])


def test_a_federation_on_http_environments_ends_like_the_in_process_one(tmp_path, servers):
    from helpers import records, tiny_config

    local = Federation(tiny_config(), tmp_path / "local", Policy(load_base("tiny-random")))
    local.run()
    urls = [f"env.{e}.backend='http'" for e in ("maze", "wordle")]
    urls += [f"env.{e}.url='{servers['lmrlgym'].url}'" for e in ("maze", "wordle")]
    far = Federation(tiny_config(*urls), tmp_path / "far", Policy(load_base("tiny-random")))
    open_before = servers["lmrlgym"].open_sessions()
    far.run()
    assert servers["lmrlgym"].open_sessions() == open_before  # each episode closed its server-side game
    assert far.global_adapter.hash == local.global_adapter.hash
    assert records(far.store.root) == records(local.store.root)


def test_a_run_whose_server_dies_stops_and_resumes_on_a_new_address(tmp_path, servers):
    """Round 2 stops with the server's error (no episode quietly recorded as failed), and a
    resume pointed at a live server ends like the uninterrupted in-process run."""
    from helpers import records, tiny_config

    def at(url, *extra):
        return tiny_config(*extra, "env.maze.backend='http'", f"env.maze.url='{url}'", "env.maze.retries=0")

    def policy():
        return Policy(load_base("tiny-random"))

    local = Federation(tiny_config(), tmp_path / "local", policy())
    local.run()
    first = Served("lmrlgym")
    Federation(at(first.url, "fed.rounds=1"), tmp_path / "far", policy()).run()
    first.stop()
    with pytest.raises(EnvServerError, match=rf"maze server {first.url}: POST /maze/create failed"):
        Federation(at(first.url), tmp_path / "far", policy()).run(resume=True, change_config=True)
    assert json.loads((tmp_path / "far" / "state.json").read_text())["round"] == 1
    resumed = Federation(at(servers["lmrlgym"].url), tmp_path / "far", policy())
    resumed.run(resume=True, change_config=True)
    assert resumed.global_adapter.hash == local.global_adapter.hash
    assert records(resumed.store.root) == records(local.store.root)


# --- AgentTraj -----------------------------------------------------------------------------------

HAND_WRITTEN = [
    {
        "item_id": "lmrlgym_maze_3",
        "conversations": [
            {"from": "human", "loss": None, "value": "You are an agent in a maze. Reach the goal."},
            {"from": "gpt", "loss": False, "value": "OK"},
            {
                "from": "human",
                "loss": None,
                "value": "The goal is at position 8, 6. Your current position is at position 1, 4. "
                "There are walls above you, below you.",
            },
            {"from": "gpt", "loss": True, "value": "Thought: The goal is lower right.\nAction: move right"},
            {"from": "human", "loss": None, "value": "The goal is at position 8, 6. ..."},
            {"from": "gpt", "loss": False, "value": "Thought: a turn not to learn from.\nAction: move left"},
        ],
    },
    {
        "item_id": "babyai_7",
        "conversations": [
            {"from": "human", "value": "Instruction."},
            {"from": "gpt", "value": "OK"},
            {"from": "human", "value": "Your goal: go to the red ball"},
            {"from": "gpt", "value": "Thought: go.\nAction: go to red ball 1"},
        ],
        "reward": 0.0,
        "success": 0,
    },
    {"item_id": "webshop_12", "conversations": [{"from": "human", "value": "i"}, {"from": "gpt", "value": "OK"}]},
]


def test_agenttraj_round_trip_is_exact_and_seeds_a_buffer(tmp_path, tiny_policy):
    path = tmp_path / "maze_train.json"
    path.write_text(json.dumps(HAND_WRITTEN, indent=2))
    trajectories = read_agenttraj(path)
    assert [to_agenttraj(t) for t in trajectories] == HAND_WRITTEN
    assert [(t.env, t.task_id, t.success) for t in trajectories] == [
        ("maze", 3, True),
        ("babyai", 7, False),
        ("webshop", 12, True),
    ]
    write_agenttraj(trajectories, tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text()) == HAND_WRITTEN
    lines = tmp_path / "lines.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in HAND_WRITTEN))
    assert [to_agenttraj(t) for t in read_agenttraj(lines)] == HAND_WRITTEN

    seeds = expert_seeds("maze", ["maze"], 0, seed_file=str(path))
    assert [(t.env, t.task_id) for t in seeds] == [("maze", 3)]
    seeds = expert_seeds("babyai", ["babyai"], 0, seed_file=str(path))
    assert seeds == []  # an unsuccessful record does not seed a buffer

    # the record's loss flags decide which agent turns are trained on
    from fedse.agent.chat import ChatLayout

    layout = ChatLayout(tiny_policy.tokenizer)
    maze = trajectories[0]
    ids, mask = layout.encode_episode(maze.messages)
    trained = layout.tokenizer.decode([i for i, m in zip(ids, mask) if m])
    assert "move right" in trained and "move left" not in trained
    flags_off = [dict(m, loss=None) if m["role"] == "assistant" else m for m in maze.messages]
    assert "move left" in layout.tokenizer.decode([i for i, m in zip(*layout.encode_episode(flags_off)) if m])


def test_a_federation_seeded_from_an_agenttraj_file_trains_on_it(tmp_path):
    from helpers import tiny_config

    records = [to_agenttraj(t) for t in expert_seeds("maze", ["maze"], 3)]
    path = tmp_path / "seeds.json"
    path.write_text(json.dumps(records))
    fed = Federation(
        tiny_config("fed.rounds=1", "buffer.expert_seeds=0", f"buffer.seed_file='{path}'", "explore.tasks=0"),
        tmp_path / "run",
        Policy(load_base("tiny-random")),
    )
    fed.run()
    assert len(fed.transport.buffer("maze").entries) == 3 and fed.transport.buffer("wordle").entries == []
    client = next(json.loads(x) for x in fed.store.metrics.read_text().splitlines() if '"client": "maze"' in x)
    assert client["train_tokens"] > 0

    from fedse.cli import main

    assert main(["traj", "export", str(fed.store.root), "--out", str(tmp_path / "kept.json")]) == 0
    kept = json.loads((tmp_path / "kept.json").read_text())
    assert kept == records  # the seeds come back as they went in (a run kept nothing else here)
    assert main(["traj", "export", str(tmp_path), "--out", str(tmp_path / "x.json")]) == 2  # not a run folder


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[{", "not JSON"),
        ('[{"item_id": "alfworld_3", "conversations": []}]', "item_id 'alfworld_3'"),
        ('[{"item_id": "babyai_x", "conversations": []}]', "item_id 'babyai_x'"),
        ('[{"item_id": "babyai_1", "conversations": [{"from": "bot", "value": "x"}, {}]}]', "turn 0"),
        ('[{"item_id": "babyai_1", "conversations": "hi"}]', "list of at least 2 turns"),
        (
            '[{"item_id": "babyai_1", "conversations": [{"from": "human", "value": "a", "loss": 2}, '
            '{"from": "gpt", "value": "b"}]}]',
            "'loss' must be",
        ),
    ],
)
def test_a_bad_agenttraj_file_names_the_record_and_what_is_wrong(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(AgentTrajError, match=message):
        read_agenttraj(path)


def test_an_unknown_environment_error_is_an_env_error():
    with pytest.raises(EnvError, match="unknown environment"):
        make_env("alfworld", EnvBackend(backend="http", url="http://127.0.0.1:1"))


def test_a_game_described_only_by_configuration_plays_on_its_server(servers, tmp_path):
    from fedse.experiments.config import ConfigError, load_config

    maze = make_env("maze")
    (tmp_path / "instruction.txt").write_text(maze.instruction)
    table = (
        "[env.far-maze]\n"
        f'backend = "http"\nurl = "{servers["lmrlgym"].url}"\n'
        f'instruction_file = "{tmp_path / "instruction.txt"}"\nmax_turns = {maze.max_turns}\n'
        'train = "0-9"\ntest = "10-14"\naction = "after"\n'
        '[env.far-maze.dialect]\nprefix = "/maze"\ntask_field = "game"\n'
    )
    (tmp_path / "far.toml").write_text(table + '[fed]\nclients = ["far-maze"]\n[buffer]\nexpert_seeds = 0\n')
    config = load_config(tmp_path / "far.toml", [])
    far = make_env("far-maze", config.env["far-maze"])
    assert far.instruction == maze.instruction and far.splits == {
        "train": tuple(range(10)),
        "test": tuple(range(10, 15)),
    }
    outputs = maze.expert(3)
    assert [getattr(s, "observation", s) for s in transcript(far, 3, outputs)] == [
        getattr(s, "observation", s) for s in transcript(maze, 3, outputs)
    ]
    assert far.done  # the expert's episode ended with the server's done
    far.close()
    wrong = make_env("far-maze", config.env["far-maze"].model_copy(update={"dialect": None}))
    with pytest.raises(EnvServerError, match="far-maze server .*: POST /create"):
        wrong.reset(0)  # AgentGym's common spelling, without LMRL-Gym's /maze prefix
    (tmp_path / "far.toml").write_text(table.replace("max_turns = ", "max_turnz = ").split("max_turnz")[0])
    with pytest.raises(ConfigError, match=r"\[env.far-maze\]: environment 'far-maze' .* needs max_turns"):
        load_config(tmp_path / "far.toml", [])


def test_serve_env_serves_an_environment_of_your_own():
    from fedse.envs import register_env
    from fedse.errors import UserError

    register_env("desk", "acme_tickets:TicketRouting", {"tickets": 20})
    served = Served("desk")
    try:
        local, far = make_env("desk"), make_env("desk", EnvBackend(backend="http", url=served.url))
        for task in (0, 7):
            outputs = ["Thought: guess.\nAction: route billing", *local.expert(task)]
            assert [getattr(s, "observation", s) for s in transcript(far, task, outputs)] == [
                getattr(s, "observation", s) for s in transcript(local, task, outputs)
            ]
        far.close()
    finally:
        served.stop()
    with pytest.raises(UserError, match="unknown environment server 'nowhere'; choose one of: babyai, lmrlgym"):
        make_app("nowhere")


def seed_record(item: str = "lmrlgym_maze_3", turns: list | None = None) -> dict:
    return {
        "item_id": item,
        "conversations": turns
        or [
            {"from": "human", "value": "instruction"},
            {"from": "gpt", "value": "OK"},
            {"from": "human", "value": "observation"},
            {"from": "gpt", "value": "Thought: go.\nAction: move up"},
        ],
    }


MALFORMED_SEEDS = {
    "nested": ("[" * 100_000).encode(),
    "long-id": json.dumps([seed_record("lmrlgym_maze_" + "7" * 5000)]).encode(),
    "odd-digit": json.dumps([seed_record("lmrlgym_maze_²")]).encode(),
    "latin-1": json.dumps([seed_record()]).encode().replace(b"instruction", "instrucción".encode("latin-1")),
    "no-agent-turn": json.dumps(
        [seed_record(turns=[{"from": "human", "value": "i"}, {"from": "gpt", "value": "OK"}])]
    ).encode(),
}


@pytest.mark.parametrize("kind", list(MALFORMED_SEEDS))
def test_a_malformed_seed_file_is_one_line_and_leaves_no_run_behind(tmp_path, kind, capsys):
    from fedse.cli import main
    from helpers import TINY

    seeds = tmp_path / "seeds.json"
    seeds.write_bytes(MALFORMED_SEEDS[kind])
    sets = [f"--set={s}" for s in [*TINY, "fed.rounds=1", "fed.clients=['maze']", f"buffer.seed_file='{seeds}'"]]
    assert main(["run", "--runs-dir", str(tmp_path / "runs"), "--name", "r", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("fedse: error: ") and "\n" not in err and str(seeds) in err
    assert not (tmp_path / "runs" / "r").exists()


def test_an_over_long_seed_turn_is_cut_like_an_over_long_episode(tmp_path, capsys):
    from fedse.cli import main
    from helpers import TINY

    long = seed_record(turns=[*seed_record()["conversations"][:3], {"from": "gpt", "value": "x " * 500_000}])
    seeds = tmp_path / "seeds.json"
    seeds.write_text(json.dumps([long, seed_record("lmrlgym_maze_4")]))
    sets = [f"--set={s}" for s in [*TINY, "fed.rounds=1", "fed.clients=['maze']", f"buffer.seed_file='{seeds}'"]]
    assert main(["run", "--runs-dir", str(tmp_path / "runs"), "--name", "r", "--set=buffer.expert_seeds=0", *sets]) == 0


class CountingGame(BaseHTTPRequestHandler):
    """A game fedse has never seen, on a minimal server of its own (not fedse's), in its own
    dialect: `/api/new`-less AgentGym shape with `env`, `task` and `text` fields. Task t: say the
    number t + 1 (`Action: say <n>`)."""

    sessions: ClassVar[dict] = {}

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"null")
        path = self.path.removeprefix("/game")
        if path == "/create":
            reply = {"id": len(self.sessions)}
            self.sessions[reply["id"]] = None
        elif path == "/reset":
            self.sessions[body["env"]] = body["task"]
            reply = {"observation": f"Say the number after {body['task']}."}
        elif path == "/step":
            right = body["action"] == f"say {self.sessions[body['env']] + 1}"
            reply = {"text": "Right." if right else "No.", "reward": float(right), "done": right}
        else:
            reply = True
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_a_game_on_a_server_of_its_own_federates_from_configuration_alone(tmp_path):
    from fedse.evolve.agenttraj import to_agenttraj
    from fedse.experiments.config import load_config
    from helpers import TINY, records

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), type("Game", (CountingGame,), {"sessions": {}}))
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        # its seeds: an AgentTraj file the organisation keeps (the game has no scripted expert)
        demos = []
        for task in range(0, 10, 2):
            record = seed_record(f"counting_{task}")
            record["conversations"][-1]["value"] = f"Thought: after {task} comes {task + 1}.\nAction: say {task + 1}"
            demos.append(record)
        (tmp_path / "seeds.json").write_text(json.dumps(demos))
        (tmp_path / "run.toml").write_text(
            "[env.counting]\n"
            f'backend = "http"\nurl = "http://127.0.0.1:{httpd.server_port}"\n'
            'instruction = "Say the number that comes next."\nmax_turns = 2\ntrain = "0-9"\ntest = "10-13"\n'
            '[env.counting.dialect]\nprefix = "/game"\nid_field = "env"\ntask_field = "task"\n'
            'observation_field = "text"\n'
            f'[buffer]\nexpert_seeds = 0\nseed_file = "{tmp_path / "seeds.json"}"\n'
        )
        config = load_config(
            tmp_path / "run.toml", [*TINY, "fed.clients=['counting', 'maze']", "fed.rounds=1", "buffer.expert_seeds=0"]
        )
        fed = Federation(config, tmp_path / "run", Policy(load_base("tiny-random")))
        fed.run()
        seeded = [t for _, t in fed.transport.buffer("counting").entries]
        assert len(seeded) == 5 and all(t.env == "counting" for t in seeded)  # from the file, no expert
        assert to_agenttraj(seeded[0])["item_id"] == "counting_0"
        evals = {r["env"]: r for r in records(fed.store.root) if r["event"] == "eval"}
        assert set(evals) == {"counting", "maze"} and evals["counting"]["tasks"] == 2  # played on its server
    finally:
        httpd.shutdown()


def test_a_huge_body_is_refused_without_being_read(servers):
    """A client that declares 200 MB gets its error at once, before sending more than a few bytes."""
    import socket

    lmrl = servers["lmrlgym"]
    with socket.create_connection(("127.0.0.1", lmrl.port), timeout=10) as conn:
        head = f"POST /maze/step HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {200 * 2**20}\r\n\r\n"
        conn.sendall(head.encode() + b'{"id": 0, "action": "')
        reply = conn.recv(65536).decode()
    assert " 200 " in reply.split("\r\n")[0] and "over the limit" in reply
    # a body a little over the limit is read and dropped, and its sender gets the error as a reply
    _, reply = lmrl.call("POST", "/maze/step", b'{"action": "' + b"x" * (2 * MAX_BODY) + b'"}')
    assert "over the limit" in reply["error"]


def test_one_client_cannot_take_every_session():
    from fedse.envs.http_server import RequestError, SessionTable

    table = SessionTable(lambda: make_env("maze"), ttl=600.0, max_sessions=10, per_client=2)
    table.create("10.0.0.1"), table.create("10.0.0.1")
    with pytest.raises(RequestError, match="client 10.0.0.1 already holds 2 sessions"):
        table.create("10.0.0.1")
    assert table.create("10.0.0.2") not in (None,)  # another client still gets one
    table.close(0)
    table.create("10.0.0.1")  # closing one frees its place


@pytest.mark.parametrize(
    "trickle",
    [
        [b"POST /maze/step HTTP/1.1\r\n", b"Host: x\r\n", b"X-Slow: 1\r\n", b"X-Slow: 2\r\n", b"X-Slow: 3\r\n"],
        [b"POST /maze/step HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n", b'{"id"', b": 0", b", ", b'"a'],
    ],
    ids=["headers", "body"],
)
def test_a_request_sent_a_byte_at_a_time_is_disconnected_at_its_deadline(trickle):
    """Slowloris: each piece arrives in time to keep a connection open, the request never completes;
    the server closes it once the request deadline passes, and keeps serving everyone else."""
    served = ServedApp(make_app("maze"), request_deadline=1.0)
    try:
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as conn:
            start, closed_after = time.monotonic(), None
            for piece in trickle * 4:
                try:
                    conn.sendall(piece)
                    conn.settimeout(0.4)
                    if conn.recv(1024) == b"":
                        closed_after = time.monotonic() - start
                        break
                except TimeoutError:
                    continue  # still open, nothing to read: send the next piece
                except OSError:
                    closed_after = time.monotonic() - start
                    break
        assert closed_after is not None and 0.9 < closed_after < 2.5
        # a keep-alive connection gets a fresh deadline for each request: two requests 0.7 s apart pass
        with socket.create_connection(("127.0.0.1", served.port), timeout=10) as conn:
            for _ in range(2):
                time.sleep(0.7)
                conn.sendall(b"GET /maze/available_actions HTTP/1.1\r\nHost: x\r\n\r\n")
                assert b" 200 " in conn.recv(65536).split(b"\r\n")[0]
    finally:
        served.stop()
