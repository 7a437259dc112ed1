"""TextCraft: craft a Minecraft item from listed recipes (docs/environments.md; ADaPT, AgentGym).

Task id k selects goal `goals[k % 544]`, where `goals` lists every craftable item stably
sorted by recipe depth (AgentGym's indexing; ids 0-124 are depth 1, 125-415 depth 2,
416-532 depth 3, 533-543 depth 4). The first observation lists the crafting commands of
the goal's whole recipe tree plus up to 10 distractor recipes that share an ingredient,
shuffled, then "Goal: craft <item>.". Actions: `get N item` (base items only, unlimited),
`craft N item using N a, N b` (ingredient counts must equal the recipe's; a tag such as
`planks` accepts any item of that kind) and `inventory`. The feedback strings, Python
reprs included, are upstream's. Reward 1 and done when the goal is crafted.

Determinism (documented deviations from upstream, whose output depends on the process):
- recipe files are read in sorted order (see `fedse.envs.crafting`);
- the command and distractor sets are sorted before the seeded sample and shuffle
  (upstream iterates Python sets, whose order depends on PYTHONHASHSEED);
- collecting the recipe tree works on a copy of the recipe lists. Upstream extends the
  shared lists in place, so a server's later episodes see recipes that earlier goals
  appended; we give every episode what the first episode of a fresh server sees.
So the goal at each id and its depth band match AgentGym's recipe set read in sorted
order, while the command order and distractors are ours, stable across runs.
"""

from __future__ import annotations

import math
import random
import re

from fedse.envs.base import ONLY_ONE_ACTION, StepResult, TextEnv, parse_action_single_line
from fedse.envs.crafting import CraftingTree, Recipe, default_tree, item_name, item_text

NUM_GOALS = 544
MAX_DISTRACTORS = 10
# Counts longer than 18 digits do not parse (the action then fails with the usual feedback):
# Python's int() refuses strings over 4,300 digits, and no recipe needs such amounts.
_GET = re.compile(r"get ([0-9]{1,18}) (.*)")
_CRAFT = re.compile(r"craft (.*) using (.*)")
_COUNT = re.compile(r"([0-9]{1,18}) (.*)")

INSTRUCTION = """\
Craft the goal item in Minecraft. The first observation lists crafting commands of the form \
"craft [target] using [ingredients]"; use only those. Where a command names a generic \
ingredient such as "planks", you may use a specific kind, e.g. "oak planks".
Actions:
get N item (take a base item; say only the item, not where it comes from)
craft N target using N ingredient, N ingredient (counts exactly as in the command)
inventory
Always give quantities, e.g. "get 1 lapis lazuli", "craft 1 blue dye using 1 lapis lazuli".
Answer every observation in exactly this format:
Thought: <one short reason>
Action: <one action>"""


class _Failed(Exception):
    pass


def _spec_repr(text: str, count: int, tree: CraftingTree) -> str:
    """Upstream's repr of the requested output, used verbatim in one error message."""
    name = item_name(text)
    tag, item = (name, None) if name in tree.tags else (None, name)
    return f"ItemTagWithCount(item_tag=ItemTag(tag={tag!r}, item_id={item!r}), count={count})"


class TextCraftEnv(TextEnv):
    name = "textcraft"
    instruction = INSTRUCTION
    max_turns = 20
    num_tasks = None

    def __init__(self, tree: CraftingTree | None = None) -> None:
        super().__init__()
        self.tree = tree or default_tree()

    def goal_of(self, task_id: int) -> str:
        return self.tree.goals()[task_id % NUM_GOALS][0]

    # --- episode -------------------------------------------------------------------

    def start_task(self, task_id: int) -> str:
        self.goal = self.goal_of(task_id)
        self.inventory: dict[str, int] = {}
        self.commands = self.command_list(self.goal)
        return f"Crafting commands:\n{chr(10).join(self.commands)}\n\nGoal: craft {item_text(self.goal)}."

    def command_list(self, goal: str) -> list[str]:
        rng = random.Random(42)  # AgentGym seeds the global RNG with 42 at every reset
        tree_recipes = self._tree_recipes(goal)
        uses: dict[str, list[Recipe]] = {}
        for table in (self.tree.item_recipes, self.tree.tag_recipes):
            for recipes in table.values():
                for r in recipes:
                    for i in r.inputs:
                        uses.setdefault(i.name, []).append(r)
        distractors: list[Recipe] = []
        for r in tree_recipes:
            for i in r.inputs:
                if i.name in uses:
                    distractors += rng.sample(uses[i.name], min(len(uses[i.name]), MAX_DISTRACTORS))
        commands = sorted({r.command for r in tree_recipes})
        others = sorted({r.command for r in distractors} - set(commands))
        listed = commands + rng.sample(others, min(len(others), MAX_DISTRACTORS))
        rng.shuffle(listed)
        return listed

    def _tree_recipes(self, goal: str) -> list[Recipe]:
        """Upstream's recipe-tree walk, run on private copies of the recipe lists."""
        lists: dict[str, list[Recipe]] = {}

        def walk(name: str, visited: frozenset[str]) -> list[Recipe]:
            if name in visited or not self.tree.recipes_for(name):
                return []
            recipes = lists.setdefault(name, list(self.tree.recipes_for(name)))
            for r in recipes:  # the list grows while we walk it, as upstream's does
                for i in r.inputs:
                    recipes.extend(walk(i.name, visited | {name}))
            return recipes

        return list(walk(goal, frozenset()))

    rejection = ONLY_ONE_ACTION

    def parse_action(self, model_output: str) -> str | None:
        return parse_action_single_line(model_output)

    def act(self, action: str) -> StepResult:
        try:
            observation, crafted = self._apply(action)
        except _Failed as failure:
            observation, crafted = str(failure), None
        won = crafted == self.goal
        return StepResult(observation, float(won), won, won, action)

    def _apply(self, action: str) -> tuple[str, str | None]:
        if m := _CRAFT.match(action):
            return self._craft(m.group(1), m.group(2))
        if m := _GET.match(action):
            return self._get(int(m.group(1)), m.group(2)), None
        if action.startswith("inventory"):
            if not self.inventory:
                return "Inventory: You are not carrying anything.", None
            return "Inventory: " + "".join(f"[{item_text(k)}] ({v}) " for k, v in self.inventory.items()), None
        raise _Failed(f"Could not execute {action}")

    def _get(self, amount: int, text: str) -> str:
        name = item_name(text)
        if self.tree.is_craftable(name) or name in self.tree.tags or name not in self.tree.items:
            raise _Failed(f"Could not find {text}")
        self.inventory[name] = self.inventory.get(name, 0) + amount
        return f"Got {amount} {text}"

    def _craft(self, target: str, ingredients: str) -> tuple[str, str]:
        m = _COUNT.match(target)
        out_text, out_count = (m.group(2), int(m.group(1))) if m else (target, 1)
        offered: list[tuple[str | None, int]] = []
        for part in ingredients.split(","):
            m = _COUNT.match(part.strip())
            if not m:
                raise _Failed(f"Wrong item format: {part.strip()}")
            name = item_name(m.group(2))
            offered.append((None if name in self.tree.tags else name, int(m.group(1))))
        out_name = item_name(out_text)
        out_item = None if out_name in self.tree.tags else out_name
        if any(name is None or self.inventory.get(name, 0) < n for name, n in offered):
            raise _Failed(f"Could not find enough items to craft {out_item}")
        recipe = self.tree.craft(out_item, offered) if out_item else None
        if recipe is None:
            raise _Failed(f"Could not find a valid recipe for {_spec_repr(out_text, out_count, self.tree)}")
        for name, n in offered:
            self.inventory[name] -= n
            if self.inventory[name] == 0:
                del self.inventory[name]
        self.inventory[recipe.output] = self.inventory.get(recipe.output, 0) + recipe.count
        return f"Crafted {recipe.count} {recipe.output}", recipe.output

    # --- expert --------------------------------------------------------------------

    def expert(self, task_id: int) -> list[str]:
        """Plan down the recipe tree: fetch base items in bulk, then craft bottom-up."""
        goal = self.goal_of(self.check_task_id(task_id))
        return CraftPlanner(self.tree).plan(goal)


class CraftPlanner:
    """Turns a goal into get/craft actions, tracking a simulated inventory.

    Each item is made with its shallowest recipe; a tag ingredient is satisfied by the
    first craftable item of that tag; leftovers from earlier crafts are reused.
    """

    def __init__(self, tree: CraftingTree) -> None:
        self.tree = tree
        self.inventory: dict[str, int] = {}
        self.outputs: list[str] = []

    def plan(self, goal: str) -> list[str]:
        self.ensure(goal, 1, purpose=None)
        return self.outputs

    def choose_recipe(self, item: str) -> Recipe:
        return min(self.tree.item_recipes[item], key=lambda r: max(self.tree.min_depth(i.name) + 1 for i in r.inputs))

    def concrete(self, ingredient_name: str, is_tag: bool) -> str:
        if not is_tag:
            return ingredient_name
        members = [i for i, t in self.tree.item_tag.items() if t == ingredient_name and i in self.tree.item_recipes]
        return min(members, key=lambda i: (self.tree.min_depth(i), i))

    def emit(self, thought: str, action: str) -> None:
        self.outputs.append(f"Thought: {thought}\nAction: {action}")

    def ensure(self, item: str, needed: int, purpose: str | None) -> None:
        missing = needed - self.inventory.get(item, 0)
        if missing <= 0:
            return
        why = f"for the {item_text(purpose)}" if purpose else "as the goal"
        if item not in self.tree.item_recipes:
            self.emit(
                f"I need {missing} {item_text(item)} {why}, and it is a base item.", f"get {missing} {item_text(item)}"
            )
            self.inventory[item] = self.inventory.get(item, 0) + missing
            return
        recipe = self.choose_recipe(item)
        times = math.ceil(missing / recipe.count)
        used = [(self.concrete(i.name, i.is_tag), i.count) for i in recipe.inputs]
        # Making one ingredient can eat another's stock (sticks use planks): repeat until all are there.
        while any(self.inventory.get(name, 0) < n * times for name, n in used):
            for name, n in used:
                self.ensure(name, n * times, purpose=item)
        ingredients = ", ".join(f"{n} {item_text(name)}" for name, n in used)
        for _ in range(times):
            self.emit(
                f"I have the ingredients to craft {item_text(item)} {why}.",
                f"craft {recipe.count} {item_text(item)} using {ingredients}",
            )
            for name, n in used:
                self.inventory[name] -= n
            self.inventory[item] = self.inventory.get(item, 0) + recipe.count
