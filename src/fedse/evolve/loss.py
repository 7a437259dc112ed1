"""The SFT loss: mean cross-entropy of the agent tokens, computed a block of rows at a time.

`cross_entropy(logits, targets)` equals `torch.nn.functional.cross_entropy(logits.float(), targets)`
(the mean over rows, in fp32) and its gradient, which comes back in the logits' own dtype as
it would through `.float()`. What differs is memory traffic: the plain call keeps an fp32 copy
of the logits, their log-softmax and, in the backward, a zero-filled fp32 gradient and its log-
softmax backward, each rows x vocabulary (49,152 for SmolLM2: 200 KB a row). Here only one row
block (`ROWS`) exists in fp32 at a time, and the backward writes the gradient straight into the
logits' dtype: several times less time forward and backward on bf16 logits (results/measurements.md).
"""

from __future__ import annotations

import torch

ROWS = 32
"""Rows per block: 32 x 49,152 fp32 is 6 MB, within a core's L2 plus a little."""


class _BlockedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        work = torch.promote_types(logits.dtype, torch.float32)  # fp32, or fp64 for fp64 logits
        lse = torch.empty(logits.shape[0], dtype=work, device=logits.device)
        for start in range(0, logits.shape[0], ROWS):
            lse[start : start + ROWS] = torch.logsumexp(logits[start : start + ROWS].to(work), dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).to(work)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - picked).mean()

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        logits, targets, lse = ctx.saved_tensors
        scale = grad_output / logits.shape[0]
        grad = torch.empty_like(logits)
        for start in range(0, logits.shape[0], ROWS):
            block = slice(start, start + ROWS)
            probs = (logits[block].to(lse.dtype) - lse[block, None]).exp_()  # softmax, from the saved normaliser
            probs[torch.arange(probs.shape[0], device=probs.device), targets[block]] -= 1
            grad[block] = probs.mul_(scale)
        return grad, None


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean negative log-likelihood of `targets` (N,) under `logits` (N, V), computed in fp32
    (fp64 for fp64 logits; 0 for no rows, where the plain mean would be NaN)."""
    if logits.shape[0] == 0:
        return logits.float().sum()
    return _BlockedCrossEntropy.apply(logits, targets)
