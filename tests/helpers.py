"""Builders the tests share: the tiny federation's configuration, random LoRA factors and
adapters. Test modules import these from here, never from one another."""

import importlib.util
import json
from pathlib import Path

import torch

from fedse.agent.lora import A_SUFFIX, B_SUFFIX, Adapter, LoraSpec, lora_modules
from fedse.agent.policy import Policy
from fedse.experiments.config import load_config
from fedse.fl.aggregators import make_aggregator
from fedse.fl.update import Update

TINY = [
    "model.name='tiny-random'", "model.lora_rank=4", "model.lora_alpha=8",
    "fed.clients=['maze', 'wordle']", "fed.rounds=2",
    "explore.tasks=2", "explore.max_new_tokens=6", "buffer.expert_seeds=2",
    "train.epochs=1", "train.lr=0.001", "train.max_length=1024", "train.batch_tokens=2048",
    "eval.tasks=2", "eval.max_new_tokens=6",
]  # fmt: skip


def tiny_config(*extra):
    return load_config(None, [*TINY, *extra])


SPEC = LoraSpec(rank=4, alpha=8)
MODULES = {
    "base_model.model.model.layers.0.self_attn.q_proj": (16, 12),
    "base_model.model.model.layers.1.mlp.up_proj": (20, 12),
}


def random_factors(seed: int, a_from: Adapter | None = None) -> Adapter:
    """Random A and B for the two modules of MODULES (A copied from `a_from` if given)."""
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out, inp) in MODULES.items():
        tensors[module + A_SUFFIX] = torch.randn(SPEC.rank, inp, generator=gen)
        tensors[module + B_SUFFIX] = torch.randn(out, SPEC.rank, generator=gen)
        if a_from is not None:
            tensors[module + A_SUFFIX] = a_from.tensors[module + A_SUFFIX].clone()
    return Adapter(SPEC, tensors)


def updates_for(name: str, current: Adapter, k: int = 3, examples=(10, 20, 30), **options) -> list[Update]:
    """k clients' random updates for rule `name`, with random input summaries if it reads inputs."""
    aggregator = make_aggregator(name, **options)
    clients = [random_factors(100 + i, a_from=current if aggregator.trains == "B" else None) for i in range(k)]
    return [
        Update(
            f"c{i}",
            aggregator.upload(c.tensors),
            examples[i % len(examples)],
            inputs=aggregator.summarize_inputs(random_moments(current, 200 + i)) if aggregator.reads_inputs else {},
        )
        for i, c in enumerate(clients)
    ]


def random_moments(current: Adapter, seed: int, support: slice = slice(None)) -> dict[str, torch.Tensor]:
    """Module -> X X^T / n for random layer inputs X (zero outside the input coordinates `support`)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in lora_modules(current.tensors):
        width = current.tensors[module + A_SUFFIX].shape[1]
        x = torch.zeros(width, 3 * width, dtype=torch.float64)
        x[support] = torch.randn(width, 3 * width, generator=gen, dtype=torch.float64)[support]
        x *= torch.rand(width, 1, generator=gen, dtype=torch.float64) * 2  # unequal input scales
        out[module] = x @ x.T / (3 * width)
    return out


SMALL = LoraSpec(rank=4, alpha=8)


def random_adapter(policy: Policy, name: str, seed: int, spec: LoraSpec = SMALL) -> Adapter:
    """Attach an adapter whose A and B are both random, so it really changes the model."""
    adapter = policy.new_adapter(name, spec, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in adapter.tensors.items()}
    adapter = Adapter(spec, tensors)
    policy.load(name, adapter)
    return adapter


def records(root: Path, drop=("wire",)) -> list[dict]:
    """metrics.jsonl without wall-clock fields (and Flower's wire records)."""
    out = []
    for line in (root / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["event"] not in drop:
            out.append({k: v for k, v in r.items() if k not in ("seconds", "train_seconds", "inputs_seconds")})
    return out


class ServedApp:
    """An ASGI app (e.g. `fedse serve-env`'s) on a loopback port, in a thread of this process,
    under the uvicorn configuration `fedse serve-env` uses."""

    def __init__(self, app, **config) -> None:
        import socket
        import threading
        import time

        import uvicorn

        from fedse.envs.http_server import server_config

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(server_config(app, "127.0.0.1", self.port, **config))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def bench_module(name: str):
    """bench/<name>.py imported as a module (the bench scripts are not a package)."""
    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
