"""WebShop: catalog and goals, search, pages and clickables, invalid actions, reward, expert, real-data loader."""

import json
import logging

import pytest

from fedse.envs import EnvError, make_env
from fedse.envs.webshop import Shop, WebShopEnv, open_shop
from fedse.envs.webshop.catalog import Catalog, Goal, Product, goals, load_catalog
from fedse.envs.webshop.env import INVALID, parse_react_action
from fedse.envs.webshop.reward import normalize_color, purchase_reward, token_set_ratio
from fedse.envs.webshop.search import SearchEngine
from fedse.envs.webshop.synthetic import synthetic_catalog
from fedse.errors import UserError


def _product(asin, title, query="men's shorts", category="Clothing › Men › Shorts", price=(20.0,), **kw):
    defaults = dict(
        description=f"{title}. Soft and light.",
        bullet_points=("ELASTIC WAIST: comfortable", "MACHINE WASH: easy care"),
        category="fashion",
        options={"color": ("navy", "black"), "size": ("small", "large")},
        attributes=("elastic waist", "machine wash"),
        title_nouns=frozenset({"shorts", asin.lower()}),
    )
    defaults |= kw
    tag = f"${price[0]}" if len(price) == 1 else f"${price[0]} to ${price[1]}"
    return Product(asin, title, query=query, product_category=category, pricing=price, price_tag=tag, **defaults)


def _shop(*products):
    catalog = Catalog(tuple(products), {p.asin: p.pricing[0] for p in products})
    return Shop(catalog, tuple(goals(catalog)), SearchEngine(catalog))


SHORTS = _product(
    "B0SHORTS01", "Aldera Elastic Waist Men's Shorts", instruction="i need elastic waist men's shorts",
    instruction_attributes=("elastic waist",),
)  # fmt: skip
OTHER = _product("B0SHORTS02", "Brightwell Classic Fit Men's Shorts", options={"color": ("grey",)})
MUG = _product(
    "B0MUG00001", "Corvane Ceramic Coffee Mug", query="mugs", category="Home › Kitchen › Mugs", options={},
    attributes=("dishwasher safe",), title_nouns=frozenset({"mug", "coffee"}),
)  # fmt: skip


@pytest.fixture
def env():
    shop = _shop(SHORTS, OTHER, MUG)
    env = WebShopEnv(shop)
    task = next(i for i, g in enumerate(shop.goals) if g.options == {"color": "navy", "size": "large"})
    env.reset(task)
    return env


def test_goals_follow_webshops_synthetic_procedure(env):
    shop = env.shop
    assert len(shop.goals) == 4  # one instructed product x 2 colours x 2 sizes
    texts = sorted(g.instruction_text for g in shop.goals)
    assert (
        texts[0]
        == "i need elastic waist men's shorts with color: black, and size: large, and price lower than 50.00 dollars"
    )
    # seed 233: the larger of two draws from the first four tens above the price (30, 40, 50, 60)
    assert {g.price_upper for g in shop.goals} == {50.0}
    assert {g.asin for g in shop.goals} == {"B0SHORTS01"} and all(
        g.attributes == ("elastic waist",) for g in shop.goals
    )


def test_default_catalog_is_deterministic_and_holds_agentgyms_ids():
    catalog = synthetic_catalog()
    assert len(catalog.products) == 1000 and len({p.asin for p in catalog.products}) == 1000
    assert {p.category for p in catalog.products} == {"beauty", "electronics", "fashion", "food", "furniture"}
    assert sum(p.instruction is not None for p in catalog.products) == 446
    first = goals(catalog)
    assert first == goals(synthetic_catalog.__wrapped__())
    env = make_env("webshop")
    assert len(first) == env.num_tasks == 8007
    assert (len(env.splits["test"]), len(env.splits["train"])) == (200, 3930)


def test_start_results_and_paging_pages(env):
    instr = env.goal.instruction_text
    assert env.reset(env.task_id) == f"WebShop [SEP] Instruction: [SEP] {instr} [SEP] Search"
    result = env.step("Thought: search.\nAction: search[men's shorts]")
    assert result.observation == (
        f"Instruction: [SEP] {instr} [SEP] Back to Search [SEP] Page 1 (Total results: 2) [SEP] Next > [SEP] "
        "B0SHORTS02 [SEP] Brightwell Classic Fit Men's Shorts [SEP] $20.0 [SEP] "  # shorter text: higher BM25
        "B0SHORTS01 [SEP] Aldera Elastic Waist Men's Shorts [SEP] $20.0"
    )
    assert list(env.clickables()) == ["back to search", "next >", "b0shorts02", "b0shorts01"]
    nxt = env.step("Action: click[Next >]")  # WebShop always offers Next >, even past the last result
    assert nxt.observation.endswith("Page 2 (Total results: 2) [SEP] < Prev [SEP] Next >")
    assert "< prev" in env.clickables()
    assert env.step("Action: click[< Prev]").observation == result.observation


def test_item_sub_and_done_pages(env):
    instr = env.goal.instruction_text
    env.step("Action: search[elastic waist]")
    item = env.step("Action: click[B0SHORTS01]").observation
    assert item == (
        f"Instruction: [SEP] {instr} [SEP] Back to Search [SEP] < Prev [SEP] color [SEP] navy [SEP] black [SEP] "
        "size [SEP] small [SEP] large [SEP] Aldera Elastic Waist Men's Shorts [SEP] Price: $20.0 [SEP] Rating: N.A. "
        "[SEP] Description [SEP] Features [SEP] Reviews [SEP] Buy Now"
    )
    assert set(env.clickables()) == {
        "back to search", "< prev", "navy", "black", "small", "large", "description", "features", "reviews", "buy now",
    }  # fmt: skip
    head = f"Instruction: [SEP] {instr} [SEP] Back to Search [SEP] < Prev"
    assert (
        env.step("Action: click[Description]").observation
        == f"{head} [SEP] Aldera Elastic Waist Men's Shorts. Soft and light."
    )
    assert env.step("Action: click[< Prev]").observation == item
    assert (
        env.step("Action: click[Features]").observation
        == f"{head} [SEP] ELASTIC WAIST: comfortable [SEP] MACHINE WASH: easy care"
    )
    env.step("Action: click[< Prev]")
    assert env.step("Action: click[Reviews]").observation == head
    env.step("Action: click[< Prev]")
    env.step("Action: click[navy]")
    env.step("Action: click[large]")
    done = env.step("Thought: all set.\nAction: click[Buy Now]")
    assert (done.reward, done.done, done.success) == (1.0, True, True)
    assert done.observation.startswith(
        "Thank you for shopping with us! [SEP] Your code: [SEP] None [SEP] (Paste it in your MTurk interface.) [SEP] "
        "Purchased [SEP] asin [SEP] B0SHORTS01 [SEP] options [SEP] {'color': 'navy', 'size': 'large'} [SEP] attrs"
    )
    assert done.observation.endswith("[SEP] Your score (min 0.0, max 1.0) [SEP] 1.0 [SEP] Reward Details [SEP] None")


@pytest.mark.parametrize(
    "action",
    [
        "click[B0NOTSHOWN]",
        "click[navy]",
        "click[search]",
        "Click[back to search]",
        "buy[now]",
        "click[]",
        "search[]",
        "look around",
    ],
)
def test_invalid_actions_leave_the_page_unchanged(env, action):
    before = env.step("Action: search[elastic waist]").observation
    result = env.step(f"Thought: hm.\nAction: {action}")
    assert (result.observation, result.reward, result.done) == (before, 0.0, False)


def test_a_reply_without_an_action_is_invalid(env):
    first = env.observation()
    result = env.step("I am not sure what to do.")
    assert result.observation == INVALID + first and result.action == ""


def test_react_parsing_takes_the_last_action():
    assert parse_react_action("Thought: a\nAction: search[x]\nAction: click[y]") == "click[y]"
    assert parse_react_action("search[red mug]") == "search[red mug]"
    assert parse_react_action("Thought: nothing") == ""


def test_search_works_from_any_page_and_back_to_search_resets(env):
    env.step("Action: search[elastic waist]")
    env.step("Action: click[B0SHORTS01]")
    env.step("Action: click[navy]")
    assert env.step("Action: search[mug]").observation.split(" [SEP] ")[5] == "B0MUG00001"
    assert env.step("Action: click[Back to Search]").observation.startswith("WebShop [SEP] Instruction:")
    assert env.page.options == {} and env.clickables() == {}


def _goal(**kw):
    fields = dict(asin="B0SHORTS01", instruction_text="", attributes=("elastic waist", "machine wash"),
                  price_upper=30.0, options={"color": "navy", "size": "large"})  # fmt: skip
    return Goal(**(fields | kw))


def test_reward_right_product_right_options_is_one():
    assert purchase_reward(SHORTS, 20.0, {"color": "navy", "size": "large"}, _goal(), SHORTS).total == 1.0


def test_reward_right_product_wrong_option():
    reward = purchase_reward(SHORTS, 20.0, {"color": "black", "size": "large"}, _goal(), SHORTS)
    assert (reward.attribute_matches, reward.option_matches, reward.price_ok) == (2, 1, True)
    assert reward.total == pytest.approx(4 / 5)


def test_reward_over_budget():
    reward = purchase_reward(SHORTS, 35.0, {"color": "navy", "size": "large"}, _goal(), SHORTS)
    assert not reward.price_ok and reward.total == pytest.approx(4 / 5)


def test_reward_wrong_type_is_zero_and_weak_title_overlap_is_a_tenth():
    wrong = purchase_reward(MUG, 10.0, {}, _goal(), SHORTS)
    assert (wrong.r_type, wrong.title_score, wrong.total) == (0.0, 0.0, 0.0)
    # one of eleven title nouns shared, different query and category: r_type 0.1
    many = _product("B0X", "x", title_nouns=frozenset({"shorts", *"abcdefghij"}))
    lamp = _product("B0Y", "y", query="lamps", category="Home › Lamps", title_nouns=frozenset({"shorts", "lamp"}))
    weak = purchase_reward(lamp, 20.0, {"color": "navy", "size": "large"}, _goal(), many)
    assert weak.title_score == pytest.approx(1 / 11) and weak.r_type == 0.1
    assert weak.total == pytest.approx(0.1 * (2 + 2 + 1) / 5)


def test_attributes_also_match_in_the_text_and_colours_normalise():
    plain = _product("B0Z", "Plain Men's Shorts", attributes=("DUMMY_ATTR",), bullet_points=("Elastic waist fit",))
    assert purchase_reward(plain, 20.0, {}, _goal(), SHORTS).attribute_matches == 1
    assert normalize_color("light blue") == "blue" and normalize_color(("color", "navy")) == "navy"
    assert normalize_color(("color", "dark navy")) == ("color", "dark navy")  # a pair matches whole items only
    assert token_set_ratio("x-large", ("size", "x-large")) == 100


def test_search_ranks_by_bm25_and_drops_non_matching_products():
    shop = open_shop()
    product = shop.catalog.products[7]
    results = shop.search.search(product.title)
    assert results[0] == product and len(results) <= 50
    assert shop.search.search("zzzz qqqq") == []


def test_expert_reaches_reward_one_on_every_test_goal():
    env = make_env("webshop")
    for task_id in env.splits["test"]:
        env.reset(task_id)
        outputs = env.expert(task_id)
        for output in outputs:
            result = env.step(output)
        assert result.done and result.reward == 1.0 and len(outputs) <= env.max_turns, task_id


def test_real_data_loader_reads_webshops_schema(tmp_path):
    items = [
        {"asin": "B0REAL0001", "name": "Acme Running Shoes", "full_description": "Light shoes.",
         "small_description": ["Breathable mesh"], "pricing": "$35.50", "category": "fashion", "query": "Running Shoes ",
         "product_category": "Clothing › Shoes › Running",
         "customization_options": {"Color": [{"value": "Navy/White", "image": None}], "Size": [{"value": "9"}, {"value": "10"}]},
         "images": ["x.jpg"]},
        {"asin": "B0REAL0002", "name": "Acme Socks", "full_description": "", "small_description": "Warm",
         "pricing": "$5.00 $9.00", "category": "fashion", "query": "socks", "product_category": "Clothing › Socks",
         "customization_options": None, "images": ["y.jpg"]},
        {"asin": "B0REAL0001", "name": "duplicate", "pricing": ""},
        {"asin": "nan", "name": "no asin"},
        {"asin": "B0REAL0003", "name": "Acme Cap", "full_description": "Cap.", "small_description": [], "pricing": None,
         "category": "fashion", "query": "caps", "product_category": "Clothing › Caps", "customization_options": {}},
    ]  # fmt: skip
    attributes = {
        "B0REAL0001": {"attributes": ["breathable mesh"], "instruction": "i need breathable running shoes",
                       "instruction_attributes": ["breathable mesh"]},
        "B0REAL0002": {"attributes": ["warm"]},
    }  # fmt: skip
    (tmp_path / "items.json").write_text(json.dumps(items))
    (tmp_path / "attrs.json").write_text(json.dumps(attributes))
    catalog = load_catalog(tmp_path / "items.json", tmp_path / "attrs.json")
    shoes, socks, cap = catalog.products
    assert [p.asin for p in catalog.products] == ["B0REAL0001", "B0REAL0002", "B0REAL0003"]
    assert shoes.options == {"color": ("navy | white",), "size": ("9", "10")} and shoes.query == "running shoes"
    assert (shoes.price_tag, socks.price_tag, cap.price_tag) == ("$35.5", "$5.0 to $9.0", "$100.0")
    assert 5.0 <= catalog.prices["B0REAL0002"] <= 9.0 and cap.attributes == ("DUMMY_ATTR",)
    assert socks.bullet_points == ("Warm",) and shoes.title_nouns is None
    shop = Shop(catalog, tuple(goals(catalog)), SearchEngine(catalog))
    assert len(shop.goals) == 2  # the instructed shoes: 1 colour x 2 sizes
    env = WebShopEnv(shop)
    env.reset(0)
    for output in env.expert(0):
        result = env.step(output)
    assert result.success


def test_real_data_loader_names_a_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"does not exist; point to items_shuffle_1000.json"):
        load_catalog(tmp_path / "nope.json", tmp_path / "attrs.json")


def test_task_ids_beyond_the_goal_list_are_refused():
    env = make_env("webshop")
    with pytest.raises(EnvError, match=r"webshop: unknown task id 8007; valid ids are 0\.\.8006"):
        env.reset(8007)


def test_importing_the_search_module_changes_no_process_state():
    """bm25s's import-time side effects (JAX backend, DEBUG logging) are tamed where an index is built."""
    import subprocess
    import sys

    code = (
        "import logging, os\n"
        "os.environ.pop('JAX_PLATFORMS', None)\n"
        "import fedse.envs.webshop.search as search\n"
        "before = ('JAX_PLATFORMS' in os.environ, 'bm25s' in logging.root.manager.loggerDict)\n"
        "from fedse.envs.webshop.synthetic import synthetic_catalog\n"
        "search.SearchEngine(synthetic_catalog(50))\n"
        "print(before, os.environ.get('JAX_PLATFORMS'), logging.getLogger('bm25s').level)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.split() == ["(False,", "False)", "cpu", str(logging.WARNING)]
