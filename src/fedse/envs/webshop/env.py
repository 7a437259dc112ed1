"""WebShop: find and buy the product an instruction describes (docs/environments.md; Yao et al. 2022).

The shop is WebShop's text mode re-implemented without Flask, HTML or Java: pages are the
"[SEP]"-joined visible texts WebShop's simple observation mode produces, with the same
clickables, and actions are `search[keywords]` (from any page) and `click[value]` (a button,
a product id or an option value on the current page, compared lower-cased). Anything else
leaves the page unchanged with reward 0. Model output is parsed as AgentGym's ReAct client
does: the text after the last "Action:"; a reply with no action gets "Invalid Action.".
The episode ends at "Buy Now" with WebShop's reward (`fedse.envs.webshop.reward`); success
means reward 1 (the right product, with the right options, under the budget).

Catalog: the synthetic one of `fedse.envs.webshop.synthetic` (1,000 products, 8,007 goals), or
the real `items_shuffle_1000.json` + `items_ins_v2_1000.json` when `FEDSE_WEBSHOP_DATA`
names the folder holding them. Task id k plays goal k of the seeded, shuffled goal list.
The splits are AgentGym's id lists (200 test, 3,930 train ids, all below 6,910), so they
have AgentGym's sizes; with the synthetic catalog an id does not denote AgentGym's goal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from fedse.envs.base import StepResult, TextEnv
from fedse.envs.webshop.catalog import Catalog, Goal, Product, goals, load_catalog
from fedse.envs.webshop.reward import purchase_reward
from fedse.envs.webshop.search import SearchEngine
from fedse.envs.webshop.synthetic import synthetic_catalog

DATA_ENV_VAR = "FEDSE_WEBSHOP_DATA"
REAL_FILES = ("items_shuffle_1000.json", "items_ins_v2_1000.json")
PER_PAGE = 10
SEP = " [SEP] "
BACK_TO_SEARCH, PREV, NEXT, BUY = "back to search", "< prev", "next >", "buy now"
SUB_PAGES = ("description", "features", "reviews")
INVALID = "Invalid Action.\n\n"


def split_action(action: str) -> tuple[str, str] | None:
    r"""(verb, argument) of `verb[argument]`, as AgentGym's `re.match(r"(.+)\[(.+)\]", action)`
    reads it (the last `[` that still has a `]` after a non-empty argument, the last `]`, within
    the first line), in linear time: the regex backtracks quadratically on a line of `[`s."""
    line = action.split("\n", 1)[0]
    close = line.rfind("]")
    if close < 3:
        return None
    open_ = line.rfind("[", 1, close - 1)
    if open_ < 1:
        return None
    return line[:open_], line[open_ + 1 : close]


INSTRUCTION = """\
You are shopping online. Buy the product that the instruction on the page describes, with the \
options it asks for and within its price limit.
Actions:
search[keywords] (searches the shop from any page)
click[value] (value is a product id, an option value or a button shown on the current page, \
e.g. click[B0ABC12345], click[large], click[Buy Now])
An action that is not available does nothing.
Answer every observation in exactly this format:
Thought: <one short reason>
Action: <one action>"""


@dataclass(frozen=True)
class Shop:
    """A catalog with its goals and search index, built once per process."""

    catalog: Catalog
    goals: tuple[Goal, ...]
    search: SearchEngine


@cache
def open_shop(data_dir: str | None = None) -> Shop:
    """The shop for `data_dir` (the real WebShop files), or the synthetic catalog when None."""
    if data_dir is None:
        catalog = synthetic_catalog()
    else:
        folder = Path(data_dir)
        catalog = load_catalog(folder / REAL_FILES[0], folder / REAL_FILES[1])
    return Shop(catalog, tuple(goals(catalog)), SearchEngine(catalog))


def default_shop() -> Shop:
    return open_shop(os.environ.get(DATA_ENV_VAR) or None)


@dataclass
class Page:
    """Where the browser is: WebShop's session state."""

    kind: str = "start"
    """start | results | item | sub | done"""
    keywords: str = ""
    number: int = 1
    results: list[Product] = field(default_factory=list)
    product: Product | None = None
    options: dict[str, str] = field(default_factory=dict)
    sub: str = ""
    receipt: str = ""
    """The done page's text."""


def parse_react_action(text: str) -> str:
    """AgentGym's WebShop client: the text after the last 'Action:', else the whole reply if it holds an action."""
    if "Action:" in text:
        return text.rsplit("Action:", 1)[1].strip()
    if "search[" in text or "click[" in text:
        return text.strip()
    return ""


class WebShopEnv(TextEnv):
    name = "webshop"
    instruction = INSTRUCTION
    max_turns = 10

    def __init__(self, shop: Shop | None = None, data_dir: str | None = None) -> None:
        """`data_dir`: a folder with WebShop's real files (else `FEDSE_WEBSHOP_DATA`, else the synthetic shop)."""
        super().__init__()
        self.shop = shop or (open_shop(str(data_dir)) if data_dir else default_shop())
        self.page = Page()
        self.goal: Goal | None = None

    @property
    def num_tasks(self) -> int:  # type: ignore[override]
        return len(self.shop.goals)

    @property
    def splits(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(i for i in ids if i < self.num_tasks) for k, ids in super().splits.items()}

    # --- pages -----------------------------------------------------------------------------

    def observation(self) -> str:
        page, goal = self.page, self.goal
        head = f"Instruction: [SEP] {goal.instruction_text} [SEP] Back to Search"
        if page.kind == "start":
            return f"WebShop [SEP] Instruction: [SEP] {goal.instruction_text} [SEP] Search"
        if page.kind == "results":
            parts = [head, f"Page {page.number} (Total results: {len(page.results)})"]
            parts += ["< Prev"] if page.number > 1 else []
            parts.append("Next >")
            for product in self._on_page():
                parts += [product.asin, product.title, product.price_tag]
            return SEP.join(parts)
        product = page.product
        if page.kind == "item":
            parts = [head, "< Prev"]
            for name, values in product.options.items():
                parts += [name, *values]
            parts += [product.title, f"Price: {product.price_tag}", "Rating: N.A.", "Description", "Features"]
            return SEP.join([*parts, "Reviews", "Buy Now"])
        if page.kind == "sub":
            body = {
                "description": [product.description] if product.description else [],
                "features": [b for b in product.bullet_points if b],
                "reviews": [],  # the 1,000-product setup has no review file
            }[page.sub]
            return SEP.join([head, "< Prev", *body])
        return page.receipt

    def clickables(self) -> dict[str, str]:
        """Clickable text (lower-cased as WebShop compares it) -> what it is: button, product or option name."""
        page = self.page
        if page.kind == "results":
            found = {BACK_TO_SEARCH: "button"}
            found |= {PREV: "button"} if page.number > 1 else {}
            found[NEXT] = "button"
            return found | {p.asin.lower(): "product" for p in self._on_page()}
        if page.kind == "item":
            found = {BACK_TO_SEARCH: "button", PREV: "button"}
            found |= {s: "button" for s in SUB_PAGES} | {BUY: "button"}
            for name, values in page.product.options.items():
                found |= {value: name for value in values}  # radio inputs keep their case; a later name wins
            return found
        if page.kind == "sub":
            return {BACK_TO_SEARCH: "button", PREV: "button"}
        return {}

    def _on_page(self) -> list[Product]:
        start = (self.page.number - 1) * PER_PAGE
        return self.page.results[start : start + PER_PAGE]

    # --- protocol ---------------------------------------------------------------------------

    def start_task(self, task_id: int) -> str:
        self.goal = self.shop.goals[task_id]
        self.page = Page()
        return self.observation()

    rejection = INVALID
    rejection_shows_observation = True

    def parse_action(self, model_output: str) -> str | None:
        return parse_react_action(model_output) or None

    def act(self, action: str) -> StepResult:
        reward, done = self._act(action)
        return StepResult(self.observation(), reward, done, done and reward == 1.0, action)

    def _act(self, action: str) -> tuple[float, bool]:
        parts = split_action(action)
        if parts is None:
            return 0.0, False
        verb, arg = parts[0], parts[1].lower()
        if verb == "search":
            self._search(arg, 1)
            return 0.0, False
        clickables = self.clickables()
        if verb != "click" or arg not in clickables or arg == "search":
            return 0.0, False
        return self._click(arg, clickables[arg])

    def _search(self, keywords: str, number: int) -> None:
        self.page = Page("results", keywords, number, self.shop.search.search(keywords))

    def _click(self, arg: str, what: str) -> tuple[float, bool]:
        page = self.page
        if arg == BUY:
            return self._buy(), True
        if arg == BACK_TO_SEARCH:
            self.page = Page()
        elif arg == NEXT and page.kind == "results":
            self._search(page.keywords, page.number + 1)
        elif arg == PREV and page.kind == "results":
            self._search(page.keywords, page.number - 1)
        elif arg == PREV and page.kind == "sub":
            page.kind = "item"
        elif arg == PREV and page.kind == "item":
            self._search(page.keywords, page.number)
        elif arg in SUB_PAGES:
            page.kind, page.sub = "sub", arg
        elif what == "product":
            page.kind, page.product = "item", self.shop.catalog.by_asin[arg.upper()]
        else:
            page.kind, page.options[what] = "item", arg
        return 0.0, False

    def _buy(self) -> float:
        page, goal, catalog = self.page, self.goal, self.shop.catalog
        bought = page.product
        reward = purchase_reward(
            bought, catalog.prices[bought.asin], page.options, goal, catalog.by_asin[goal.asin]
        ).total
        page.receipt = SEP.join(
            [
                "Thank you for shopping with us!", "Your code:", "None", "(Paste it in your MTurk interface.)",
                "Purchased", "asin", bought.asin, "options", str(page.options), "attrs", "None", "category", "None",
                "query", "None", "product category", "None", "Target", "asin", "options", "attrs", "price upper",
                "instuction text", "category", "product category", "query", "Goal", "None", "Reward",
                "Your score (min 0.0, max 1.0)", str(reward), "Reward Details", "None",
            ]
        )  # fmt: skip
        page.kind = "done"
        return reward

    # --- expert -----------------------------------------------------------------------------

    def expert(self, task_id: int) -> list[str]:
        """Search with the instruction's words, open the first result that fully satisfies it, pick the options, buy.

        "Fully satisfies" is judged with the reward itself (an expert may know it): the right
        type, every attribute, the goal's options offered, under the budget. The goal's own
        product always qualifies. Falls back to the product type plus attributes, then to the
        product title, when the instruction's words do not reach a qualifying product.
        """
        self.check_task_id(task_id)
        goal = self.shop.goals[task_id]
        target = self.shop.catalog.by_asin[goal.asin]
        query, rank, product = self._expert_pick(goal, target)
        outputs = [f"Thought: I search for the product the instruction describes.\nAction: search[{query}]"]
        for page in range(rank // PER_PAGE):
            outputs.append(
                f"Thought: No product on page {page + 1} has everything the instruction asks for; I try the next page.\n"
                "Action: click[Next >]"
            )
        outputs.append(
            f"Thought: {product.asin} ({product.price_tag}) has what the instruction asks for and fits the budget.\n"
            f"Action: click[{product.asin}]"
        )
        for name, value in goal.options.items():
            outputs.append(f"Thought: The instruction asks for {name} {value}, so I select it.\nAction: click[{value}]")
        outputs.append(
            "Thought: The product and its options match the instruction, so I buy it.\nAction: click[Buy Now]"
        )
        return outputs

    def _expert_pick(self, goal: Goal, target: Product) -> tuple[str, int, Product]:
        """(query, rank of the chosen product in its results, the product)."""
        attributes = " ".join(goal.attributes)
        for query in (target.instruction or "", f"{target.query} {attributes}", target.title.lower()):
            for rank, product in enumerate(self.shop.search.search(query)):
                if self._satisfies(product, goal, target):
                    return query, rank, product
        raise RuntimeError(f"webshop: no query finds a product for goal {goal.instruction_text!r}")

    def _satisfies(self, product: Product, goal: Goal, target: Product) -> bool:
        offered = {v: name for name, values in product.options.items() for v in values}
        if any(value not in offered for value in goal.options.values()):
            return False
        chosen = {offered[v]: v for v in goal.options.values()}
        price = self.shop.catalog.prices[product.asin]
        return purchase_reward(product, price, chosen, goal, target).total == 1.0
