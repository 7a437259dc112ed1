"""The batched rollout engine against the one-episode-at-a-time reference, on a tiny random model."""

import pytest

from fedse.agent.rollout import GREEDY, RolloutRequest, RolloutStats, Sampling, naive_rollout, rollout
from helpers import random_adapter

SHORT = Sampling(temperature=0.0, max_new_tokens=10)


def mixed_requests(adapters=(None,), sampling=SHORT, max_turns=3):
    """Episodes of different lengths: three environments, several tasks, several adapters."""
    tasks = [("maze", 0), ("wordle", 3), ("textcraft", 130), ("maze", 7), ("textcraft", 2), ("wordle", 11)]
    return [
        RolloutRequest(env, task, adapter=adapters[i % len(adapters)], sampling=sampling, seed=i, max_turns=max_turns)
        for i, (env, task) in enumerate(tasks)
    ]


def assert_same_episodes(got, want, tol=1e-4):
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert (a.env, a.task_id, a.outputs, a.turns, a.adapter) == (b.env, b.task_id, b.outputs, b.turns, b.adapter)
        assert [m["content"] for m in a.messages] == [m["content"] for m in b.messages]
        assert [len(x) for x in a.logprobs] == [len(x) for x in b.logprobs]
        worst = max(abs(x - y) for la, lb in zip(a.logprobs, b.logprobs) for x, y in zip(la, lb))
        assert worst < tol


def test_greedy_engine_equals_one_episode_at_a_time(tiny_policy):
    requests = mixed_requests()
    assert_same_episodes(rollout(tiny_policy, requests, max_batch=8), naive_rollout(tiny_policy, requests))


def test_refilling_a_small_batch_gives_the_same_episodes(tiny_policy):
    requests = mixed_requests(max_turns=2)
    assert_same_episodes(rollout(tiny_policy, requests, max_batch=2), naive_rollout(tiny_policy, requests))


def test_mixed_adapters_in_one_batch_equal_the_reference(tiny_policy):
    random_adapter(tiny_policy, "first", seed=1)
    random_adapter(tiny_policy, "second", seed=2)
    requests = mixed_requests(adapters=("first", None, "second"))
    assert_same_episodes(rollout(tiny_policy, requests, max_batch=8), naive_rollout(tiny_policy, requests))


def test_two_adapters_in_one_batch_equal_each_run_alone(tiny_policy):
    a = random_adapter(tiny_policy, "first", seed=1)
    b = random_adapter(tiny_policy, "second", seed=2)
    together = rollout(tiny_policy, mixed_requests(adapters=("first", "second")))
    alone_a = rollout(tiny_policy, mixed_requests(adapters=("first",)))
    alone_b = rollout(tiny_policy, mixed_requests(adapters=("second",)))
    for i, t in enumerate(together):
        alone = (alone_a if i % 2 == 0 else alone_b)[i]
        assert t.outputs == alone.outputs
        assert t.adapter == (a.hash if i % 2 == 0 else b.hash)
    assert a.hash != b.hash
    assert any(x.outputs != y.outputs for x, y in zip(alone_a, alone_b))  # the adapters really differ


def test_sampling_is_reproducible_under_a_seed(tiny_policy):
    hot = Sampling(temperature=1.0, max_new_tokens=10)
    first = rollout(tiny_policy, mixed_requests(sampling=hot))
    again = rollout(tiny_policy, mixed_requests(sampling=hot), max_batch=3)
    assert [t.outputs for t in first] == [t.outputs for t in again]
    reseeded = [
        RolloutRequest(r.env, r.task_id, sampling=hot, seed=r.seed + 100, max_turns=3) for r in mixed_requests()
    ]
    assert [t.outputs for t in rollout(tiny_policy, reseeded)] != [t.outputs for t in first]


def test_episodes_end_at_max_turns_or_the_context_limit(tiny_policy):
    stats = RolloutStats()
    [t] = rollout(tiny_policy, [RolloutRequest("maze", 0, sampling=SHORT, max_turns=2)], stats=stats)
    assert (t.turns, t.finish, t.success) == (2, "max_turns", False)
    assert stats.turns == 2 and stats.generated_tokens == sum(len(x) for x in t.logprobs)
    assert stats.processed_tokens >= t.prompt_tokens
    [t] = rollout(tiny_policy, [RolloutRequest("maze", 0, sampling=SHORT)], max_context=400)
    assert t.finish == "context" and 0 < t.turns < 15


def test_trajectory_round_trips_through_json(tiny_policy):
    from fedse.agent.trajectory import Trajectory

    [t] = rollout(tiny_policy, [RolloutRequest("wordle", 0, sampling=SHORT, max_turns=1)])
    assert Trajectory.from_json(t.to_json()) == t
    assert t.messages[0]["content"].startswith("Guess a hidden 5-letter word") and t.adapter is None


def test_sample_token_is_greedy_at_zero_and_keeps_only_the_top_p_nucleus():
    """Log-probabilities are the model's (temperature 1, untruncated), whatever the sampling."""
    import torch

    from fedse.agent.rollout import sample_token

    gen = torch.Generator().manual_seed(0)
    logits = torch.tensor([0.0, 5.0, 1.0])
    token, logprob = sample_token(logits, GREEDY, gen)
    assert token == 1 and logprob == pytest.approx(float(torch.log_softmax(logits, 0)[1]))
    # probabilities 0.14, 0.39, 0.47: a 0.7 nucleus holds tokens 2 and 1, never 0
    logits = torch.tensor([0.0, 1.0, 1.2])
    draws = [sample_token(logits, Sampling(temperature=1.0, top_p=0.7), gen) for _ in range(200)]
    assert {t for t, _ in draws} == {1, 2}
    model_logprobs = torch.log_softmax(logits, 0)
    assert all(lp == pytest.approx(float(model_logprobs[t])) for t, lp in draws)
    unrestricted = {sample_token(logits, Sampling(temperature=1.0), gen)[0] for _ in range(200)}
    assert unrestricted == {0, 1, 2}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_greedy_picks_taken_a_block_of_rows_at_a_time_equal_the_whole_pass(dtype):
    import torch

    from fedse.agent.rollout.block import PICK_ROWS, _Picked

    rows = 2 * PICK_ROWS + 5
    logits = 4 * torch.randn(rows, 1000, generator=torch.Generator().manual_seed(0))
    logits = logits.to(getattr(torch, dtype))
    wanted = [(i, 0) for i in range(rows)]
    picked = _Picked.of(logits, wanted)
    whole = torch.log_softmax(logits.float(), dim=-1)
    assert picked.best == whole.argmax(-1).tolist()
    assert picked.best_logprob == whole.max(-1).values.tolist()


def test_a_single_adapter_rollout_is_merged_and_leaves_the_base_untouched(tiny_policy):
    """One adapter for the whole rollout runs with it folded into the weights; same episodes, base restored exactly."""
    import torch

    random_adapter(tiny_policy, "only", seed=3)
    before = {k: v.clone() for k, v in tiny_policy.base.model.state_dict().items() if "lora" not in k}
    requests = mixed_requests(adapters=("only",))
    # Folding W + BA changes the fp32 summation order (x(W+BA) vs xW + (xB)A): the same actions,
    # log-probabilities within a few 1e-4 on this random model rather than the unmerged 1e-4.
    merged = rollout(tiny_policy, requests, max_batch=4)
    assert_same_episodes(merged, naive_rollout(tiny_policy, requests), tol=5e-4)
    after = {k: v for k, v in tiny_policy.base.model.state_dict().items() if "lora" not in k}
    assert all(torch.equal(before[k], after[k]) for k in before)
    with tiny_policy.merged("only"), pytest.raises(ValueError, match="adapter 'only' is merged"):
        tiny_policy.logits([None], torch.tensor([[1, 2]]))


def test_one_token_blocks_give_the_same_episodes(tiny_policy, monkeypatch):
    """The attention-memory bound narrows blocks (here to one token: no drafts, prompts token by
    token); the episodes must not change."""
    from fedse.agent.rollout import block as rollout_module

    random_adapter(tiny_policy, "first", seed=1)
    random_adapter(tiny_policy, "second", seed=2)
    requests = mixed_requests(adapters=("first", "second"))
    whole = rollout(tiny_policy, requests, max_batch=4)
    monkeypatch.setattr(rollout_module, "SCORES_PER_PASS", 1)
    stats = RolloutStats()
    assert_same_episodes(rollout(tiny_policy, requests, max_batch=4, stats=stats), whole)
    assert stats.drafted_tokens == 0 and stats.forward_passes > stats.processed_tokens / 4


# At temperature 1 the random model's choices are near uniform and no draft would ever be kept.
@pytest.mark.parametrize("sampling", [SHORT, Sampling(temperature=0.1, max_new_tokens=10)])
def test_drafts_change_how_many_passes_not_which_tokens(tiny_policy, sampling):
    """Speculative decoding with prompt-lookup drafts produces the tokens of plain decoding,
    greedy or sampled (the same generator draws), in fewer forward passes."""
    requests = mixed_requests(sampling=sampling, max_turns=4)
    plain_stats, spec_stats = RolloutStats(), RolloutStats()
    plain = rollout(tiny_policy, requests, max_draft=0, stats=plain_stats)
    spec = rollout(tiny_policy, requests, stats=spec_stats)
    assert_same_episodes(spec, plain)
    assert plain_stats.drafted_tokens == 0
    assert spec_stats.accepted_tokens > 0 and spec_stats.forward_passes < plain_stats.forward_passes
