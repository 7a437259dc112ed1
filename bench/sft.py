"""Local LoRA SFT throughput: fedse's trainer against the loop a user would otherwise write.

    .venv/bin/python bench/sft.py                          # 8 expert episodes per env, one epoch, auto dtype
    .venv/bin/python bench/sft.py --per-env 4 --dtype float32

Both train a fresh LoRA adapter (r 8, alpha 16, all linear layers) for one epoch on the same
expert episodes with AdamW at the same learning rate:

- `fedse`: `fedse.evolve.sft.train_adapter` (length-grouped batches under `--batch-tokens`,
  logits only where the loss is);
- `plain`: PEFT + transformers as the documentation shows it: one episode per step, labels
  -100 outside the agent's turns, `model(input_ids, labels=...).loss`, `loss.backward()`.

Prints tokens/s of each, their ratio, and each as a share of this machine's matmul roof in
the training dtype, measured in the same run. The FLOP count per token is that of a LoRA
step on a frozen base: 4 x (body parameters) for the forward and the backward through the
activations, plus the output layer's 4 x hidden x vocab at each position it is computed on
(fedse: the agent tokens; plain: every token).
"""

from __future__ import annotations

import argparse
import time

import torch
from peft import get_peft_model

from fedse.agent.chat import ChatLayout
from fedse.agent.lora import LoraSpec
from fedse.agent.model import load_base
from fedse.agent.policy import Policy
from fedse.envs import list_envs, make_env
from fedse.evolve.experts import expert_trajectory
from fedse.evolve.sft import TrainSection, encode_examples, train_adapter
from fedse.process import keeping_freed_memory, set_up_process
from roof import matmul_gflops


def plain_loop(base, examples, lr: float) -> tuple[int, int, float]:
    """One epoch of the documented PEFT loop; returns (tokens, head positions, seconds)."""
    model = get_peft_model(base.model, LoraSpec().peft_config())
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    tokens = 0
    start = time.perf_counter()
    for ids, mask in examples:
        input_ids = torch.tensor([ids])
        labels = torch.tensor([[t if m else -100 for t, m in zip(ids, mask, strict=True)]])
        loss = model(input_ids=input_ids, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        tokens += len(ids)
    return tokens, tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="*", default=list_envs())
    parser.add_argument("--per-env", type=int, default=8, help="expert episodes per environment (train ids)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    parser.add_argument("--batch-tokens", type=int, default=1024)
    parser.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args()
    set_up_process()

    demos = [expert_trajectory(e, i) for e in args.envs for i in make_env(e).splits["train"][: args.per_env]]
    policy = Policy(load_base(dtype=args.dtype))
    dtype = policy.dtype
    config = TrainSection(epochs=1, lr=args.lr, batch_tokens=args.batch_tokens, max_length=4096)
    examples, _ = encode_examples(ChatLayout(policy.tokenizer), demos, config.max_length)
    hidden, vocab = 576, len(policy.tokenizer)
    params = sum(p.numel() for p in policy.base.model.parameters())
    body = params - vocab * hidden  # the embedding is tied to the output layer
    roof = matmul_gflops(dtype=dtype)
    print(
        f"{len(demos)} expert episodes ({args.per_env} per env: {', '.join(args.envs)}), "
        f"{sum(len(ids) for ids, _ in examples)} tokens, {dtype}; matmul roof {roof:.0f} GFLOP/s"
    )

    policy.new_adapter("fedse", LoraSpec(), seed=0)
    report = train_adapter(policy, "fedse", demos, config, seed=0)
    fedse_flop = 4 * body * report.tokens + 4 * hidden * vocab * report.loss_tokens
    fedse_rate = report.tokens / report.seconds

    with keeping_freed_memory():  # the allocator fedse's trainer runs under, so only the loops differ
        tokens, heads, seconds = plain_loop(load_base(dtype=str(dtype).removeprefix("torch.")), examples, args.lr)
    plain_flop = 4 * body * tokens + 4 * hidden * vocab * heads
    plain_rate = tokens / seconds

    for name, rate, flop, secs in (
        ("fedse", fedse_rate, fedse_flop, report.seconds),
        ("plain", plain_rate, plain_flop, seconds),
    ):
        print(f"{name:>6}: {rate:.0f} tok/s in {secs:.1f} s; {flop / secs / 1e9 / roof:.0%} of the matmul roof")
    print(f"fedse/plain: {fedse_rate / plain_rate:.2f}x tokens/s")


if __name__ == "__main__":
    main()
