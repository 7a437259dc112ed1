"""How much an environment step costs: random listed actions on BabyAI (the heaviest environment).

    .venv/bin/python bench/env_steps.py                 # 1,000 steps over the 90 BabyAI test ids
    .venv/bin/python bench/env_steps.py --steps 5000

Each step picks one of the currently available actions at random (macro-actions included,
so a step may run several minigrid primitives) and feeds it through `step` as model text;
an episode that ends or reaches the 20-turn limit starts the next test id. Prints the time
per 100 steps and per reset, and the expert's time per task, so the environment can be
compared with a rollout's per-turn model time (the environment must never be the bottleneck).
"""

from __future__ import annotations

import argparse
import random
import time

from fedse.envs import make_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    env = make_env("babyai")
    ids = env.splits["test"]
    rng = random.Random(args.seed)
    steps = resets = turns = 0
    step_s = reset_s = 0.0
    while steps < args.steps:
        start = time.perf_counter()
        env.reset(ids[resets % len(ids)])
        reset_s += time.perf_counter() - start
        resets, turns = resets + 1, 0
        while steps < args.steps and turns < env.max_turns:
            action = rng.choice(list(env.view.actions))
            start = time.perf_counter()
            result = env.step(f"Thought: try something.\nAction: {action}")
            step_s += time.perf_counter() - start
            steps, turns = steps + 1, turns + 1
            if result.done:
                break

    start = time.perf_counter()
    for task_id in ids:
        env.expert(task_id)
    expert_s = time.perf_counter() - start
    print(
        f"babyai: {steps} random listed actions in {step_s:.2f} s = {100 * step_s / steps * 1000:.1f} ms per 100 steps"
    )
    print(f"babyai: {resets} resets, {1000 * reset_s / resets:.2f} ms each")
    print(f"babyai: expert on {len(ids)} test ids in {expert_s:.1f} s = {expert_s / len(ids):.3f} s per task")


if __name__ == "__main__":
    main()
