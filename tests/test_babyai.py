"""BabyAI: AgentGym's text layer over minigrid, its reward/done rule, task indexing and expert."""

import pytest
from minigrid.core.world_object import Ball, Key
from minigrid.envs import EmptyEnv

from fedse.envs import make_env, replay
from fedse.envs.babyai import COMPLETED, LEVELS, level_and_seed, make_level
from fedse.envs.babyai_text import find_path, read_view

ACTIONS_LINE = "\nAvailable actions: ["


def test_task_id_selects_level_and_seed_as_agentgym():
    assert len(LEVELS) == 40
    assert level_and_seed(1804) == ("GoToLocalS8N7", 45)  # level 5, first AgentEval seed
    assert level_and_seed(0) == ("GoToRedBallGrey", 0)
    assert level_and_seed(3 + 40 * 52) == ("GoToObjS6", 52)


def test_goto_obj_s6_v0_has_minigrid_2_3_1_room_size_4():
    assert make_level("GoToObjS6").room_size == 4
    assert make_env("babyai").splits["test"][:2] == (1804, 1840)


def test_reset_text_for_a_known_level_and_seed():
    env = make_env("babyai")
    assert env.reset(1804) == (
        "Your goal: go to a red box\n"
        "In front of you in this room, you can see several objects: "
        "There is a purple key 1 right in front of you 2 steps away.  "
        "There is a red box 1 1 steps in front of you and 1 steps to your right.  "
        "There is a red ball 1 0 steps in front of you and 2 steps to your left.  "
        "There is a yellow key 1 2 steps in front of you and 1 steps to your right.  "
        "There is a purple box 1 right in front of you 4 steps away.  "
        "The room has walls around you. You are facing a box 4 steps away. You are not carrying anything.\n"
        'Available actions: ["turn left", "turn right", "move forward", "pickup purple key 1", "pickup red box 1", '
        '"pickup red ball 1", "pickup yellow key 1", "pickup purple box 1", "go to purple key 1", "go to red box 1", '
        '"go to red ball 1", "go to yellow key 1", "go to purple box 1", "check available actions"]'
    )
    result = env.step("Thought: look around.\nAction: turn left")
    assert result.observation.startswith(
        "In front of you in this room, you can see several objects: "
        "There is a red ball 1 right in front of you 2 steps away.  "
        "There is a purple key 1 0 steps in front of you and 2 steps to your right.  "
        "There is a red ball 2 2 steps in front of you and 1 steps to your left.  "
        "The room has walls around you. You are facing a wall 3 steps away. You are not carrying anything.\n"
    )
    assert (result.reward, result.done, result.success, result.action) == (0.0, False, False, "turn left")


def test_the_same_task_id_gives_the_same_episode_whatever_ran_before():
    env = make_env("babyai")
    first = env.reset(35)  # SynthLoc: a reused minigrid env would sample another mission here
    for other in (75, 115, 155):
        env.reset(other)
    assert env.reset(35) == first


def _scene(*objects, carrying=None):
    """An 8x8 empty room, agent at (1, 1) facing right (+x); +y is to its right."""
    world = EmptyEnv(size=8)
    world.reset(seed=0)
    for obj, (x, y) in objects:
        world.grid.set(x, y, obj)
    world.carrying = carrying
    return world, read_view(world, world.gen_obs()["image"])


def test_objects_are_listed_by_distance_with_their_actions_in_agentgym_order():
    _, view = _scene((Key("grey"), (2, 3)), (Ball("red"), (3, 1)))
    assert view.description == (
        "In front of you in this room, you can see several objects: "
        "There is a red ball 1 right in front of you 2 steps away.  "
        "There is a grey key 1 1 steps in front of you and 2 steps to your right.  "
        "The room has walls around you. You are facing a wall 6 steps away. You are not carrying anything."
    )
    # paths: forward then pick up; the key is faced from (2, 2) after forward, right, forward
    assert view.actions == {
        "turn left": [0],
        "turn right": [1],
        "move forward": [2],
        "pickup red ball 1": [2, 3],
        "pickup grey key 1": [2, 1, 2, 3],
        "go to red ball 1": [2],
        "go to grey key 1": [2, 1, 2],
        "check available actions": [],
    }
    assert view.errors == {"drop": "You cannot drop the object, as you are not carrying anything."}


def test_carrying_replaces_pickup_with_drop_unless_something_is_in_front():
    _, view = _scene((Ball("red"), (3, 1)), carrying=Key("blue"))
    assert view.description.endswith("You are carrying a blue key.")
    assert "drop" in view.actions and not any(a.startswith("pickup") for a in view.actions)
    _, blocked = _scene((Ball("red"), (2, 1)), carrying=Key("blue"))
    assert blocked.errors["drop"] == "You cannot drop the object, as there is already an object in front of you."


def test_nothing_in_sight_and_barrier_messages():
    _, view = _scene()
    assert view.description == (
        "In front of you in this room, you can see several objects: The room has walls around you. "
        "You are facing a wall 6 steps away. You are not carrying anything."
    )
    env = make_env("babyai")
    env.reset(20)
    assert env.view.errors["move forward"] == "There is a barrier in front of you, you can't move forward."
    assert "move forward" not in env.view.actions


def test_bfs_overwrites_parents_like_upstream():
    # An open 3x3 window: facing (2, 0) from (0, 0) heading +x; upstream's BFS finds this path.
    assert find_path((0, 0), 0, (2, 0), set(), range(-1, 4), range(-1, 4), onto=False) == [2]
    assert find_path((0, 0), 0, (0, 2), set(), range(-1, 4), range(-1, 4), onto=True) == [1, 2, 2]
    assert find_path((0, 0), 0, (2, 0), {(1, 0)}, range(0, 1), range(0, 1), onto=False) is None


@pytest.mark.parametrize(
    ("task_id", "action", "message"),
    [
        (9, "toggle and go through grey locked door 1",
         "You cannot toggle and go through grey locked door 1, as you are not carrying a key."),
        (114, "toggle and go through grey closed door 1",
         "You cannot toggle and go through grey closed door {'grey closed door': 1}, as there is no path leading to it."),
        (114, "go through grey closed door 1",
         "You cannot go through grey closed door 1, as it is closed. You should toggle it first."),
        (194, "pickup yellow ball 2", "You cannot pickup yellow ball 2, as there is no path leading to it."),
        (194, "go to blue closed door 1", "You cannot go to blue closed door 1, as there is no path leading to it."),
        (142, "drop", "You cannot drop the object, as there is already an object in front of you."),
        (9, "drop", "You cannot drop the object, as you are not carrying anything."),
        (9, "fly away", "The action is not recognized. Please check valid actions."),
        (9, "", "No change in state."),
    ],
)  # fmt: skip
def test_invalid_actions_get_upstreams_message_and_change_nothing(task_id, action, message):
    env = make_env("babyai")
    env.reset(task_id)
    before = env.view
    result = env.step(f"Thought: try.\nAction: {action}")
    assert result.observation == message + ACTIONS_LINE + ", ".join(f'"{a}"' for a in before.actions) + "]"
    assert env.view == before and (result.reward, result.done) == (0.0, False)


def test_locked_door_needs_a_key_of_its_colour():
    env = make_env("babyai")
    env.reset(9)
    env.world.carrying = Key("red")
    view = read_view(env.world, env.world.gen_obs()["image"])
    assert view.errors["toggle and go through grey locked door 1"] == (
        "You cannot toggle and go through grey locked door 1, "
        "as the color of the key you are carrying does not match the color of door."
    )
    env.world.carrying = Key("grey")
    view = read_view(env.world, env.world.gen_obs()["image"])
    assert view.actions["toggle and go through grey locked door 1"][-2:] == [5, 2]


def test_check_lists_the_actions_and_facing_the_target_again_changes_nothing():
    env = make_env("babyai")
    env.reset(9)
    listed = ", ".join(env.view.actions)
    assert env.step("Action: check available actions").observation.startswith(
        f"You can take the following actions: {listed}\n"
    )
    env.step("Action: go to grey locked door 1")  # the mission: done
    env.reset(1804)
    env.step("Action: go to purple key 1")
    assert env.view.actions["go to purple key 1"] == []
    assert env.step("Action: go to purple key 1").observation.startswith("No change in state.\n")


def test_two_actions_in_one_reply_are_refused_by_the_client():
    env = make_env("babyai")
    env.reset(9)
    result = env.step("Action: turn left\nAction: turn right")
    assert result.observation == "Error: Only one 'Action' is allowed per response. Please adjust your response."
    assert (result.reward, result.done) == (0.0, False)


def test_success_ends_the_episode_with_the_discounted_reward():
    env = make_env("babyai")
    env.reset(9)  # GoToDoor: "go to a grey door"
    result = env.step("Thought: the grey door is the goal.\nAction: go to grey locked door 1")
    steps, max_steps = env.world.step_count, env.world.max_steps
    assert result.done and result.success
    assert result.reward == pytest.approx(1 - 0.9 * steps / max_steps) and 0.5 < result.reward < 1
    assert COMPLETED + ACTIONS_LINE in result.observation


def test_a_late_success_does_not_end_the_episode_and_the_score_accumulates():
    env = make_env("babyai")
    env.reset(9)
    env.world.step_count = int(env.world.max_steps * 0.6)  # past 5/9 of the budget: reward <= 0.5
    late = env.step("Action: go to grey locked door 1")
    reward = 1 - 0.9 * env.world.step_count / env.world.max_steps
    assert late.reward == pytest.approx(reward) and reward <= 0.5
    assert not late.done and not late.success
    assert COMPLETED in late.observation  # upstream appends it before demoting done
    again = env.step("Action: fly away")  # an invalid step adds the last reward to the score again
    assert again.reward == pytest.approx(2 * reward) and not again.done


def test_minigrid_sampling_messages_do_not_reach_stdout(capsys):
    task_ids = (6, 46, 86, 126)  # GoToImpUnlock rejects layouts while sampling these seeds
    for task_id in task_ids:  # positive control: minigrid alone prints them
        level, seed = level_and_seed(task_id)
        make_level(level).reset(seed=seed)
    assert "Sampling rejected" in capsys.readouterr().out
    env = make_env("babyai")
    for task_id in task_ids:
        env.reset(task_id)
    assert "Sampling rejected" not in capsys.readouterr().out


def test_expert_solves_every_test_id_within_20_turns():
    env = make_env("babyai")
    for task_id in env.splits["test"]:
        outputs = env.expert(task_id)
        success, turns = replay(env, task_id, outputs)
        assert success and turns == len(outputs) <= env.max_turns, task_id


def test_expert_solves_a_sample_of_train_ids():
    env = make_env("babyai")
    for task_id in env.splits["train"][::27]:
        success, _ = replay(env, task_id, env.expert(task_id))
        assert success, task_id


def test_the_spelled_out_cell_encoding_is_minigrids():
    from minigrid.core.constants import IDX_TO_COLOR, IDX_TO_OBJECT

    from fedse.envs import babyai_text

    assert babyai_text.IDX_TO_OBJECT == IDX_TO_OBJECT and babyai_text.IDX_TO_COLOR == IDX_TO_COLOR
