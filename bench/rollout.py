"""Rollout throughput: the batched engine against AgentGym's naive loop, on the same episodes.

    .venv/bin/python bench/rollout.py --per-env 32 --max-batch 64 --naive-sample 12  # the workload results were measured on
    .venv/bin/python bench/rollout.py --per-env 8 --skip-naive                       # a quick look

Prints, for each way: episodes/s, generated and processed tokens/s (processed: tokens kept in
the context; the engine's rejected drafts and padding are not counted), forward passes and
drafts kept; the ratio engine/naive; and the processed-token rate as a fraction of this
machine's matmul roof in the model's dtype, measured in the same run (0.27 GFLOP per token
for SmolLM2-135M, 2 x parameters otherwise). `--without-drafts` adds the engine with
speculative decoding off, to show what batching alone gives.
All ways play greedy with the same token ids and the same dtype (`--dtype`, default auto:
bf16 on AMX CPUs), so they take the same actions up to floating-point ties.
"""

from __future__ import annotations

import argparse

import torch

from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.agent.rollout import MAX_DRAFT, RolloutRequest, RolloutStats, Sampling, naive_rollout, rollout
from fedse.envs import make_env
from fedse.process import set_up_process
from roof import matmul_gflops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"], help="both ways use it")
    parser.add_argument("--envs", nargs="*", default=["maze", "wordle", "textcraft"])
    parser.add_argument("--per-env", type=int, default=4, help="test tasks per environment")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument(
        "--naive-sample",
        type=int,
        help="the naive loop plays only this many of the episodes, spread evenly (it is sequential: "
        "at --per-env 32 it takes ~35 min); compare generated tokens/s then",
    )
    parser.add_argument("--without-drafts", action="store_true", help="also run the engine without drafts")
    args = parser.parse_args()
    set_up_process()

    torch.set_num_threads(torch.get_num_threads())
    policy = Policy(load_base(args.model, dtype=args.dtype))
    sampling = Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens)
    requests = [
        RolloutRequest(name, task_id, sampling=sampling)
        for name in args.envs
        for task_id in make_env(name).splits["test"][: args.per_env]
    ]
    params = sum(p.numel() for p in policy.base.model.parameters())
    gflop_per_token = 0.27 if args.model == "smollm2-135m" else 2 * params / 1e9
    fp32_roof = matmul_gflops()
    dtype = policy.dtype
    roof = fp32_roof if dtype == torch.float32 else matmul_gflops(dtype=dtype)
    print(
        f"{len(requests)} episodes ({args.per_env} per env: {', '.join(args.envs)}), greedy, "
        f"max {args.max_new_tokens} new tokens per turn, {policy.dtype}, max batch {args.max_batch}; "
        f"matmul fp32 {fp32_roof:.0f} GFLOP/s"
        + (f", {str(dtype).removeprefix('torch.')} {roof:.0f} GFLOP/s" if roof != fp32_roof else "")
        + "; "
        f"{gflop_per_token} GFLOP/token -> roof {roof / gflop_per_token:.0f} tok/s"
    )

    every = len(requests) / args.naive_sample if args.naive_sample else 1
    naive_ids = sorted({int(i * every) for i in range(args.naive_sample or len(requests))})
    results = {}
    ways = ["engine"] + (["no-drafts"] if args.without_drafts else []) + ([] if args.skip_naive else ["naive"])
    for way in ways:
        stats = RolloutStats()
        if way != "naive":
            max_draft = 0 if way == "no-drafts" else MAX_DRAFT
            trajectories = rollout(
                policy, requests, max_batch=args.max_batch, progress=way, stats=stats, max_draft=max_draft
            )
        else:
            trajectories = naive_rollout(policy, [requests[i] for i in naive_ids], stats=stats)
        results[way] = (stats, trajectories)
        rate = stats.processed_tokens / stats.seconds
        print(
            f"{way:>9}: {stats.summary()}; {rate * gflop_per_token / roof:.1%} of the matmul roof; "
            f"success {sum(t.success for t in trajectories)}/{len(trajectories)}"
        )
    if "naive" in results:
        n, nt = results["naive"]
        for way in ways[:-1]:
            e, et = results[way]
            same = sum(et[i].outputs == b.outputs for i, b in zip(naive_ids, nt, strict=True))
            # The naive loop re-reads the whole conversation every turn, so its processed tokens
            # include that repeated work; generated tokens are the same work for both.
            generated = (e.generated_tokens / e.seconds) / (n.generated_tokens / n.seconds)
            episodes = (e.episodes / e.seconds) / (n.episodes / n.seconds)
            print(
                f"{way}/naive: {generated:.1f}x generated tokens/s, {episodes:.1f}x episodes/s; "
                f"identical episodes: {same}/{len(nt)}"
            )


if __name__ == "__main__":
    main()
