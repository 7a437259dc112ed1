"""One local self-evolution step on the embedded model: does SFT on Maze expert demos help?

    .venv/bin/python bench/maze_sft.py            # 30 expert trajectories, 2 epochs at lr 1e-3, 10 test ids

Trains a fresh LoRA adapter (r=8, alpha=16, all linear layers) on expert trajectories of the
AgentTraj Maze train ids (13-22, repeated to the requested count, as AgentTraj repeats them),
then plays greedy episodes on Maze test ids with the untrained and the trained adapter.
Prints both success rates, the training loss and the training tokens/s.
"""

from __future__ import annotations

import argparse

from fedse.agent.lora import LoraSpec
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.agent.rollout import GREEDY, RolloutRequest, rollout
from fedse.envs import make_env
from fedse.evolve.experts import expert_trajectory
from fedse.evolve.sft import TrainSection, train_adapter
from fedse.process import set_up_process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demos", type=int, default=30)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test-ids", default="13-22", help="Maze test ids, e.g. 13-22 or 0-9")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    args = parser.parse_args()
    set_up_process()

    env = make_env("maze")
    train_ids = env.splits["train"]
    demos = [expert_trajectory("maze", train_ids[i % len(train_ids)]) for i in range(args.demos)]
    lo, hi = map(int, args.test_ids.split("-"))
    requests = [RolloutRequest("maze", i, adapter="client", sampling=GREEDY) for i in range(lo, hi + 1)]

    policy = Policy(load_base(dtype=args.dtype))
    policy.new_adapter("client", LoraSpec(), seed=0)
    before = rollout(policy, requests)
    report = train_adapter(policy, "client", demos, TrainSection(epochs=args.epochs, lr=args.lr))
    after = rollout(policy, requests)
    rate = lambda ts: sum(t.success for t in ts) / len(ts)  # noqa: E731
    print(
        f"trained on {len(demos)} Maze expert trajectories, {args.epochs} epoch(s), lr {args.lr}, {policy.dtype}: "
        f"loss {report.epoch_losses}, {report.tokens} tokens in {report.seconds:.1f} s "
        f"= {report.tokens_per_s:.0f} training tok/s"
    )
    print(f"greedy success on Maze test ids {args.test_ids}: untrained {rate(before):.0%} -> trained {rate(after):.0%}")
    print("first trained output:", after[0].outputs[0].replace("\n", " | "))


if __name__ == "__main__":
    main()
