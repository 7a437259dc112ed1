"""Local LoRA SFT on a client's experience buffer (Fed-SE §3.1, App. B.2).

The rule: start from the received global adapter; minimise the negative log-likelihood of the
agent's turns (Thought + Action and the end-of-turn token; the mask from the conversation
layout) over the whole buffer for E epochs (paper: 2); AdamW with a cosine schedule that
restarts every round, no warmup (paper preset: lr 5e-5). The loss is the mean over all agent
tokens of a batch. Optional FedProx (Li et al., MLSys 2020) adds μ/2 ‖θ − θ_global‖².

Episodes longer than `max_length` keep their instruction prefix and lose the oldest turns
(truncated from the left of the history); each one is counted and warned about, never dropped.
Batches group episodes of similar length under a token budget, so little CPU time goes to
padding; the logits are computed only where the loss is.
"""

from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field

import torch

from fedse.agent.chat import ChatLayout
from fedse.agent.policy import Policy
from fedse.agent.trajectory import Trajectory

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 2
    lr: float = 5e-5
    batch_tokens: int = 2048
    """Padded tokens per optimizer step."""
    max_length: int = 2048
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    fedprox_mu: float = 0.0
    seed: int = 0
    train_factors: str = "AB"
    """'AB', or 'B' to keep A frozen (FFA-LoRA)."""


@dataclass
class TrainReport:
    examples: int = 0
    steps: int = 0
    epoch_losses: list[float] = field(default_factory=list)
    tokens: int = 0
    """Real (non-padding) tokens run forward and backward."""
    loss_tokens: int = 0
    truncated: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.epoch_losses[-1] if self.epoch_losses else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def encode_examples(
    layout: ChatLayout, trajectories: list[Trajectory], max_length: int
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, loss mask) per trajectory, left-truncating the history of long ones; and how many were."""
    examples, truncated = [], 0
    for t in trajectories:
        messages = t.messages[:-1] if t.messages[-1]["role"] == "user" else t.messages
        ids, mask = layout.encode_episode(messages)
        if len(ids) > max_length:
            keep_head = len(layout.encode(layout.prefix_text(messages[0]["content"])))
            if keep_head >= max_length:
                raise ValueError(f"max_length {max_length} cannot even hold the instruction ({keep_head} tokens)")
            tail = max_length - keep_head
            ids, mask = ids[:keep_head] + ids[-tail:], mask[:keep_head] + mask[-tail:]
            truncated += 1
        examples.append((ids, mask))
    if truncated:
        log.warning(
            "%d of %d episodes were longer than %d tokens; their oldest turns were cut",
            truncated,
            len(trajectories),
            max_length,
        )
    return examples, truncated


def length_batches(lengths: list[int], batch_tokens: int, rng: random.Random) -> list[list[int]]:
    """Indices grouped by similar length, each batch's padded size within `batch_tokens`; batch order shuffled."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, current = [], []
    for i in order:
        if current and (len(current) + 1) * lengths[i] > batch_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    rng.shuffle(batches)
    return batches


def _trainable(policy: Policy, name: str, factors: str) -> list[torch.nn.Parameter]:
    wanted = tuple(f"lora_{f}.{name}." for f in factors)
    params = []
    for pname, p in policy.peft.named_parameters():
        p.requires_grad_(any(w in pname + "." for w in wanted))
        if p.requires_grad:
            params.append(p)
    if not params:
        raise ValueError(f"adapter {name!r} has no trainable LoRA factors {factors!r}")
    return params


def train_adapter(
    policy: Policy, name: str, trajectories: list[Trajectory], config: TrainConfig, progress: str | None = None
) -> TrainReport:
    """Fine-tune adapter `name` of `policy` in place on `trajectories`; returns what happened.

    `progress` labels a progress bar (steps, loss, tokens/s); None shows none.
    """
    report = TrainReport(examples=len(trajectories))
    if not trajectories:
        return report
    start = time.perf_counter()
    layout = ChatLayout(policy.tokenizer)
    examples, report.truncated = encode_examples(layout, trajectories, config.max_length)
    rng = random.Random(config.seed)
    epochs_batches = [
        length_batches([len(e[0]) for e in examples], config.batch_tokens, rng) for _ in range(config.epochs)
    ]
    total_steps = sum(len(b) for b in epochs_batches)

    policy.activate(name)
    params = _trainable(policy, name, config.train_factors)
    anchor = [p.detach().clone() for p in params] if config.fedprox_mu > 0 else None
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    model = policy.peft.get_base_model()
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    pad = policy.tokenizer.pad_token_id or 0
    device = policy.device
    torch.manual_seed(config.seed)
    policy.peft.train()
    bar = _progress_bar(total_steps, progress) if progress else None
    try:
        for batches in epochs_batches:
            loss_sum, loss_count = 0.0, 0
            for batch in batches:
                width = max(len(examples[i][0]) for i in batch)
                ids = torch.full((len(batch), width), pad, dtype=torch.long)
                attention = torch.zeros(len(batch), width, dtype=torch.long)
                target_mask = torch.zeros(len(batch), width, dtype=torch.bool)
                for j, i in enumerate(batch):
                    seq, mask = examples[i]
                    ids[j, : len(seq)] = torch.tensor(seq)
                    attention[j, : len(seq)] = 1
                    target_mask[j, : len(seq)] = torch.tensor(mask, dtype=torch.bool)
                ids, attention, target_mask = ids.to(device), attention.to(device), target_mask.to(device)
                hidden = decoder(input_ids=ids, attention_mask=attention).last_hidden_state
                # position t predicts token t+1: loss where the *next* token is an agent token
                predict = target_mask[:, 1:]
                logits = head(hidden[:, :-1][predict]).float()
                targets = ids[:, 1:][predict]
                loss = torch.nn.functional.cross_entropy(logits, targets)
                total = loss
                if anchor is not None:
                    prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
                    total = loss + config.fedprox_mu / 2 * prox
                optimizer.zero_grad(set_to_none=True)
                total.backward()
                if config.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                schedule.step()
                n = int(predict.sum())
                loss_sum += float(loss.detach()) * n
                loss_count += n
                report.steps += 1
                report.tokens += int(attention.sum())
                report.loss_tokens += n
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        loss=f"{loss_sum / max(loss_count, 1):.3f}",
                        tok_s=f"{report.tokens / (time.perf_counter() - start):.0f}",
                    )
            report.epoch_losses.append(loss_sum / max(loss_count, 1))
    finally:
        if bar is not None:
            bar.close()
        policy.peft.eval()
        for p in policy.peft.parameters():
            p.requires_grad_(False)
        policy.rehash(name)
    report.seconds = time.perf_counter() - start
    return report


def _progress_bar(total: int, label: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=label, unit="step", dynamic_ncols=True, leave=False)


@torch.no_grad()
def mean_loss(policy: Policy, name: str | None, trajectories: list[Trajectory], max_length: int = 2048) -> float:
    """Mean NLL per agent token of `trajectories` under adapter `name` (None: the base model)."""
    layout = ChatLayout(policy.tokenizer)
    examples, _ = encode_examples(layout, trajectories, max_length)
    total, count = 0.0, 0
    for ids, mask in examples:
        x = torch.tensor([ids], device=policy.device)
        logits = policy.forward([name], input_ids=x).float()[0, :-1]
        predict = torch.tensor(mask[1:], dtype=torch.bool, device=policy.device)
        total += float(torch.nn.functional.cross_entropy(logits[predict], x[0, 1:][predict], reduction="sum"))
        count += int(predict.sum())
    return total / max(count, 1)
