import os
import sys
from pathlib import Path

import pytest
import torch

import fedse.envs
from fedse.agent.model import load_base
from fedse.agent.policy import Policy

# The example environment package (examples/ticket-routing), importable as a user's would be
# once installed: tests name its class in run configurations and register its entry point.
EXAMPLE_SRC = Path(__file__).resolve().parents[1] / "examples" / "ticket-routing" / "src"
sys.path.insert(0, str(EXAMPLE_SRC))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest worker per core: one torch thread each, in this process and in
    # every fedse process a test starts, or their spinning OpenMP threads slow everything down
    os.environ.setdefault("FEDSE_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def own_envs_forgotten():
    """Environments a test registers (a run configuration's `[env.*]`, a node's own) are this
    process's state: each test starts from the ones the session started with."""
    before = dict(fedse.envs._REGISTERED)
    yield
    fedse.envs._REGISTERED.clear()
    fedse.envs._REGISTERED.update(before)


@pytest.fixture
def tiny_policy() -> Policy:
    """A fresh policy on the tiny random model (see fedse.agent.tiny)."""
    return Policy(load_base("tiny-random"))


@pytest.fixture(scope="session")
def smollm2():
    """The real embedded model (converted once into $FEDSE_CACHE)."""
    return load_base("smollm2-135m", dtype="float32")  # the exactness contract is stated for fp32
