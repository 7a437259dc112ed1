import pytest

from fedse.agent.model import load_base
from fedse.agent.policy import Policy


@pytest.fixture
def tiny_policy() -> Policy:
    """A fresh policy on the tiny random model (see fedse.agent.tiny)."""
    return Policy(load_base("tiny-random"))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (converted once into $FEDSE_CACHE)."""
    return load_base("smollm2-135m", dtype="float32")  # the exactness contract is stated for fp32
