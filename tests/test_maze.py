"""Maze observations, actions and rewards, character for character (docs/environments.md)."""

from fedse.envs import StepResult, make_env
from fedse.envs.maze import START_CELLS, describe, shortest_path

GOAL_TEXT = "The goal is at position 8, 6. "


def test_task_zero_starts_at_1_1_with_agentgym_text():
    env = make_env("maze")
    assert (
        env.reset(0)
        == GOAL_TEXT + "Your current position is at position 1, 1. There are walls to your left, above you, below you."
    )


def test_wall_sentences_cover_none_one_and_several():
    assert describe((5, 6)).endswith("There is a wall above you.")
    assert describe((6, 6)).endswith("There are walls to your right, to your left.")
    assert describe((1, 1)).endswith("There are walls to your left, above you, below you.")


def test_transcript_of_valid_invalid_and_malformed_actions():
    env = make_env("maze")
    env.reset(0)
    steps = [
        ("Thought: right is open.\nAction: move right", "move right", 2),
        ("Thought: try up.\nAction: move up", "move up", 2),  # wall: stays
        ("Action: Move right", "Move right", 2),  # wrong case: invalid, stays
        ("I would like to go right", "I would like to go right", 2),  # no Action: whole text, invalid
        ("Action: move right\nAction: move left", "move right", 3),  # two actions: the first counts
        ("Action: move right.", "move right.", 3),  # punctuation makes it invalid
    ]
    for output, action, col in steps:
        result = env.step(output)
        assert result.action == action
        assert (result.reward, result.done, result.success) == (0.0, False, False)
        assert f"Your current position is at position 1, {col}. " in result.observation
    assert result.observation == GOAL_TEXT + "Your current position is at position 1, 3. There is a wall above you."


def test_reaching_the_goal_gives_success_and_reward_one():
    env = make_env("maze")
    env.reset(18)  # (7, 6), one step above the goal
    result = env.step("Thought: the goal is below.\nAction: move down")
    assert result == StepResult("Success\n", 1.0, True, True, "move down")


def test_fifty_env_steps_without_the_goal_fail_with_reward_minus_one():
    env = make_env("maze")
    env.reset(0)
    for _ in range(49):
        assert not env.step("Action: move up").done
    result = env.step("Action: move up")
    assert (result.observation, result.reward, result.done, result.success) == ("Failure\n", -1.0, True, False)


def test_shortest_paths_match_agentgym_lengths():
    assert [len(shortest_path(c)) for c in START_CELLS] == [
        12, 11, 10, 11, 12, 12, 11, 10, 11, 12, 9, 8, 7, 6, 5, 4, 3, 2, 1, 4, 5, 6, 7, 8, 9,
    ]  # fmt: skip
