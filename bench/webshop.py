"""WebShop's costs and baselines: catalog + index build, search time, expert and random-clicker scores.

    .venv/bin/python bench/webshop.py                 # synthetic catalog, 100 test goals for the random clicker
    .venv/bin/python bench/webshop.py --goals 200 --seed 1

Prints (1) the time to generate the synthetic catalog, derive its goals and build the BM25
index, (2) the mean search time over the test goals' instructions, (3) the expert's reward on
every test goal, and (4) a random clicker's mean reward and success rate: it searches the
instruction, then clicks uniformly among the current page's clickables (searching again on
the search page) until it buys or runs out of WebShop's 10 turns (a floor any agent should beat).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from fedse.envs.webshop import WebShopEnv, open_shop
from fedse.envs.webshop.catalog import goals
from fedse.envs.webshop.search import SearchEngine
from fedse.envs.webshop.synthetic import synthetic_catalog


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--goals", type=int, default=100, help="test goals for the random clicker")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    start = time.perf_counter()
    catalog = synthetic_catalog.__wrapped__()  # uncached: time the real work
    generated = time.perf_counter()
    goal_list = goals(catalog)
    derived = time.perf_counter()
    SearchEngine(catalog)
    built = time.perf_counter()
    print(
        f"catalog: {len(catalog.products)} products in {generated - start:.2f} s; {len(goal_list)} goals in "
        f"{derived - generated:.2f} s; BM25 index in {built - derived:.2f} s; total {built - start:.2f} s"
    )

    env = WebShopEnv(open_shop())
    test = env.splits["test"]
    queries = [env.shop.catalog.by_asin[env.shop.goals[i].asin].instruction for i in test]
    start = time.perf_counter()
    for query in queries:
        env.shop.search.search(query)
    print(f"search: {1000 * (time.perf_counter() - start) / len(queries):.2f} ms per query (over {len(queries)})")

    rewards = []
    for task_id in test:
        env.reset(task_id)
        for output in env.expert(task_id):
            result = env.step(output)
        rewards.append(result.reward)
    print(
        f"expert: mean reward {statistics.mean(rewards):.3f}, reward 1 on {rewards.count(1.0)}/{len(test)} test goals"
    )

    rng = random.Random(args.seed)
    rewards, successes = [], 0
    for task_id in test[: args.goals]:
        env.reset(task_id)
        query = env.shop.catalog.by_asin[env.shop.goals[task_id].asin].instruction
        result = env.step(f"Action: search[{query}]")
        for _ in range(env.max_turns - 1):
            choices = [c for c in env.clickables() if c != "search"]
            # the search page (after "back to search") has nothing to click: search again
            action = f"click[{rng.choice(choices)}]" if choices else f"search[{query}]"
            result = env.step(f"Action: {action}")
            if result.done:
                break
        rewards.append(result.reward if result.done else 0.0)
        successes += result.success
    n = len(rewards)
    print(
        f"random clicker: mean reward {statistics.mean(rewards):.3f}, success {successes}/{n} = {successes / n:.1%}, "
        f"bought in {sum(r > 0 for r in rewards)}/{n} episodes with reward > 0"
    )


if __name__ == "__main__":
    main()
