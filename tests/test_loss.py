import pytest
import torch

from fedse.evolve import loss as loss_module
from fedse.evolve.loss import cross_entropy


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 31, 32, 33, 70])
def test_blocked_cross_entropy_equals_the_plain_fp32_loss_and_gradient(dtype, rows):
    gen = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, 1000, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 1000, (rows,), generator=gen)
    plain_in, blocked_in = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    plain = torch.nn.functional.cross_entropy(plain_in.float(), targets)
    blocked = cross_entropy(blocked_in, targets)
    (3.0 * plain).backward()
    (3.0 * blocked).backward()
    assert float(blocked.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    assert blocked_in.grad.dtype == dtype
    assert torch.allclose(blocked_in.grad.float(), plain_in.grad.float(), rtol=1e-5, atol=1e-7)


def test_blocks_are_smaller_than_the_batch_and_their_seams_do_not_show(monkeypatch):
    monkeypatch.setattr(loss_module, "ROWS", 3)
    logits = torch.randn(10, 50, dtype=torch.float64).requires_grad_()
    targets = torch.arange(10)
    assert torch.autograd.gradcheck(lambda x: cross_entropy(x, targets), (logits,))


def test_no_rows_is_a_zero_loss_not_nan():
    logits = torch.zeros(0, 7, requires_grad=True)
    value = cross_entropy(logits, torch.zeros(0, dtype=torch.long))
    value.backward()
    assert float(value) == 0.0
