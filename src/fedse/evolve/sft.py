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
from pydantic import Field

from fedse.agent.chat import ChatLayout
from fedse.agent.policy import Policy
from fedse.agent.trajectory import Trajectory
from fedse.evolve.loss import cross_entropy
from fedse.process import keeping_freed_memory
from fedse.progress import progress_bar
from fedse.sections import Section

log = logging.getLogger(__name__)


class TrainSection(Section):
    """The `[train]` section of a run configuration: local SFT hyper-parameters (defaults: the paper's)."""

    epochs: int = Field(2, ge=0)
    """Passes over the client's buffer each round."""
    lr: float = Field(5e-5, gt=0)
    """AdamW's learning rate for the adapter."""
    batch_tokens: int = Field(2048, ge=64)
    """Padded tokens per optimizer step."""
    max_length: int = Field(2048, ge=64)
    """Tokens of one training example; a longer episode loses its oldest turns (counted, warned)."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW's weight decay."""
    grad_clip: float = Field(1.0, ge=0)
    """Max gradient norm (0: no clipping)."""
    fedprox_mu: float = Field(0.0, ge=0)
    """FedProx's proximal weight μ: + μ/2 ‖θ − θ_global‖² in the local loss (0: plain SFT)."""


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


def encode_example(
    layout: ChatLayout, t: Trajectory, max_length: int
) -> tuple[tuple[list[int], list[int]] | None, bool]:
    """(ids, loss mask) of one trajectory, its history cut from the left to fit `max_length`
    (None: nothing to learn from within it), and whether it was cut to fit."""
    messages = t.messages[:-1] if t.messages and t.messages[-1]["role"] == "user" else t.messages
    if len(messages) < 2 or not any(m["role"] == "assistant" for m in messages[2:]):
        return None, False
    ids, mask = layout.encode_episode(messages)
    cut = len(ids) > max_length
    if cut:
        keep_head = len(layout.encode(layout.prefix_text(messages[0]["content"], messages[1]["content"])))
        if keep_head >= max_length:
            return None, False  # left out, not cut
        tail = max_length - keep_head
        ids, mask = ids[:keep_head] + ids[-tail:], mask[:keep_head] + mask[-tail:]
    return ((ids, mask) if any(mask) else None), cut


def encode_examples(
    layout: ChatLayout, trajectories: list[Trajectory], max_length: int
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(ids, loss mask) per trajectory, left-truncating the history of long ones; and how many were.

    A trajectory with nothing to learn from within `max_length` (no agent turn, or an instruction
    that alone fills `max_length`) is left out with a warning: an input that no round could train
    on must not stop every round of the run."""
    examples, truncated, skipped = [], 0, 0
    for t in trajectories:
        example, cut = encode_example(layout, t, max_length)
        truncated += cut
        if example is None:
            skipped += 1
        else:
            examples.append(example)
    if truncated:
        log.warning(
            "%d of %d episodes were longer than %d tokens; their oldest turns were cut",
            truncated,
            len(trajectories),
            max_length,
        )
    if skipped:
        log.warning(
            "%d of %d episodes were left out of training: no agent turn fits in train.max_length = %d tokens "
            "(raise it, or check the seed file)",
            skipped,
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


def _padded_batch(examples: list[tuple[list[int], list[int]]], batch: list[int], pad: int, device) -> tuple:
    """(ids, attention, loss mask) tensors (B, width) for the examples of one batch."""
    width = max(len(examples[i][0]) for i in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    attention = torch.zeros(len(batch), width, dtype=torch.long)
    target_mask = torch.zeros(len(batch), width, dtype=torch.bool)
    for j, i in enumerate(batch):
        seq, mask = examples[i]
        ids[j, : len(seq)] = torch.tensor(seq)
        attention[j, : len(seq)] = 1
        target_mask[j, : len(seq)] = torch.tensor(mask, dtype=torch.bool)
    return ids.to(device), attention.to(device), target_mask.to(device)


def batch_loss(policy: Policy, name: str | None, ids, attention, target_mask) -> tuple[torch.Tensor, int]:
    """Mean NLL of the agent tokens of a padded batch, and how many there are.

    Position t predicts token t+1, so the logits are needed where the *next* token is an
    agent token, and only there."""
    predict = torch.zeros_like(target_mask)
    predict[:, :-1] = target_mask[:, 1:]
    logits = policy.logits([name] * ids.shape[0], ids, keep=predict, attention_mask=attention)
    targets = ids[:, 1:][target_mask[:, 1:]]
    return cross_entropy(logits, targets), int(predict.sum())


def _step(
    policy: Policy, name: str, tensors: tuple, params: list, optimizer, config: TrainSection, anchor
) -> tuple[float, int]:
    """One optimizer step on one padded batch (plus FedProx's pull towards `anchor`, if any);
    returns the batch's mean agent-token loss and its number of agent tokens."""
    loss, n = batch_loss(policy, name, *tensors)
    total = loss
    if anchor is not None:
        prox = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True))
        total = loss + config.fedprox_mu / 2 * prox
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if config.grad_clip:
        torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
    optimizer.step()
    return float(loss.detach()), n


def train_adapter(
    policy: Policy,
    name: str,
    trajectories: list[Trajectory],
    config: TrainSection,
    *,
    seed: int = 0,
    factors: str = "AB",
    progress: str | None = None,
) -> TrainReport:
    """Fine-tune adapter `name` of `policy` in place on `trajectories`; returns what happened.

    `factors`: which LoRA factors train ('AB', or 'B' for FFA-LoRA's frozen A). `seed` fixes
    the batch order. `progress` labels a progress bar (steps, loss, tokens/s); None shows none.
    """
    report = TrainReport(examples=len(trajectories))
    if not trajectories:
        return report
    start = time.perf_counter()
    examples, report.truncated = encode_examples(ChatLayout(policy.tokenizer), trajectories, config.max_length)
    rng = random.Random(seed)
    epochs_batches = [
        length_batches([len(e[0]) for e in examples], config.batch_tokens, rng) for _ in range(config.epochs)
    ]
    total_steps = sum(len(b) for b in epochs_batches)
    if not total_steps:  # epochs = 0: nothing to train (the adapter stays as received)
        report.seconds = time.perf_counter() - start
        return report
    pad = policy.tokenizer.pad_token_id or 0
    bar = progress_bar(total_steps, progress, unit="step")
    with keeping_freed_memory(), policy.training(name, factors) as params:
        anchor = [p.detach().clone() for p in params] if config.fedprox_mu > 0 else None
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
        )
        torch.manual_seed(seed)
        try:
            for batches in epochs_batches:
                loss_sum, loss_count = 0.0, 0
                for batch in batches:
                    tensors = _padded_batch(examples, batch, pad, policy.device)
                    loss, n = _step(policy, name, tensors, params, optimizer, config, anchor)
                    schedule.step()
                    loss_sum += loss * n
                    loss_count += n
                    report.steps += 1
                    report.tokens += int(tensors[1].sum())
                    report.loss_tokens += n
                    bar.update(1)
                    rate = report.tokens / (time.perf_counter() - start)
                    bar.set_postfix(loss=f"{loss_sum / max(loss_count, 1):.3f}", tok_s=f"{rate:.0f}")
                report.epoch_losses.append(loss_sum / max(loss_count, 1))
        finally:
            bar.close()
    report.seconds = time.perf_counter() - start
    return report


@torch.no_grad()
def episode_nll(
    policy: Policy, name: str | None, trajectories: list[Trajectory], max_length: int = 2048, batch: int = 8
) -> list[tuple[float, int]]:
    """(summed NLL, count) of the agent tokens of each trajectory under adapter `name` (None: the
    base model), `batch` episodes a forward pass; an episode with nothing to score gets (0, 0)."""
    layout = ChatLayout(policy.tokenizer)
    pad = policy.tokenizer.pad_token_id or 0
    encoded = [encode_example(layout, t, max_length)[0] for t in trajectories]
    scorable = [i for i, e in enumerate(encoded) if e is not None]
    out = [(0.0, 0)] * len(trajectories)
    for start in range(0, len(scorable), batch):
        rows = scorable[start : start + batch]
        examples = [encoded[i] for i in rows]
        ids, attention, target_mask = _padded_batch(examples, list(range(len(rows))), pad, policy.device)
        predict = torch.zeros_like(target_mask)
        predict[:, :-1] = target_mask[:, 1:]
        logits = policy.logits([name] * len(rows), ids, keep=predict, attention_mask=attention)
        nll = torch.nn.functional.cross_entropy(logits.float(), ids[:, 1:][target_mask[:, 1:]], reduction="none")
        row = predict.nonzero()[:, 0]
        sums = torch.zeros(len(rows), dtype=torch.float64).index_add_(0, row, nll.double())
        counts = torch.bincount(row, minlength=len(rows))
        for j, i in enumerate(rows):
            out[i] = (float(sums[j]), int(counts[j]))
    return out


def mean_loss(policy: Policy, name: str | None, trajectories: list[Trajectory], max_length: int = 2048) -> float:
    """Mean NLL per agent token of `trajectories` under adapter `name` (None: the base model)."""
    scored = episode_nll(policy, name, trajectories, max_length, batch=1)
    return sum(s for s, _ in scored) / max(sum(n for _, n in scored), 1)


def input_moments(
    policy: Policy, name: str | None, trajectories: list[Trajectory], max_length: int = 2048
) -> dict[str, torch.Tensor]:
    """Per adapted layer (its adapter-key prefix), the second moment G = X X^T / n of the layer's
    inputs X (in x n) over every token of `trajectories`, encoded as training encodes them, under
    adapter `name` (None: the base model). What an input-aware aggregator summarizes on the
    client (`fedse.fl.aggregators.Aggregator.summarize_inputs`); float32."""
    layout = ChatLayout(policy.tokenizer)
    examples, _ = encode_examples(layout, trajectories, max_length)
    pad = policy.tokenizer.pad_token_id or 0
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    last: list = [None, None]  # layers fed the same tensor (q, k, v; gate, up) share one product

    def observe(module: str, x: torch.Tensor) -> None:
        if x is not last[0]:
            rows = x.reshape(-1, x.shape[-1]).float()
            last[:] = [x, (rows.T @ rows, rows.shape[0])]
        product, n = last[1]
        sums[module] = sums[module] + product if module in sums else product.clone()
        counts[module] = counts.get(module, 0) + n

    with torch.no_grad(), policy.watching_inputs(observe):
        for i in range(len(examples)):
            batch_loss(policy, name, *_padded_batch(examples, [i], pad, policy.device))
    return {module: total / counts[module] for module, total in sums.items()}
