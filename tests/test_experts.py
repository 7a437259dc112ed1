"""The expert solvers: they seed the self-evolution buffers, so they must always succeed."""

import pytest

from fedse.envs import make_env, replay

# Goals whose expert plan needs more turns than TextCraft's 20 (every craft makes one batch;
# the anvil alone needs 31 iron ingots, each crafted from 9 nuggets). Ids in the AgentEval
# test split or the AgentTraj train split, with the turns the expert uses.
TEXTCRAFT_OVER_LIMIT = {420: 37, 422: 23, 425: 23, 429: 23, 495: 48, 496: 23, 518: 23, 533: 24, 534: 27, 537: 24}


@pytest.mark.parametrize("name", ["maze", "wordle", "textcraft"])
@pytest.mark.parametrize("split", ["test", "train"])
def test_expert_solves_every_split_id_without_a_turn_limit(name, split):
    env = make_env(name)
    for task_id in env.splits[split]:
        outputs = env.expert(task_id)
        success, turns = replay(env, task_id, outputs)
        assert success and turns == len(outputs), (name, task_id)


@pytest.mark.parametrize("name", ["maze", "wordle", "textcraft"])
def test_expert_fits_the_turn_limit_except_the_listed_deep_goals(name):
    env = make_env(name)
    over = {}
    for task_id in sorted(set(env.splits["test"]) | set(env.splits["train"])):
        turns = len(env.expert(task_id))
        if turns > env.max_turns:
            over[task_id] = turns
    assert over == (TEXTCRAFT_OVER_LIMIT if name == "textcraft" else {})


def test_expert_outputs_are_thought_then_action():
    for name in ["maze", "wordle", "textcraft", "babyai", "webshop"]:
        for output in make_env(name).expert(3):
            thought, action = output.split("\n")
            assert thought.startswith("Thought: ") and len(thought) > len("Thought: ") + 10
            assert action.startswith("Action: ")


@pytest.mark.parametrize("name", ["wordle", "babyai", "webshop"])
def test_expert_does_not_disturb_a_running_episode(name):
    env, untouched = make_env(name), make_env(name)
    assert env.reset(5) == untouched.reset(5)
    first = env.expert(5)[0]
    env.expert(9)
    assert env.task_id == 5 and env.turns == 0
    assert env.step(first) == untouched.step(first)
