"""The protocol every environment shares: registry, task ids, call order, splits, parsing."""

import pytest

from fedse.envs import EnvError, list_envs, make_env
from fedse.envs.base import ONLY_ONE_ACTION, parse_action_lmrl, parse_action_single_line, parse_ranges

EXPECTED_SPLITS = {
    "maze": (25, 10),
    "wordle": (25, 955),
    "textcraft": (100, 374),
    "babyai": (90, 810),
    "webshop": (200, 3930),
}
MAX_TURNS = {"maze": 15, "wordle": 8, "textcraft": 20, "babyai": 20, "webshop": 10}


def test_registry_lists_the_first_three_environments():
    assert list_envs()[:3] == ["maze", "wordle", "textcraft"]


def test_unknown_env_name_names_the_valid_choices():
    with pytest.raises(
        EnvError, match="unknown environment 'mazee'; choose one of: maze, wordle, textcraft, babyai, webshop"
    ):
        make_env("mazee")


@pytest.mark.parametrize("name", list(EXPECTED_SPLITS))
def test_splits_and_max_turns_match_agentgym(name):
    env = make_env(name)
    assert (len(env.splits["test"]), len(env.splits["train"])) == EXPECTED_SPLITS[name]
    assert env.max_turns == MAX_TURNS[name]


def test_textcraft_splits_fall_in_the_documented_depth_bands():
    test = make_env("textcraft").splits["test"]
    assert test == tuple(range(0, 31)) + tuple(range(140, 181)) + tuple(range(420, 445)) + (533, 534, 535)


@pytest.mark.parametrize("name", list(EXPECTED_SPLITS))
def test_step_before_reset_is_an_error(name):
    with pytest.raises(EnvError, match="call reset"):
        make_env(name).step("Action: x")


@pytest.mark.parametrize("name", list(EXPECTED_SPLITS))
def test_step_after_done_is_an_error(name):
    env = make_env(name)
    env.reset(0)
    for output in env.expert(0):
        result = env.step(output)
    assert result.done and result.success
    with pytest.raises(EnvError, match="is finished; call reset"):
        env.step(env.expert(0)[0])


@pytest.mark.parametrize("bad", [-1, 25, "3", 1.0, True])
def test_bad_maze_task_ids_name_the_valid_range(bad):
    with pytest.raises(EnvError, match=r"maze: (unknown task id .*valid ids are 0\.\.24|task id must be an integer)"):
        make_env("maze").reset(bad)


def test_unbounded_envs_reject_negative_ids():
    for name in ("wordle", "textcraft", "babyai"):
        with pytest.raises(EnvError, match="valid ids are any integer >= 0"):
            make_env(name).reset(-3)


def test_reset_starts_a_fresh_episode():
    env = make_env("maze")
    env.reset(0)
    env.step("Action: move right")
    assert env.reset(0).endswith("position 1, 1. There are walls to your left, above you, below you.")
    assert env.turns == 0 and not env.done


def test_lmrl_parsing_takes_the_text_after_the_first_action_marker():
    assert parse_action_lmrl("Thought: go.\nAction: move up") == "move up"
    assert parse_action_lmrl("Action: move up\nAction: move down") == "move up"
    assert parse_action_lmrl("  move up \n") == "move up"
    assert parse_action_lmrl("Action: move up\nThought: more") == "move up\nThought: more"
    # upstream strips five characters for a four-character '</s>'
    assert parse_action_lmrl("Action: move up</s>") == "move u"


def test_single_line_parsing_cleans_and_rejects_two_actions():
    assert parse_action_single_line("Thought: t\nAction:\n  get 1 oak   log!\n") == "get 1 oak log"
    assert parse_action_single_line("Action: craft 1 a using 1 b, 2 c.") == "craft 1 a using 1 b, 2 c"
    assert parse_action_single_line("no marker here") == ""
    assert parse_action_single_line("Action: inventory\nAction: inventory") is None
    for name in ("babyai", "textcraft"):  # both answer two actions with AgentGym's message, nothing done
        env = make_env(name)
        env.reset(130)
        result = env.step("Thought: both.\nAction: inventory\nAction: inventory")
        assert result.observation == "Error: Only one 'Action' is allowed per response. Please adjust your response."
        assert (result.reward, result.done, result.action) == (0.0, False, "")
    assert result.observation == ONLY_ONE_ACTION


def test_parse_ranges_expands_inclusive_ranges():
    assert parse_ranges("0-2,5,7-8") == (0, 1, 2, 5, 7, 8)
