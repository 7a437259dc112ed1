"""WebShop (Yao et al. 2022) offline: the shop's text mode, its catalog, search and reward.

- `env`: the environment (pages, clickables, actions, expert) and the shop it opens;
- `catalog`: WebShop's product and goal schema, the synthetic-goal procedure, the real files' loader;
- `synthetic`: the seeded synthetic catalog used when the real files are absent;
- `search`: BM25 product search configured like WebShop's Lucene index;
- `reward`: WebShop's purchase reward.
"""

from fedse.envs.webshop.env import DATA_ENV_VAR, Shop, WebShopEnv, default_shop, open_shop

__all__ = ["DATA_ENV_VAR", "Shop", "WebShopEnv", "default_shop", "open_shop"]
