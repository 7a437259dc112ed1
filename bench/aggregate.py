"""One server step of each aggregation rule: its time and peak memory, for 5 clients at rank 8 on
every linear layer, at SmolLM2-135M's adapter shapes and at Qwen2.5-7B's (random factors).

    .venv/bin/python bench/aggregate.py                   # both models, all rules, 5 clients
    .venv/bin/python bench/aggregate.py --clients 3 --models smollm2-135m

Each (model, rule) runs in a fresh process, so that its peak resident memory is its own:
`peak` is the process's maximum RSS (torch, the clients' factors and the step), `step` what
the step added to it. Rules:

- subspace, regmean, sum: the weight-space rules' server step proper, `merged_factors`: the
  factors of the merged update that are sent down (nothing dense); regmean's clients also send
  random input summaries of its default size (64 directions and a diagonal per layer);
- mean: Fed-SE's element-wise mean of A and of B (`FedSE.aggregate`);
- flora, fedex: their `aggregate`, which builds the dense ΔW to fold into the base. At 7B shapes
  that is 28 GB in float32 for all layers at once, more than this machine holds: they are run
  on one transformer layer's seven modules and their time is that layer's x the layer count
  (marked `per_layer`).

Writes the figures, with the CPU and torch's thread count, to results/bench/aggregate.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {  # (layers, {module: (out, in)}) of every linear layer LoRA adapts ("all-linear")
    "smollm2-135m": (
        30,
        {
            "q_proj": (576, 576),
            "k_proj": (192, 576),
            "v_proj": (192, 576),
            "o_proj": (576, 576),
            "gate_proj": (1536, 576),
            "up_proj": (1536, 576),
            "down_proj": (576, 1536),
        },
    ),
    "qwen2.5-7b": (
        28,
        {
            "q_proj": (3584, 3584),
            "k_proj": (512, 3584),
            "v_proj": (512, 3584),
            "o_proj": (3584, 3584),
            "gate_proj": (18944, 3584),
            "up_proj": (18944, 3584),
            "down_proj": (3584, 18944),
        },
    ),
}
RULES = ["subspace", "regmean", "sum", "mean", "flora", "fedex"]
DENSE = {"flora", "fedex"}
DENSE_LIMIT_BYTES = 4 * 2**30
"""Above this much dense float32 output for all layers, dense rules run one layer (x layers)."""


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def one(model: str, rule: str, clients: int, rank: int) -> dict:
    """Time one server step of `rule` in this process."""
    import torch

    from fedse.agent.lora import A_SUFFIX, B_SUFFIX, Adapter, LoraSpec
    from fedse.fl.aggregators import make_aggregator
    from fedse.fl.update import Update

    layers, modules = SHAPES[model]
    dense_bytes = layers * sum(o * i for o, i in modules.values()) * 4
    per_layer = rule in DENSE and dense_bytes > DENSE_LIMIT_BYTES
    built = 1 if per_layer else layers
    gen = torch.Generator().manual_seed(0)
    names = [f"base_model.model.model.layers.{n}.{m}" for n in range(built) for m in modules]

    def factors(zero_b: bool) -> dict[str, torch.Tensor]:
        out = {}
        for name in names:
            o, i = modules[name.rsplit(".", 1)[1]]
            out[name + A_SUFFIX] = torch.randn(rank, i, generator=gen) * 0.02
            out[name + B_SUFFIX] = torch.zeros(o, rank) if zero_b else torch.randn(o, rank, generator=gen) * 0.02
        return out

    spec = LoraSpec(rank=rank, alpha=2 * rank)
    current = Adapter(spec, factors(zero_b=True))
    aggregator = make_aggregator("fedse" if rule == "mean" else rule)

    def summary() -> dict[str, torch.Tensor]:
        shapes = {k: v.shape for k, v in aggregator.expected_inputs(current).items()}
        return {k: torch.rand(shape, generator=gen) for k, shape in shapes.items()}

    updates = [Update(f"c{k}", factors(zero_b=False), 10, inputs=summary()) for k in range(clients)]
    before = rss_mb()
    start = time.perf_counter()
    if rule in ("subspace", "regmean", "sum"):
        out = aggregator.merged_factors(current, updates)
        figures = out[1] if rule != "sum" else {}
    else:
        aggregator.aggregate(current, updates, {})
        figures = {}
    seconds = time.perf_counter() - start
    return {
        "model": model,
        "rule": rule,
        "clients": clients,
        "rank": rank,
        "seconds": seconds * (layers if per_layer else 1),
        "per_layer": per_layer,
        "peak_mb": rss_mb(),
        "step_mb": rss_mb() - before,
        "threads": torch.get_num_threads(),
        **figures,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--rules", nargs="+", default=RULES, choices=RULES)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--out", default="results/bench/aggregate.json")
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "RULE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one, args.clients, args.rank)))
        return
    from fedse.agent.dtype import cpu_model

    rows = []
    for model in args.models:
        for rule in args.rules:
            cmd = [
                sys.executable,
                __file__,
                "--one",
                model,
                rule,
                "--clients",
                str(args.clients),
                "--rank",
                str(args.rank),
            ]
            row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
            rows.append(row)
            note = " (one layer x layers)" if row["per_layer"] else ""
            print(
                f"{model:>13} {rule:>8}: {row['seconds']:8.2f} s{note}, peak RSS {row['peak_mb']:7.0f} MB, "
                f"step {row['step_mb']:6.0f} MB",
                flush=True,
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"cpu": cpu_model(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
