"""Integration: the real embedded SmolLM2-135M (converted once into $FEDSE_CACHE)."""

import pytest

from fedse.agent.policy import Policy
from fedse.agent.rollout import RolloutRequest, Sampling, naive_rollout, rollout

pytestmark = pytest.mark.slow


def test_embedded_model_answers_a_plain_question(smollm2):
    tok, model = smollm2.tokenizer, smollm2.model
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tok(prompt, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1] :])


def test_engine_equals_reference_on_the_embedded_model(smollm2):
    policy = Policy(smollm2)
    sampling = Sampling(temperature=0.0, max_new_tokens=24)
    requests = [
        RolloutRequest("maze", 3, sampling=sampling, max_turns=2),
        RolloutRequest("wordle", 0, sampling=sampling, max_turns=2),
    ]
    engine, reference = rollout(policy, requests), naive_rollout(policy, requests)
    for a, b in zip(engine, reference, strict=True):
        assert a.outputs == b.outputs and a.turns == 2
        assert max(abs(x - y) for la, lb in zip(a.logprobs, b.logprobs) for x, y in zip(la, lb)) < 1e-3
