"""WebShop's products and goals: a seeded synthetic catalog, or the real files when a user has them.

The real WebShop data (1,000 scraped products, `items_shuffle_1000.json`, and their attributes
and instructions, `items_ins_v2_1000.json`) cannot be downloaded here and is not ours to ship.
`fedse.envs.webshop.synthetic.synthetic_catalog()` generates products in the same schema instead: five WebShop categories,
thirty product types with many similar products each, overlapping attributes, colour/size/
flavour options and realistic price spreads (single prices and "$x to $y" ranges); 45 % of
the products carry an instruction with its instruction attributes, as in the real file.
`load_catalog(items, attrs)` reads the real files with WebShop's `load_products` rules.

Goals follow WebShop's synthetic-goal procedure (`goals()`, docs/environments.md): for each
product with an instruction, in catalog order, a price bound drawn from the first four
multiples of 10 above its price (`random.seed(233)` first, as AgentGym's copy does), then one
goal per combination of its option values (option names sorted), finally shuffled with seed
233. Range-priced products get a price drawn uniformly in the range, as WebShop does, but from
a seeded generator (upstream's draw is unseeded, so its goals differ between processes).
"""

from __future__ import annotations

import itertools
import json
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal
from functools import cached_property
from pathlib import Path

from fedse.errors import UserError

PRICE_RANGE = [10.0 * i for i in range(1, 100)]
GOAL_SEED = 233


@dataclass(frozen=True)
class Product:
    asin: str
    title: str
    description: str
    bullet_points: tuple[str, ...]
    category: str
    query: str
    product_category: str
    """Breadcrumb path, "A › B › C"."""
    pricing: tuple[float, ...]
    """One price, or the two ends of a range."""
    price_tag: str
    """As shown: "$12.99" or "$9.98 to $16.98"."""
    options: dict[str, tuple[str, ...]]
    attributes: tuple[str, ...]
    instruction: str | None = None
    instruction_attributes: tuple[str, ...] = ()
    title_nouns: frozenset[str] | None = None
    """Noun words of the title, known for synthetic products (see `fedse.envs.webshop.reward.title_nouns`)."""


@dataclass(frozen=True)
class Goal:
    asin: str
    instruction_text: str
    attributes: tuple[str, ...]
    price_upper: float
    options: dict[str, str] = field(default_factory=dict)
    """Option name -> value the buyer must choose."""


@dataclass(frozen=True)
class Catalog:
    products: tuple[Product, ...]
    prices: dict[str, float]
    """The price each product sells at (a draw inside a price range)."""

    @cached_property
    def by_asin(self) -> dict[str, Product]:
        return {p.asin: p for p in self.products}


def sale_prices(products: tuple[Product, ...], seed: int) -> dict[str, float]:
    """WebShop's `generate_product_prices`: a range-priced product sells at a uniform draw (seeded here)."""
    rng = random.Random(f"prices-{seed}")
    return {p.asin: p.pricing[0] if len(p.pricing) == 1 else rng.uniform(*p.pricing[:2]) for p in products}


# --- goals --------------------------------------------------------------------------------


def goals(catalog: Catalog) -> list[Goal]:
    """WebShop's synthetic goals for `catalog`, shuffled with seed 233 (docs/environments.md)."""
    rng = random.Random(GOAL_SEED)
    result: list[Goal] = []
    for product in catalog.products:
        if product.instruction is None:
            continue
        price_range = [p for p in PRICE_RANGE if p > catalog.prices[product.asin]][:4]
        if len(price_range) >= 2:
            price_upper = max(rng.sample(price_range, 2))
            price_text = f", and price lower than {price_upper:.2f} dollars"
        else:
            price_upper, price_text = 1000000.0, ""
        names = sorted(product.options)
        for combination in itertools.product(*(product.options[n] for n in names)):
            chosen = dict(zip(names, combination, strict=True))
            option_text = ", and ".join(f"{k}: {v}" for k, v in chosen.items())
            option_text = f" with {option_text}" if option_text else ""
            result.append(
                Goal(
                    asin=product.asin,
                    instruction_text=f"{product.instruction}{option_text}{price_text}",
                    attributes=product.instruction_attributes,
                    price_upper=price_upper,
                    options=chosen,
                )
            )
    random.Random(GOAL_SEED).shuffle(result)
    return result


# --- the real files -----------------------------------------------------------------------


def load_catalog(items_path: str | Path, attributes_path: str | Path, seed: int = 0) -> Catalog:
    """Read WebShop's `items_shuffle_1000.json` and `items_ins_v2_1000.json` (WebShop's load rules).

    Products with a bad or repeated asin are skipped; prices "$x" or "$x $y" become one price or
    a range (missing: $100.0); option names and values are lower-cased, "/" becomes " | ";
    products without attributes get ["DUMMY_ATTR"]. Title nouns are approximated at reward
    time (no spaCy model is available offline).
    """
    items_path, attributes_path = Path(items_path), Path(attributes_path)
    for path in (items_path, attributes_path):
        if not path.is_file():
            raise UserError(
                f"webshop: {path} does not exist; point to items_shuffle_1000.json and items_ins_v2_1000.json"
            )
    try:
        raw_items = json.loads(items_path.read_text(encoding="utf-8"))
        raw_attributes = json.loads(attributes_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise UserError(f"webshop: could not parse the catalog files as JSON: {error}") from error
    products: list[Product] = []
    seen: set[str] = set()
    for raw in raw_items:
        asin = raw.get("asin", "nan")
        if asin == "nan" or len(asin) > 10 or asin in seen:
            continue
        seen.add(asin)
        products.append(_real_product(raw, raw_attributes.get(asin, {})))
    if not products:
        raise UserError(f"webshop: {items_path} holds no products with a valid asin")
    products_t = tuple(products)
    return Catalog(products_t, sale_prices(products_t, seed))


def _real_product(raw: dict, extra: dict) -> Product:
    pricing_text = raw.get("pricing")
    if not pricing_text:
        pricing, tag = (100.0,), "$100.0"
    else:
        values = [float(Decimal(re.sub(r"[^\d.]", "", part))) for part in pricing_text.split("$")[1:]]
        if len(values) == 1:
            pricing, tag = (values[0],), f"${values[0]}"
        else:
            pricing, tag = tuple(values[:2]), f"${values[0]} to ${values[1]}"
    options = {}
    for name, contents in (raw.get("customization_options") or {}).items():
        if contents is None:
            continue
        options[name.lower()] = tuple(c["value"].strip().replace("/", " | ").lower() for c in contents)
    bullets = raw.get("small_description")
    return Product(
        asin=raw["asin"],
        title=raw.get("name", ""),
        description=raw.get("full_description", "") or "",
        bullet_points=tuple(bullets) if isinstance(bullets, list) else (bullets or "",),
        category=raw.get("category", ""),
        query=(raw.get("query") or "").lower().strip(),
        product_category=raw.get("product_category", ""),
        pricing=pricing,
        price_tag=tag,
        options=options,
        attributes=tuple(extra.get("attributes") or ["DUMMY_ATTR"]),
        instruction=extra.get("instruction"),
        instruction_attributes=tuple(extra.get("instruction_attributes") or ()),
    )
