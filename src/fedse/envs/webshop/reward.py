"""WebShop's purchase reward (Yao et al. 2022, `engine/goal.py` as AgentGym vendors it; docs/environments.md).

    R = r_type * (attribute matches + option matches + [price <= bound]) / (#attributes + #options + 1)

- attribute match: a goal attribute fuzzily equals one of the product's attributes (token-set
  ratio > 85), or appears verbatim in its title, bullet points or description;
- option match: a goal option, given as the (name, value) pair AgentGym's copy passes, fuzzily
  equals a chosen option value, both after WebShop's colour normalisation;
- r_type: 1 if the query or two breadcrumb categories match or the title-noun overlap exceeds
  0.2, else 0.5; 0.1 if the overlap is below 0.1; 0 if it is 0.

Fuzzy ratios are thefuzz's `token_set_ratio` (computed by rapidfuzz with thefuzz's default
processing: stringify, lower-case, non-alphanumerics to spaces; rounded to an integer).
Title nouns: WebShop tags the product names with spaCy's `en_core_web_lg`, which is not
installable offline. Synthetic products carry their noun words from the generator; for real
catalogs `approximate_nouns` keeps alphabetic words that are not stopwords or common
product adjectives, an approximation that is documented rather than exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from rapidfuzz import fuzz
from rapidfuzz.utils import default_process

from fedse.envs.webshop.catalog import Goal, Product

# WebShop's normalize.py colour list (the first one found inside an option string wins).
COLOR_SET = (
    "alabaster", "apricot", "aqua", "ash", "asphalt", "azure", "banana", "beige", "black", "blue", "blush",
    "bordeaux", "bronze", "brown", "burgundy", "camel", "camo", "caramel", "champagne", "charcoal", "cheetah",
    "chestnut", "chocolate", "christmas", "coffee", "cognac", "copper", "coral", "cranberry", "cream", "crystal",
    "dark", "denim", "eggplant", "elephant", "espresso", "fuchsia", "gold", "granite", "grape", "graphite", "grass",
    "gray", "green", "grey", "heather", "indigo", "ivory", "ivy", "khaki", "lavender", "lemon", "leopard", "light",
    "lilac", "lime", "magenta", "maroon", "mauve", "merlot", "midnight", "mint", "mocha", "multicolor", "mushroom",
    "mustard", "natural", "navy", "nude", "olive", "orange", "peach", "pewter", "pink", "plum", "purple", "rainbow",
    "red", "rose", "royal", "rust", "sand", "sapphire", "seashell", "silver", "skull", "slate", "steel", "stone",
    "stonewash", "sunflower", "tan", "taupe", "teal", "tiger", "turquoise", "violet", "walnut", "wheat", "white",
    "wine", "yellow",
)  # fmt: skip

_STOPWORDS = frozenset(
    "a an and are as at be by for from in into is it of on or the to with without your you x".split()
)
_ADJECTIVES = frozenset(
    "new best premium large small medium mini extra super ultra soft high low long short light heavy natural "
    "organic free easy quick fast slim classic modern portable compact adjustable waterproof durable wireless "
    "professional original pure fresh men women mens womens kids baby unisex pack count set".split()
)
_WORD = re.compile(r"[a-z]+")


def normalize_color(option: str | tuple[str, str]) -> str | tuple[str, str]:
    """WebShop's rule: the first COLOR_SET entry found `in` the option (for a pair: equal to one of its items)."""
    for color in COLOR_SET:
        if color in option:
            return color
    return option


def token_set_ratio(a: object, b: object) -> int:
    """thefuzz's token_set_ratio: stringified, processed, rounded to an integer."""
    return round(fuzz.token_set_ratio(str(a), str(b), processor=default_process))


def approximate_nouns(title: str) -> frozenset[str]:
    return frozenset(w for w in _WORD.findall(title.lower()) if w not in _STOPWORDS and w not in _ADJECTIVES)


def title_nouns(product: Product) -> frozenset[str]:
    return product.title_nouns if product.title_nouns is not None else approximate_nouns(product.title)


@dataclass(frozen=True)
class Reward:
    total: float
    r_type: float
    attribute_matches: int
    option_matches: int
    price_ok: bool
    title_score: float


def type_reward(bought: Product, target: Product) -> tuple[float, float]:
    """(r_type, title_score) of buying `bought` when `target` was wanted."""
    query_match = bought.query == target.query
    categories = {c.strip() for c in bought.product_category.split("›")}
    category_match = len(categories & {c.strip() for c in target.product_category.split("›")}) >= 2
    wanted = title_nouns(target)
    title_score = 0.2 if not wanted else len(title_nouns(bought) & wanted) / len(wanted)
    r_type = 1.0 if query_match or category_match or title_score > 0.2 else 0.5
    if title_score < 0.1:
        r_type = 0.1
    if title_score == 0.0:
        r_type = 0.0
    return r_type, title_score


def attribute_matches(bought: Product, goal: Goal) -> int:
    text = (bought.title.lower(), " ".join(bought.bullet_points).lower(), bought.description.lower())
    count = 0
    for wanted in goal.attributes:
        if any(token_set_ratio(have, wanted) > 85 for have in bought.attributes) or any(wanted in t for t in text):
            count += 1
    return count


def option_matches(chosen: dict[str, str], goal: Goal) -> int:
    picked = [normalize_color(v) for v in chosen.values()]
    wanted = [normalize_color(pair) for pair in goal.options.items()]
    return sum(any(token_set_ratio(p, w) > 85 for p in picked) for w in wanted)


def purchase_reward(bought: Product, price: float, chosen: dict[str, str], goal: Goal, target: Product) -> Reward:
    """The reward of buying `bought` at `price` with options `chosen`, for `goal` (whose product is `target`)."""
    r_type, title_score = type_reward(bought, target)
    attrs = attribute_matches(bought, goal)
    options = option_matches(chosen, goal)
    price_ok = price <= goal.price_upper
    total = (attrs + options + price_ok) / (len(goal.attributes) + len(goal.options) + 1) * r_type
    return Reward(total, r_type, attrs, options, price_ok, title_score)
