"""One client's self-evolution: filters, the experience buffer, AgentTraj interop and LoRA SFT."""

import functools
import logging

import pytest
import torch

from fedse.agent.chat import ChatLayout
from fedse.agent.lora import LoraSpec
from fedse.agent.rollout import RolloutRequest, Sampling, rollout
from fedse.agent.trajectory import Trajectory
from fedse.evolve.agenttraj import AgentTrajError, from_agenttraj, to_agenttraj
from fedse.evolve.buffer import BufferSection, ExperienceBuffer
from fedse.evolve.experts import expert_trajectory
from fedse.evolve.filters import KeepAllFilter, RewardThresholdFilter, SuccessFilter, make_filter
from fedse.evolve.sft import TrainSection, encode_examples, mean_loss, train_adapter


def experts(env="maze", ids=(13, 14, 15)):
    return [expert_trajectory(env, i) for i in ids]


def test_expert_trajectories_are_successes_with_the_full_conversation():
    [t] = experts(ids=(18,))
    assert (t.success, t.reward, t.turns, t.finish, t.adapter) == (True, 1.0, 1, "expert", None)
    assert t.messages[-1]["content"] == "Success\n" and t.outputs[0].endswith("Action: move down")


def test_filters():
    (win,) = experts(ids=(18,))
    lose = type(win)(**{**win.__dict__, "success": False, "reward": 0.4})
    assert [SuccessFilter().keep(t) for t in (win, lose)] == [True, False]
    assert [RewardThresholdFilter(0.3).keep(t) for t in (win, lose)] == [True, True]
    assert KeepAllFilter().keep(lose)
    assert make_filter("reward_threshold:0.5") == RewardThresholdFilter(0.5)
    with pytest.raises(ValueError, match="unknown filter 'best'; choose success, none or reward_threshold"):
        make_filter("best")


def test_failed_rollouts_never_enter_the_buffer_under_success(tiny_policy, tmp_path):
    buffer = ExperienceBuffer(tmp_path / "buffer.jsonl")
    buffer.add(experts(), round_=0)
    explored = rollout(
        tiny_policy, [RolloutRequest("maze", i, sampling=Sampling(1.0, 1.0, 8), seed=i, max_turns=2) for i in range(4)]
    )
    assert not any(t.success for t in explored)
    (win,) = experts(ids=(18,))  # a success among the failures must get through
    kept = [t for t in [explored[0], win, *explored[1:]] if SuccessFilter().keep(t)]
    assert kept == [win]
    assert buffer.add(kept, round_=1) == 1 and len(buffer) == 4
    assert [t.task_id for t in buffer.training_set(1)] == [13, 14, 15, 18]


def test_buffer_survives_a_restart_and_truncates_unfinished_rounds(tmp_path):
    path = tmp_path / "buffer.jsonl"
    buffer = ExperienceBuffer(path)
    buffer.add(experts(ids=(13, 14)), 0)
    buffer.add(experts(ids=(15,)), 1)
    buffer.add(experts(ids=(16,)), 2)  # round 2 never completed
    again = ExperienceBuffer(path)
    assert again.counts() == {0: 2, 1: 1, 2: 1}
    again.truncate(last_round=1)
    assert ExperienceBuffer(path).counts() == {0: 2, 1: 1}


def test_buffer_history_cap_and_dedup(tmp_path):
    no_history = ExperienceBuffer(tmp_path / "a.jsonl", BufferSection(history=False))
    no_history.add(experts(ids=(13, 14)), 0)
    no_history.add(experts(ids=(15,)), 1)
    assert [t.task_id for t in no_history.training_set(1)] == [15]
    assert [t.task_id for t in no_history.training_set(1, warmup=True)] == [13, 14]  # nobody explored yet
    capped = ExperienceBuffer(tmp_path / "b.jsonl", BufferSection(cap=2))
    capped.add(experts(ids=(13, 14, 15)), 0)
    assert [t.task_id for t in ExperienceBuffer(tmp_path / "b.jsonl", BufferSection(cap=2)).training_set(0)] == [14, 15]
    dedup = ExperienceBuffer(tmp_path / "c.jsonl", BufferSection(dedup="exact"))
    assert dedup.add(experts(ids=(13, 13, 14)), 0) == 2
    with pytest.raises(ValueError, match="Input should be 'none' or 'exact'"):
        BufferSection(dedup="fuzzy")


def test_trajectory_json_and_agenttraj_round_trips(tmp_path):
    trajectories = experts(env="wordle", ids=(0, 1))
    assert [Trajectory.from_json(t.to_json()) for t in trajectories] == trajectories
    record = to_agenttraj(trajectories[0])
    assert record["item_id"] == "lmrlgym_wordle_0"
    assert [c["from"] for c in record["conversations"][:4]] == ["human", "gpt", "human", "gpt"]
    assert [c["loss"] for c in record["conversations"][:4]] == [None, False, None, True]
    back = from_agenttraj(record)
    assert (back.env, back.task_id, back.outputs, back.success) == ("wordle", 0, trajectories[0].outputs, True)
    with pytest.raises(AgentTrajError, match="item_id 'alfworld_3' is not '<prefix><task id>'"):
        from_agenttraj({"item_id": "alfworld_3", "conversations": []})


def test_local_sft_lowers_the_buffer_loss(tiny_policy):
    tiny_policy.new_adapter("client", LoraSpec(rank=4, alpha=8), seed=0)
    buffer = experts(ids=(13, 16, 18))
    before = mean_loss(tiny_policy, "client", buffer)
    report = train_adapter(tiny_policy, "client", buffer, TrainSection(epochs=3, lr=5e-3, batch_tokens=4096))
    after = mean_loss(tiny_policy, "client", buffer)
    assert after < before - 0.1
    assert report.epoch_losses[-1] < report.epoch_losses[0] and report.steps >= 3 and report.tokens > 0
    assert tiny_policy.trainable_parameters() == 0


@pytest.mark.parametrize("dtype, rel, grad_gap", [("float32", 1e-5, 1e-4), ("bfloat16", 1e-2, 0.05)])
def test_fused_lora_gives_the_loss_and_gradients_of_pefts_forward(dtype, rel, grad_gap):
    """On an fp32 base the fused layer is PEFT's computation reordered (fp32 rounding apart);
    on a bf16 base its matmuls run in bf16 against PEFT's fp32 LoRA path."""
    from fedse.agent.lora import Adapter
    from fedse.agent.model import load_base
    from fedse.agent.policy import Policy
    from fedse.evolve.sft import _padded_batch, batch_loss

    policy = Policy(load_base("tiny-random", dtype=dtype))
    start = policy.new_adapter("client", LoraSpec(rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(1)
    policy.load(
        "client", Adapter(start.spec, {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in start.tensors.items()})
    )
    examples, _ = encode_examples(ChatLayout(policy.tokenizer), experts(ids=(13, 16)), 4096)
    tensors = _padded_batch(examples, [0, 1], policy.tokenizer.pad_token_id or 0, policy.device)

    def loss_and_grad(fused):
        with policy.training("client", fused_lora=fused) as params:
            loss, _ = batch_loss(policy, "client", *tensors)
            loss.backward()
            assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)
            grad = torch.cat([p.grad.flatten() for p in params])
            for p in params:
                p.grad = None
        return float(loss.detach()), grad

    (fast, fast_grad), (reference, reference_grad) = loss_and_grad(True), loss_and_grad(False)
    assert fast == pytest.approx(reference, rel=rel)
    assert float((fast_grad - reference_grad).norm() / reference_grad.norm()) < grad_gap
    assert float(torch.nn.functional.cosine_similarity(fast_grad, reference_grad, dim=0)) > 0.998


@pytest.mark.parametrize(
    "options, fusable_expected",
    [({}, True), ({"lora_dropout": 0.1}, False), ({"use_dora": True}, False), ({"lora_bias": True}, False)],
)
def test_only_plain_lora_layers_take_the_fused_path(options, fusable_expected):
    """Dropout, DoRA and a bias on B are PEFT computations the fused layer does not do."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear

    from fedse.agent.policy import fusable

    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(8, 8)), LoraConfig(r=2, target_modules=["0"], **options))
    layers = [m for m in model.modules() if isinstance(m, LoraLinear)]
    assert len(layers) == 1 and fusable(layers[0], "default") is fusable_expected
    assert not fusable(layers[0], "another")


def test_a_fused_layer_still_honours_pefts_disabled_adapters():
    """Rows run without the adapter while it trains get the base model's logits, as under PEFT."""
    from fedse.agent.lora import Adapter
    from fedse.agent.model import load_base
    from fedse.agent.policy import Policy

    policy = Policy(load_base("tiny-random", dtype="float32"))
    start = policy.new_adapter("client", LoraSpec(rank=4, alpha=8), seed=0)
    gen = torch.Generator().manual_seed(1)
    policy.load(
        "client", Adapter(start.spec, {k: torch.randn(v.shape, generator=gen) for k, v in start.tensors.items()})
    )
    ids = torch.randint(0, 100, (1, 12), generator=gen)
    with torch.no_grad():
        base, adapted = policy.logits([None], ids), policy.logits(["client"], ids)
        with policy.training("client"):
            assert torch.equal(policy.logits([None], ids), base)
            assert torch.allclose(policy.logits(["client"], ids), adapted, atol=1e-5)
    assert not torch.allclose(base, adapted, atol=1e-3)


def test_fused_bf16_lora_trains_like_pefts_fp32_lora_path_over_many_steps():
    """Steps must see the factors the optimizer just changed (autocast's cast cache would not)."""
    from fedse.agent.model import load_base
    from fedse.agent.policy import Policy

    policy = Policy(load_base("tiny-random", dtype="bfloat16"))
    start = policy.new_adapter("client", LoraSpec(rank=4, alpha=8), seed=0)
    buffer = experts(ids=(13, 16, 18))
    config = TrainSection(epochs=3, lr=5e-3, batch_tokens=4096)
    trained = {}
    for fast in (True, False):
        policy.load("client", start)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(policy, "training", functools.partial(Policy.training, policy, fused_lora=fast))
            report = train_adapter(policy, "client", buffer, config)
        trained[fast] = (policy.get("client"), report.epoch_losses)
    (fast, fast_losses), (reference, reference_losses) = trained[True], trained[False]
    assert fast_losses[-1] < fast_losses[0]
    assert fast_losses == pytest.approx(reference_losses, rel=0.02)
    moved = {k: reference.tensors[k] - start.tensors[k] for k in start.tensors}
    gap = sum(float((fast.tensors[k] - reference.tensors[k]).norm() ** 2) for k in moved) ** 0.5
    assert gap < 0.05 * sum(float(m.norm() ** 2) for m in moved.values()) ** 0.5


def test_only_agent_tokens_carry_loss(tiny_policy):
    buffer = experts(ids=(13,))
    layout = ChatLayout(tiny_policy.tokenizer)
    [(ids, mask)] = encode_examples(layout, buffer, 4096)[0]
    agent = sum(len(layout.encode(o)) + 1 for o in buffer[0].outputs)  # each turn + its end token
    assert sum(mask) == agent
    tiny_policy.new_adapter("client", LoraSpec(rank=4, alpha=8), seed=0)
    report = train_adapter(tiny_policy, "client", buffer, TrainSection(epochs=1, max_length=4096))
    assert report.loss_tokens == agent and report.tokens == len(ids)


def test_ffa_training_keeps_a_frozen_and_fedprox_pulls_towards_the_start(tiny_policy):
    start = tiny_policy.new_adapter("client", LoraSpec(rank=4, alpha=8), seed=0)
    buffer = experts(ids=(13, 16))
    train_adapter(tiny_policy, "client", buffer, TrainSection(epochs=1, lr=1e-2), factors="B")
    trained = tiny_policy.get("client")
    assert all(torch.equal(trained.tensors[k], start.tensors[k]) for k in start.tensors if "lora_A" in k)
    assert any(not torch.equal(trained.tensors[k], start.tensors[k]) for k in start.tensors if "lora_B" in k)

    def moved(mu):
        tiny_policy.load("client", start)
        train_adapter(tiny_policy, "client", buffer, TrainSection(epochs=2, lr=1e-2, fedprox_mu=mu))
        now = tiny_policy.get("client")
        return sum(float((now.tensors[k] - start.tensors[k]).norm()) for k in start.tensors)

    assert moved(1000.0) < moved(0.0)


def test_long_episodes_are_truncated_from_the_left_and_counted(tiny_policy, caplog):
    layout = ChatLayout(tiny_policy.tokenizer)
    buffer = experts(ids=(0, 1))
    head = len(layout.encode(layout.prefix_text(buffer[0].messages[0]["content"])))
    with caplog.at_level(logging.WARNING):
        examples, truncated = encode_examples(layout, buffer, head + 50)
    assert truncated == 2 and "2 of 2 episodes were longer" in caplog.text
    full, _ = layout.encode_episode(buffer[0].messages[:-1])
    assert examples[0][0] == full[:head] + full[-50:]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the instruction alone is longer: nothing to learn, left out
        assert encode_examples(layout, buffer, 10) == ([], 0)
    assert "2 of 2 episodes were left out of training" in caplog.text


def test_zero_epochs_trains_nothing_and_keeps_the_adapter(tiny_policy):
    start = tiny_policy.new_adapter("client", LoraSpec(rank=4, alpha=8), seed=0)
    report = train_adapter(tiny_policy, "client", experts(ids=(13,)), TrainSection(epochs=0))
    assert report.steps == 0 and tiny_policy.get("client").hash == start.hash
