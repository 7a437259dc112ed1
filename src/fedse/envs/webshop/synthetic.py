"""The synthetic WebShop catalog: seeded products in WebShop's schema (see `fedse.envs.webshop.catalog`).

Five WebShop categories, thirty product types with many similar products each, overlapping
attributes, colour/size/flavour options and realistic price spreads (single prices and
"$x to $y" ranges); 45 % of the products carry an instruction with its instruction
attributes, as in the real file.
"""

from __future__ import annotations

import random
from functools import cache

from fedse.envs.webshop.catalog import Catalog, Product, sale_prices

# (category, product type as titled, query, breadcrumb, type nouns, attribute pool,
#  option kinds, price low/high)
_TYPES = (
    ("fashion", "Men's Shorts", "men's shorts", "Clothing, Shoes & Jewelry › Men › Clothing › Shorts", ("shorts",),
     ("elastic waist", "classic fit", "quick drying", "machine wash", "drawstring closure", "relaxed fit",
      "moisture wicking", "cotton spandex"), ("color", "size"), (12, 45)),
    ("fashion", "Women's Jumpsuits", "women's jumpsuits, rompers & overalls",
     "Clothing, Shoes & Jewelry › Women › Clothing › Jumpsuits, Rompers & Overalls", ("jumpsuits",),
     ("slim fit", "short sleeve", "high waist", "polyester spandex", "machine wash", "daily wear", "wide leg",
      "button closure"), ("color", "size"), (15, 48)),
    ("fashion", "Men's T-Shirt", "men's t-shirts", "Clothing, Shoes & Jewelry › Men › Clothing › Shirts › T-Shirts",
     ("shirt",), ("short sleeve", "cotton blend", "classic fit", "crew neck", "machine wash", "moisture wicking",
                  "slim fit", "tumble dry"), ("color", "size"), (8, 30)),
    ("fashion", "Women's Leggings", "women's leggings", "Clothing, Shoes & Jewelry › Women › Clothing › Leggings",
     ("leggings",), ("high waist", "tummy control", "butt lift", "quick drying", "moisture wicking", "four way stretch",
                     "yoga pants", "non see through"), ("color", "size"), (10, 36)),
    ("fashion", "Men's Running Shoes", "men's athletic shoes",
     "Clothing, Shoes & Jewelry › Men › Shoes › Athletic › Running", ("shoes",),
     ("non slip", "rubber sole", "lace up", "memory foam", "arch support", "breathable mesh", "lightweight",
      "wide width"), ("color", "shoe size"), (25, 90)),
    ("fashion", "Women's Hoodie", "women's fashion hoodies & sweatshirts",
     "Clothing, Shoes & Jewelry › Women › Clothing › Fashion Hoodies & Sweatshirts", ("hoodie",),
     ("long sleeve", "drawstring closure", "relaxed fit", "fleece lined", "machine wash", "kangaroo pocket",
      "cotton blend", "daily wear"), ("color", "size"), (18, 55)),
    ("beauty", "Shampoo", "shampoo", "Beauty & Personal Care › Hair Care › Shampoo & Conditioner › Shampoos",
     ("shampoo",), ("sulfate free", "paraben free", "dry hair", "natural ingredients", "cruelty free", "hair growth",
                    "color safe", "tea tree"), ("scent", "size"), (7, 32)),
    ("beauty", "Face Moisturizer", "face moisturizers",
     "Beauty & Personal Care › Skin Care › Face › Creams & Moisturizers", ("moisturizer", "face"),
     ("dry skin", "hyaluronic acid", "fragrance free", "anti aging", "cruelty free", "sensitive skin",
      "paraben free", "vitamin c"), ("size",), (9, 48)),
    ("beauty", "Matte Lipstick", "lipstick", "Beauty & Personal Care › Makeup › Lips › Lipstick", ("lipstick",),
     ("long lasting", "cruelty free", "highly pigmented", "moisturizing", "waterproof", "natural ingredients",
      "easy to apply", "paraben free"), ("color",), (5, 24)),
    ("beauty", "Clip in Hair Extensions", "hair extensions",
     "Beauty & Personal Care › Hair Care › Hair Extensions, Wigs & Accessories › Hair Extensions",
     ("extensions", "hair"), ("natural looking", "heat resistant", "easy to use", "synthetic hair", "long lasting",
                              "high quality", "double weft", "straight hair"), ("color", "size"), (15, 60)),
    ("beauty", "Gel Nail Polish", "nail polish", "Beauty & Personal Care › Foot, Hand & Nail Care › Nail Polish",
     ("polish", "nail"), ("long lasting", "non toxic", "quick drying", "high gloss", "easy to apply", "cruelty free",
                          "chip resistant", "nail art"), ("color", "size"), (6, 25)),
    ("beauty", "Makeup Brush Set", "makeup brushes", "Beauty & Personal Care › Tools & Accessories › Makeup Brushes",
     ("brush", "set"), ("synthetic hair", "easy to clean", "travel size", "high quality", "cruelty free",
                        "storage case", "soft bristles", "eye shadow"), ("color",), (8, 35)),
    ("food", "Ground Coffee", "ground coffee", "Grocery & Gourmet Food › Beverages › Coffee › Ground Coffee",
     ("coffee",), ("medium roast", "dark roast", "certified organic", "non gmo", "fair trade", "low acid",
                   "whole bean", "single origin"), ("flavor name", "size"), (8, 40)),
    ("food", "Protein Bars", "snack bars", "Grocery & Gourmet Food › Snacks & Sweets › Bars › Protein Bars",
     ("bars", "protein"), ("gluten free", "low sugar", "high protein", "keto friendly", "individually wrapped",
                           "non gmo", "plant based", "low carb"), ("flavor name", "size"), (10, 38)),
    ("food", "Herbal Tea", "herbal tea", "Grocery & Gourmet Food › Beverages › Tea › Herbal", ("tea",),
     ("caffeine free", "certified organic", "non gmo", "gluten free", "individually wrapped", "natural ingredients",
      "kosher certified", "tea bags"), ("flavor name", "size"), (5, 28)),
    ("food", "Dark Chocolate", "chocolate", "Grocery & Gourmet Food › Snacks & Sweets › Chocolate › Dark Chocolate",
     ("chocolate",), ("low sugar", "dairy free", "fair trade", "gluten free", "individually wrapped", "keto friendly",
                      "certified organic", "gift box"), ("flavor name", "size"), (6, 34)),
    ("food", "Gluten Free Cookies", "cookies", "Grocery & Gourmet Food › Snacks & Sweets › Cookies", ("cookies",),
     ("gluten free", "dairy free", "non gmo", "individually wrapped", "low sugar", "plant based", "soft baked",
      "nut free"), ("flavor name", "size"), (5, 26)),
    ("food", "Protein Powder", "protein powder", "Health & Household › Diet & Sports Nutrition › Protein › Powders",
     ("powder", "protein"), ("high protein", "low carb", "gluten free", "keto friendly", "plant based", "non gmo",
                             "sugar free", "whey protein"), ("flavor name", "size"), (20, 65)),
    ("furniture", "Office Chair", "office chairs", "Home & Kitchen › Furniture › Home Office Furniture › Chairs",
     ("chair", "office"), ("lumbar support", "height adjustable", "easy assembly", "mesh back", "swivel wheels",
                           "high back", "metal frame", "padded armrests"), ("color",), (45, 180)),
    ("furniture", "Bookshelf", "bookcases", "Home & Kitchen › Furniture › Home Office Furniture › Bookcases",
     ("bookshelf",), ("easy assembly", "solid wood", "storage space", "metal frame", "living room", "wall mounted",
                      "engineered wood", "open shelves"), ("color", "size"), (35, 150)),
    ("furniture", "Coffee Table", "coffee tables",
     "Home & Kitchen › Furniture › Living Room Furniture › Tables › Coffee Tables", ("table", "coffee"),
     ("living room", "solid wood", "storage space", "easy assembly", "metal frame", "lift top", "tempered glass",
      "mid century"), ("color",), (40, 170)),
    ("furniture", "Nightstand", "nightstands", "Home & Kitchen › Furniture › Bedroom Furniture › Nightstands",
     ("nightstand",), ("storage space", "easy assembly", "solid wood", "bedroom furniture", "drawer", "metal frame",
                       "charging station", "space saving"), ("color", "size"), (25, 110)),
    ("furniture", "Bar Stools", "barstools", "Home & Kitchen › Furniture › Kitchen & Dining Room Furniture › Barstools",
     ("stools", "bar"), ("height adjustable", "swivel seat", "faux leather", "easy assembly", "metal frame",
                         "non slip", "back support", "dining room"), ("color", "size"), (50, 160)),
    ("furniture", "Bed Frame", "beds, frames & bases",
     "Home & Kitchen › Furniture › Bedroom Furniture › Beds, Frames & Bases", ("frame", "bed"),
     ("easy assembly", "metal frame", "storage space", "noise free", "solid wood", "no box spring needed",
      "upholstered headboard", "heavy duty"), ("color", "size"), (90, 320)),
    ("electronics", "Wireless Earbuds", "earbud headphones",
     "Electronics › Headphones, Earbuds & Accessories › Headphones › Earbud Headphones", ("earbuds",),
     ("noise cancelling", "long battery life", "water resistant", "hands free", "fast charging", "wireless charging",
      "stereo sound", "touch control"), ("color",), (18, 95)),
    ("electronics", "Phone Case", "phone cases", "Cell Phones & Accessories › Cases, Holsters & Sleeves › Basic Cases",
     ("case", "phone"), ("shockproof", "wireless charging", "slim fit", "drop protection", "easy install",
                         "scratch resistant", "clear back", "raised edges"), ("color", "style"), (6, 28)),
    ("electronics", "USB C Cable", "usb cables", "Electronics › Computers & Accessories › Cables › USB Cables",
     ("cable", "usb"), ("fast charging", "high speed", "braided nylon", "data transfer", "durable", "tangle free",
                        "gold plated", "aluminum alloy"), ("color", "size"), (6, 22)),
    ("electronics", "Bluetooth Speaker", "portable bluetooth speakers",
     "Electronics › Portable Audio & Video › Portable Speakers & Docks › Portable Bluetooth Speakers",
     ("speaker",), ("water resistant", "long battery life", "stereo sound", "hands free", "portable", "deep bass",
                    "wireless connection", "built in microphone"), ("color",), (20, 110)),
    ("electronics", "HDMI Cable", "hdmi cables", "Electronics › Television & Video › Accessories › Cables › HDMI Cables",
     ("cable", "hdmi"), ("high speed", "gold plated", "braided nylon", "ultra hd", "ethernet", "durable",
                         "plug and play", "high definition"), ("size",), (7, 30)),
    ("electronics", "Power Bank", "portable power banks",
     "Cell Phones & Accessories › Chargers & Power Adapters › Portable Power Banks", ("bank", "power"),
     ("fast charging", "high capacity", "usb c", "led display", "compact", "wireless charging", "dual output",
      "travel size"), ("color",), (15, 60)),
)  # fmt: skip

_OPTION_VALUES = {
    "color": ("black", "white", "navy", "grey", "red", "blue", "green", "pink", "beige", "brown", "light blue",
              "dark green", "khaki", "olive", "burgundy", "purple", "teal", "ivory", "charcoal", "rose gold"),
    "size": ("x-small", "small", "medium", "large", "x-large", "xx-large"),
    "shoe size": ("7", "7.5", "8", "8.5", "9", "9.5", "10", "10.5", "11", "12"),
    "scent": ("lavender", "coconut", "tea tree", "citrus", "unscented", "mint", "vanilla"),
    "flavor name": ("vanilla", "chocolate", "peanut butter", "caramel", "mixed berry", "original", "mint",
                    "salted caramel", "coconut", "cinnamon"),
    "style": ("iphone 13", "iphone 14", "iphone 14 pro", "galaxy s22", "galaxy s23", "pixel 7"),
}  # fmt: skip
_SIZES_BY_CATEGORY = {
    "beauty": ("2 fl oz (pack of 1)", "8 fl oz (pack of 1)", "16 fl oz (pack of 1)", "8 fl oz (pack of 2)",
               "3.4 ounce", "1.7 ounce"),
    "food": ("12 count (pack of 1)", "pack of 6", "pack of 12", "24 count", "1 pound (pack of 1)", "2 pound"),
    "furniture": ("small", "medium", "large", "set of 2", "set of 4", "full", "queen", "king"),
    "electronics": ("3 ft", "6 ft", "10 ft", "2 pack", "3 pack"),
}  # fmt: skip
_BRANDS = (
    "Aldera", "Brightwell", "Corvane", "Dunmore", "Elkridge", "Fernhill", "Galvani", "Holloway", "Istra", "Juniper",
    "Kestrel", "Larkspur", "Maravel", "Northcote", "Oakhurst", "Pellham", "Quillon", "Rosemere", "Stanbury",
    "Tamarind", "Umbria", "Valeport", "Westbrook", "Yarrow", "Zephyra", "Ashgrove", "Bellmont", "Cedarline",
    "Driftwood", "Emberly", "Foxmoor", "Glenhaven", "Harbridge", "Ironvale", "Jasper", "Kinloch", "Lumen",
    "Meadowlark", "Nettleton", "Orchid",
)  # fmt: skip
_EXTRAS = (("with Pockets", "pockets"), ("for Daily Use", "use"), ("2 Pack", "pack"), ("Gift Set", "gift"),
           ("for Travel", "travel"), ("for Home", "home"), ("Value Pack", "value"), ("", None))  # fmt: skip
_SENTENCES = (
    "It is {a}.",
    "Customers choose this {noun} because it is {a}.",
    "Designed to be {a}, it fits any routine.",
    "Every {noun} we make is {a}.",
)
_INSTRUCTIONS = (
    "i need {query} that {verb} {a} and {b}",
    "find me {a}, {b} {query}",
    "i am looking for {a} {query} with {b}",
    "i want {a} and {b} {query}",
    "i'm looking for {query} which {verb} {a}, {b} and {c}",
    "find me {a}, {b} {query} for {c}",
)


def _asin(rng: random.Random, taken: set[str]) -> str:
    while True:
        asin = "B0" + "".join(rng.choices("0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", k=8))
        if asin not in taken:
            taken.add(asin)
            return asin


def _money(value: float) -> float:
    return round(value, 2)


def _synthetic_product(rng: random.Random, asin: str) -> Product:
    category, type_title, query, breadcrumb, nouns, pool, option_kinds, (low, high) = rng.choice(_TYPES)
    brand = rng.choice(_BRANDS)
    attributes = tuple(rng.sample(pool, rng.randint(3, 5)))
    extra, extra_noun = rng.choice(_EXTRAS)
    headline = " ".join(a.title() for a in attributes[:2])
    title = f"{brand} {headline} {type_title}" + (f" {extra}" if extra else "")
    title_nouns = frozenset({brand.lower(), *nouns} | ({extra_noun} if extra_noun else set()))

    options: dict[str, tuple[str, ...]] = {}
    for kind in option_kinds:
        values = _SIZES_BY_CATEGORY[category] if kind == "size" and category != "fashion" else _OPTION_VALUES[kind]
        count = rng.randint(3, min(7, len(values)))
        options[kind] = tuple(rng.sample(values, count))

    price = rng.uniform(low, high)
    if rng.random() < 0.3:
        pricing = (_money(price), _money(price * rng.uniform(1.2, 1.8)))
        tag = f"${pricing[0]} to ${pricing[1]}"
    else:
        pricing = (_money(price),)
        tag = f"${pricing[0]}"

    sentences = [f"The {brand} {type_title.lower()} is made for everyday use."]
    sentences += [rng.choice(_SENTENCES).format(a=a, noun=nouns[0]) for a in attributes]
    bullets = tuple(f"{a.upper()}: {brand} designs every {nouns[0]} to be {a}." for a in attributes)

    instruction, instruction_attributes = None, ()
    if rng.random() < 0.45:
        template = rng.choice(_INSTRUCTIONS)
        chosen = rng.sample(attributes, 3)
        used = [x for x, key in zip(chosen, "abc", strict=True) if "{" + key + "}" in template]
        verb = "is" if not query.endswith("s") else "are"
        instruction = template.format(query=query, verb=verb, a=chosen[0], b=chosen[1], c=chosen[2])
        instruction_attributes = tuple(used)
    return Product(
        asin=asin,
        title=title,
        description=" ".join(sentences),
        bullet_points=bullets,
        category=category,
        query=query,
        product_category=breadcrumb,
        pricing=pricing,
        price_tag=tag,
        options=options,
        attributes=attributes,
        instruction=instruction,
        instruction_attributes=instruction_attributes,
        title_nouns=title_nouns,
    )


@cache
def synthetic_catalog(num_products: int = 1000, seed: int = 0) -> Catalog:
    """A deterministic catalog in WebShop's schema (generated in well under a second)."""
    rng = random.Random(seed)
    taken: set[str] = set()
    products = tuple(_synthetic_product(rng, _asin(rng, taken)) for _ in range(num_products))
    return Catalog(products, sale_prices(products, seed))
