"""Learnability of the embedded model: where can self-evolution start?

    .venv/bin/python bench/learnability.py --envs babyai maze --demos 12 48 --epochs 2
    .venv/bin/python bench/learnability.py --demos 12 --federate 1 5       # what a round passes on
    .venv/bin/python bench/learnability.py --envs babyai maze webshop --demos 24 --epochs 1 \
        --federate 1 --rules mean sum subspace --transfer                     # and what interferes

For each environment and each N in `--demos`: a fresh adapter (the federation's init) trained
with fedse's trainer on N expert demonstrations of the train split (the same draw a client's
buffer is seeded with), then

- test: greedy success on `--test` test tasks, spread over the test split as evaluation does;
- explore: success at temperature 1.0 on `--explore` train tasks, each with its own seed, as a
  client explores. Self-evolution can start only where this is above 0: the filter keeps
  successes, and nothing else grows the buffer beyond the experts;
- stuck: how many of the failed exploration episodes ended repeating one action (their last
  three), whatever the environment answered: the agent has not learnt to react to feedback,
  which the experts' flawless demonstrations never show it.

`--federate LR...` also puts the per-env adapters of the largest N through one Fed-SE server
step (the unweighted mean of A and of B, over the environments studied) moved by each server
learning rate given (1: the paper's plain mean), and plays the result on every env, greedy on
the test tasks and at temperature 1.0 on the exploration tasks: what a federation's first
exploring round starts from. Each client's update reaches that model at about 1/K of its
strength under the plain mean; this shows what that costs and whether a larger server step
recovers it. `--rules` puts them through other rules too: `sum` and `subspace` (the weight-space
rules, folded into the base as a run does), `mean` being Fed-SE's.

`--interference` measures it layer by layer, as the aggregation literature's functional check
does: ρ_jk = ‖ΔW_j X_k‖ / ‖ΔW_k X_k‖ over every adapted layer, with X_k the inputs each layer sees
on env k's demonstrations (base model). ρ_jk near 0: client j's update leaves k's inputs alone, so
a sum of the updates does not disturb k; near 1 or above: it moves them as much as k's own does.

`--transfer` measures interference where it shows, in each client's own data: the mean NLL per
agent token of every env's demonstrations (the ones it trained on) under the base model, under
each env's adapter alone, and under each rule's global model. Row j, column k: how client j's
update moves client k's loss (the diagonal is k's own fit; off it, what j's update does on k's
prompts, which the merged model adds to k's).

Prints one markdown row per (env, N) and per server step, with 95 % Wilson intervals, the
training tokens and seconds. Test tasks and exploration tasks are the same for every row.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedse.agent.lora import A_SUFFIX, B_SUFFIX, LoraSpec, fresh_adapter, lora_modules
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.agent.rollout import RolloutRequest, Sampling, rollout
from fedse.agent.trajectory import Trajectory
from fedse.envs import make_env
from fedse.evolve.experts import expert_trajectory
from fedse.evolve.sft import TrainSection, mean_loss, train_adapter
from fedse.experiments.evaluation import evaluation_tasks
from fedse.experiments.report import wilson
from fedse.fl.aggregators import make_aggregator, update_factors
from fedse.fl.client import ExploreSection, exploration_requests, exploration_tasks
from fedse.fl.server import server_step
from fedse.fl.update import Update
from fedse.process import set_up_process
from fedse.seeds import derived_seed


def rate(successes: int, n: int) -> str:
    low, high = wilson(successes, n)
    return f"{successes}/{n} [{100 * low:.0f}, {100 * high:.0f}] %"


def successes(policy: Policy, requests: list[RolloutRequest], max_batch: int) -> dict[str, int]:
    """Successes per env of `requests` played in one batched rollout."""
    return tally(rollout(policy, requests, max_batch=max_batch))[0]


def tally(played: list[Trajectory]) -> tuple[dict[str, int], dict[str, int]]:
    """Per env: the successes, and the failures that ended stuck (their last three actions one
    repeated action, whatever the environment answered)."""
    won: dict[str, int] = {}
    stuck: dict[str, int] = {}
    envs = {name: make_env(name) for name in {t.env for t in played}}  # WebShop's builds its index
    for t in played:
        won[t.env] = won.get(t.env, 0) + int(t.success)
        actions = {envs[t.env].parse_action(o) for o in t.outputs[-3:]}
        stuck[t.env] = stuck.get(t.env, 0) + int(not t.success and len(t.outputs) >= 3 and len(actions) == 1)
    return won, stuck


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--envs", nargs="*", default=["babyai", "maze", "wordle", "textcraft", "webshop"])
    parser.add_argument("--demos", nargs="*", type=int, default=[12, 48])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--max-length", type=int, default=1536)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--test", type=int, default=15, help="test tasks per env")
    parser.add_argument("--explore", type=int, default=15, help="train tasks per env played at temperature 1.0")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--federate", nargs="*", type=float, default=[], help="server learning rates to try")
    parser.add_argument("--rules", nargs="*", default=["mean"], choices=["mean", "sum", "subspace", *REGMEAN])
    parser.add_argument("--held-out", action="store_true", help="--transfer on fresh demos, not the trained-on ones")
    parser.add_argument("--regmean-alpha", type=float, default=0.9, help="RegMean's weight on off-diagonal moments")
    parser.add_argument("--transfer", action="store_true", help="NLL of each env's demos under each adapter")
    parser.add_argument("--interference", action="store_true", help="ρ_jk = ‖ΔW_j X_k‖ / ‖ΔW_k X_k‖ per env pair")
    args = parser.parse_args()
    set_up_process()

    policy = Policy(load_base(args.model, dtype=args.dtype))
    moments: dict[str, dict[str, torch.Tensor]] = {}
    spec = LoraSpec(args.rank, 2 * args.rank)
    train = TrainSection(epochs=args.epochs, lr=args.lr, batch_tokens=args.batch_tokens, max_length=args.max_length)
    greedy = Sampling(temperature=0.0, max_new_tokens=args.max_new_tokens)
    explore = ExploreSection(tasks=args.explore, temperature=1.0, max_new_tokens=args.max_new_tokens)
    print(
        f"{args.model} in {policy.dtype}, LoRA r {args.rank}, lr {args.lr}, {args.epochs} epochs, "
        f"batch {args.batch_tokens} tokens; {args.test} test and {args.explore} exploration tasks per env; "
        f"{torch.get_num_threads()} threads\n"
    )
    print(
        "| env | N demos | train tokens | train s | tok/s | test success | explore success (T 1.0) "
        "| explore failures stuck | rollouts s |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    init = policy.new_adapter("init", spec, seed=0)
    trained = {}
    draw = max(args.demos) * (2 if args.held_out else 1)
    drawn = {
        env: [expert_trajectory(env, i) for i in exploration_tasks(env, draw, derived_seed("experts", env))]
        for env in args.envs
    }
    shown = {env: d[: max(args.demos)] for env, d in drawn.items()}  # the draw a client's buffer is seeded with
    measured = {env: d[-max(args.demos) :] for env, d in drawn.items()}  # the same, or fresh ones (--held-out)
    for env in args.envs:
        demos = shown[env]
        tests = [RolloutRequest(env, i, adapter=env, sampling=greedy) for i in evaluation_tasks(env, args.test)]
        explores = exploration_requests(env, env, 1, explore)
        for n in args.demos:
            policy.load(env, init)
            report = train_adapter(policy, env, demos[:n], train, seed=0)
            start = time.perf_counter()
            test = successes(policy, tests, args.max_batch).get(env, 0)
            won, stuck = tally(rollout(policy, explores, max_batch=args.max_batch))
            found = won.get(env, 0)
            print(
                f"| {env} | {n} | {report.tokens} | {report.seconds:.0f} | {report.tokens_per_s:.0f} "
                f"| {rate(test, len(tests))} | {rate(found, len(explores))} "
                f"| {stuck.get(env, 0)}/{len(explores) - found} | {time.perf_counter() - start:.0f} |",
                flush=True,
            )
        trained[env] = policy.get(env)

    if any(rule.startswith("regmean") for rule in args.rules):
        start = time.perf_counter()
        moments.update({env: input_moments(policy, shown[env], args.max_length, args.regmean_alpha) for env in trained})
        print(f"\ninput moments of every env's demonstrations: {time.perf_counter() - start:.0f} s")
        moved = {env: a_moved(init, trained[env]) for env in trained}
        print("‖A_k − A_0‖ / ‖A_0‖ over every layer: " + ", ".join(f"{e} {v:.3f}" for e, v in moved.items()))

    if args.federate:
        print(
            f"\nOne server step over {len(trained)} clients trained on {max(args.demos)} demos each, "
            "test (greedy) and exploration (T 1.0) successes of the global model:\n"
        )
        print(
            "| rule | server lr | "
            + " | ".join(f"{env} test | {env} explore" for env in args.envs)
            + " | test Avg | seconds |"
        )
        print("|---|---|" + "---|---|" * len(args.envs) + "---|---|")
        updates = [Update(env, a.tensors, 1, {}) for env, a in trained.items()]
        for rule in args.rules:
            for lr in args.federate if rule == "mean" else [1.0]:
                start = time.perf_counter()
                install_global(policy, init, updates, rule, lr, moments)
                tests = [
                    RolloutRequest(env, i, adapter="global", sampling=greedy)
                    for env in args.envs
                    for i in evaluation_tasks(env, args.test)
                ]
                explores = [
                    r for env in args.envs for r in exploration_requests(env, env, 1, explore, adapter="global")
                ]
                found = successes(policy, tests, args.max_batch)
                won = successes(policy, explores, args.max_batch)
                cells = [
                    f"{rate(found.get(env, 0), args.test)} | {rate(won.get(env, 0), args.explore)}" for env in args.envs
                ]
                cells.append(rate(sum(found.values()), args.test * len(args.envs)))
                print(
                    f"| {rule} | {lr:g} | " + " | ".join(cells) + f" | {time.perf_counter() - start:.0f} |",
                    flush=True,
                )
        policy.reset_base()

    if args.interference:
        rho = interference(policy, trained, shown, args.max_length)
        print(
            "\nρ_jk = ‖ΔW_j X_k‖ / ‖ΔW_k X_k‖ over every adapted layer: how far client j's update (row) moves "
            "the layer inputs of env k's demonstrations (column), relative to k's own update:\n"
        )
        print("| update of | " + " | ".join(args.envs) + " |")
        print("|---|" + "---|" * len(args.envs))
        for j in trained:
            print(f"| {j} | " + " | ".join(f"{rho[j][k]:.2f}" for k in args.envs) + " |", flush=True)

    if args.transfer:
        print(
            f"\nMean NLL per agent token of each env's {max(args.demos)} "
            + ("held-out" if args.held_out else "training")
            + " demonstrations (columns) "
            "under each model (rows):\n"
        )
        print("| model | " + " | ".join(args.envs) + " |")
        print("|---|" + "---|" * len(args.envs))

        def row(label: str, name: str | None) -> None:
            cells = [f"{mean_loss(policy, name, measured[env], args.max_length):.3f}" for env in args.envs]
            print(f"| {label} | " + " | ".join(cells) + " |", flush=True)

        row("base", None)
        for env in args.envs:
            row(f"{env}'s adapter alone", env)
        updates = [Update(env, a.tensors, 1, {}) for env, a in trained.items()]
        for rule in args.rules:
            install_global(policy, init, updates, rule, 1.0, moments)
            row(f"{rule} of all", "global")
        policy.reset_base()


def interference(policy: Policy, trained: dict, demos: dict, max_length: int) -> dict[str, dict[str, float]]:
    """ρ[j][k] = ‖ΔW_j X_k‖ / ‖ΔW_k X_k‖ summed over every adapted layer, X_k the layer inputs
    of env k's demonstrations on the base model (ΔW X computed through the factors)."""
    moved: dict[str, dict[str, float]] = {}
    for k in demos:
        sums = dict.fromkeys(trained, 0.0)

        def observe(module: str, x: torch.Tensor, sums: dict[str, float] = sums) -> None:
            rows = x.reshape(-1, x.shape[-1]).float()
            for j, adapter in trained.items():
                a, b = adapter.tensors[module + A_SUFFIX], adapter.tensors[module + B_SUFFIX]
                sums[j] += float((adapter.scale * (rows @ a.T) @ b.T).square().sum())

        with policy.watching_inputs(observe):
            mean_loss(policy, None, demos[k], max_length)
        moved[k] = sums
    return {j: {k: (moved[k][j] / moved[k][k]) ** 0.5 for k in demos} for j in trained}


def install_global(policy: Policy, init, updates: list[Update], rule: str, lr: float, moments: dict) -> None:
    """Load the global model `rule` makes of `updates` (started from `init`) as adapter "global",
    its base delta folded in for the weight-space rules (the base put back first)."""
    if rule.startswith("regmean"):
        delta = regmean(init, updates, moments, rule)
        policy.reset_base()
        policy.set_base_delta(delta)
        policy.load("global", fresh_adapter(init, seed=1))
        return
    aggregator = make_aggregator("fedse" if rule == "mean" else rule)
    aggregation = aggregator.aggregate(init, updates, {})
    policy.reset_base()
    if aggregation.base_delta:
        policy.set_base_delta(aggregation.base_delta)
    policy.load("global", server_step(init, aggregation, lr).adapter if rule == "mean" else aggregation.adapter)


REGMEAN = ("regmean", "regmean-core", "regmean-krylov", "regmean-top16", "regmean-top64")
"""RegMean's solution (full), restricted to the updates' row space (core), to that space and its
image under each client's moment (krylov), or with Σ_k G_k known only through each client's top
p eigen-directions plus its diagonal (topP)."""


def input_moments(policy: Policy, demos: list[Trajectory], max_length: int, alpha: float) -> dict[str, torch.Tensor]:
    """Per adapted layer, G = α X X^T / n + (1 − α) diag(X X^T / n) over the layer inputs X of
    `demos` on the base model (RegMean's regularised second moment, Jin et al., ICLR 2023)."""
    sums: dict[str, list] = {}

    def observe(module: str, x: torch.Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()
        entry = sums.setdefault(module, [0.0, 0])
        entry[0] = entry[0] + (rows.T @ rows).double()
        entry[1] += rows.shape[0]

    with policy.watching_inputs(observe):
        mean_loss(policy, None, demos, max_length)
    out = {}
    for module, (gram, n) in sums.items():
        gram = gram / n
        out[module] = alpha * gram + (1 - alpha) * torch.diag(gram.diagonal())
    return out


def regmean(init, updates: list[Update], moments: dict, variant: str) -> dict[str, torch.Tensor]:
    """Module -> ΔW minimising Σ_k ‖(ΔW − ΔW_k) X_k‖² (RegMean on the round's updates, each
    client's inputs weighted equally): Σ_k U_k (G_k V_k)^T (Σ_k G_k)^-1, rank ≤ Σ_k r_k, with
    ΔW_k = U_k V_k^T. Restricted to a row basis Q (core, krylov): ΔW = M Q^T with
    M = (Σ_k U_k V_k^T G_k Q)(Q^T Σ_k G_k Q)^-1."""
    out = {}
    for m in lora_modules(init.tensors):
        grams = [moments[u.client][m] for u in updates]
        pairs = [update_factors(init, u, m) for u in updates]
        pulled = [g @ v for (_, v), g in zip(pairs, grams, strict=True)]  # G_k V_k: the client's own
        if variant in ("regmean-core", "regmean-krylov"):
            stack = [v for _, v in pairs] + (pulled if variant == "regmean-krylov" else [])
            q, _ = torch.linalg.qr(torch.cat(stack, 1))
            num = sum(u @ (z.T @ q) for (u, _), z in zip(pairs, pulled, strict=True))
            out[m] = (torch.linalg.solve(q.T @ sum(grams) @ q, num.T).T @ q.T).float()
            continue
        total = sum(grams) if variant == "regmean" else sum(top_and_diagonal(g, int(variant[11:])) for g in grams)
        num = sum(u @ z.T for (u, _), z in zip(pairs, pulled, strict=True))
        out[m] = torch.linalg.solve(total, num.T).T.float()
    return out


def top_and_diagonal(gram: torch.Tensor, p: int) -> torch.Tensor:
    """`gram` known through its top `p` eigen-directions, plus the rest's diagonal."""
    values, vectors = torch.linalg.eigh(gram)
    top = (vectors[:, -p:] * values[-p:]) @ vectors[:, -p:].T
    return top + torch.diag((gram - top).diagonal())


def a_moved(init, trained) -> float:
    """‖A_k − A_0‖ / ‖A_0‖ over every adapted layer: how far training moved the row factors
    from the shared seeded init (the updates' row spaces coincide while this is small)."""
    keys = [k for k in init.tensors if k.endswith(A_SUFFIX)]
    moved = sum(float((trained.tensors[k].double() - init.tensors[k].double()).square().sum()) for k in keys)
    return (moved / sum(float(init.tensors[k].double().square().sum()) for k in keys)) ** 0.5


if __name__ == "__main__":
    main()
