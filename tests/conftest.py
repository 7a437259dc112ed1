import pytest
import torch

from fedse.agent.lora import Adapter, LoraSpec
from fedse.agent.model import load_base
from fedse.agent.policy import Policy


@pytest.fixture
def tiny_policy() -> Policy:
    """A fresh policy on the tiny random model (see fedse.agent.tiny)."""
    return Policy(load_base("tiny-random"))


SMALL = LoraSpec(rank=4, alpha=8)


def random_adapter(policy: Policy, name: str, seed: int, spec: LoraSpec = SMALL) -> Adapter:
    """Attach an adapter whose A and B are both random, so it really changes the model."""
    adapter = policy.new_adapter(name, spec, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    tensors = {k: torch.randn(v.shape, generator=gen) * 0.5 for k, v in adapter.tensors.items()}
    adapter = Adapter(spec, tensors)
    policy.load(name, adapter)
    return adapter


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (converted once into $FEDSE_CACHE)."""
    return load_base("smollm2-135m", dtype="float32")  # the exactness contract is stated for fp32
