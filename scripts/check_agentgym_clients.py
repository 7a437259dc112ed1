"""AgentGym's own environment clients, unmodified, against `fedse serve-env` on loopback.

    python scripts/check_agentgym_clients.py /path/to/AgentGym

Needs a checkout of https://github.com/WooooDyy/AgentGym (tested at 3ef9235). Its client
modules are loaded straight from `agentenv/agentenv/envs/` (the package's `__init__` pulls
in every environment's dependencies, and `openai`, which these clients never call, is
stubbed). For each of the five environments, AgentGym's client plays fedse's expert and a
malformed action on test tasks, and every step must equal fedse's in-process episode.
Not part of `make test`: CI cannot reach GitHub.
"""

from __future__ import annotations

import argparse
import importlib.util
import socket
import sys
import threading
import time
import types

import uvicorn

from fedse.envs import make_env
from fedse.envs.http_server import make_app


def load_clients(agentgym: str) -> dict[str, types.ModuleType]:
    root = f"{agentgym}/agentenv"
    sys.path.insert(0, root)
    sys.modules.setdefault("openai", types.SimpleNamespace(OpenAI=object))
    for name, path in (("agentenv", f"{root}/agentenv"), ("agentenv.envs", f"{root}/agentenv/envs")):
        package = types.ModuleType(name)
        package.__path__ = [path]
        sys.modules[name] = package
    modules = {}
    for name in ("babyai", "lmrlgym", "textcraft", "webshop"):
        spec = importlib.util.spec_from_file_location(f"agentenv.envs.{name}", f"{root}/agentenv/envs/{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        modules[name] = module
    return modules


def serve(server: str) -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uv = uvicorn.Server(uvicorn.Config(make_app(server), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=uv.run, daemon=True).start()
    while not uv.started:
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("agentgym", help="a checkout of WooooDyy/AgentGym")
    parser.add_argument("--tasks", type=int, default=5, help="test tasks per environment")
    args = parser.parse_args()
    m = load_clients(args.agentgym)
    urls = {server: serve(server) for server in ("babyai", "lmrlgym", "textcraft", "webshop")}
    clients = {
        "babyai": lambda: m["babyai"].BabyAIEnvClient(urls["babyai"], 1),
        "maze": lambda: m["lmrlgym"].MazeEnvClient(urls["lmrlgym"] + "/maze", 1),
        "wordle": lambda: m["lmrlgym"].WordleEnvClient(urls["lmrlgym"] + "/wordle", 1),
        "textcraft": lambda: m["textcraft"].TextCraftEnvClient(urls["textcraft"], 1),
        "webshop": lambda: m["webshop"].WebshopEnvClient(urls["webshop"], 1),
    }
    failures = 0
    for name, make in clients.items():
        local, client = make_env(name), make()
        same = successes = 0
        tasks = list(local.splits["test"])[: args.tasks]
        for task in tasks:
            first = local.reset(task)
            client.reset(task)
            # Wordle's client shows its own instructions first; the others embed the server's observation.
            match = name == "wordle" or first in client.observe()
            for output in [*local.expert(task), "Action: nonsense"]:
                if local.done:
                    break
                ours, theirs = local.step(output), client.step(output)
                match &= (ours.observation, ours.reward, ours.done) == (theirs.state, theirs.reward, theirs.done)
            same += match
            successes += ours.success
        failures += same != len(tasks)
        print(
            f"{name}: AgentGym's {type(client).__name__}: {same}/{len(tasks)} episodes equal to fedse in process; expert {successes}/{len(tasks)}"
        )
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
