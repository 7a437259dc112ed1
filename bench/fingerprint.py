"""A behaviour fingerprint: tiny-model federations whose every figure must survive a refactoring.

    .venv/bin/python bench/fingerprint.py                 # 6 aggregators x 2 rounds on the tiny model
    .venv/bin/python bench/fingerprint.py --filter none   # explored episodes enter the buffers too

For each aggregator, prints the final global adapter's hash, a hash of every metrics record
(wall-clock seconds and the schema field left out) and a hash of each client's buffer. Run it
before and after a change that should not change behaviour: the lines must be identical.
The tiny random model never succeeds, so `--filter none` is what exercises training on
explored trajectories.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
from pathlib import Path

from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.experiments.config import load_config
from fedse.experiments.federation import Federation
from fedse.fl.aggregators import AGGREGATORS

TINY = [
    "model.name='tiny-random'", "model.lora_rank=4", "model.lora_alpha=8",
    "fed.clients=['maze', 'wordle', 'babyai']", "fed.rounds=2", "fed.seed=7",
    "explore.tasks=3", "explore.max_new_tokens=8", "buffer.expert_seeds=2",
    "train.epochs=1", "train.lr=0.001", "train.max_length=1024", "train.batch_tokens=2048",
    "eval.tasks=3", "eval.max_new_tokens=8",
]  # fmt: skip


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:12]


def fingerprint(root: Path, aggregator: str, filter_: str) -> dict:
    config = load_config(None, [*TINY, f"fed.aggregator='{aggregator}'", f"explore.filter='{filter_}'"])
    fed = Federation(config, root / aggregator, Policy(load_base("tiny-random")))
    fed.run()
    records = [json.loads(line) for line in fed.store.metrics.read_text().splitlines()]
    figures = [{k: v for k, v in r.items() if "seconds" not in k and k != "schema"} for r in records]
    return {
        "adapter": fed.global_adapter.hash,
        "metrics": digest(json.dumps(figures, sort_keys=True).encode()),
        "buffers": {c: digest(fed.store.buffer(c).read_bytes()) for c in config.fed.clients},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--filter", default="success", help="explore.filter for every run")
    parser.add_argument("--aggregators", nargs="*", default=list(AGGREGATORS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for aggregator in args.aggregators:
            print(aggregator, json.dumps(fingerprint(Path(tmp), aggregator, args.filter)))


if __name__ == "__main__":
    main()
