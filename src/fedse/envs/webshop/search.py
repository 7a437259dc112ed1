"""WebShop's product search: BM25 over the catalog, top 50 (docs/environments.md).

WebShop searches a Lucene index with pyserini (a JDK and torch); we use `bm25s` configured
like Lucene's defaults there: BM25 with k1 0.9 and b 0.4, Lucene's idf, English stopwords and
Porter stemming, over each product's title, description, first bullet point and option
values. Differences from Anserini that remain: bm25s drops one-character tokens and keeps
exact document lengths (Lucene quantises them), so rankings can differ on near ties.
"""

from __future__ import annotations

import logging
import os
from functools import cache

from fedse.envs.webshop.catalog import Catalog, Product

SEARCH_RETURN_N = 50


@cache
def _bm25s():
    """Import bm25s (and build the stemmer) the first time an index is built, with its side effects tamed.

    bm25s imports JAX when it is installed and runs a top-k on import; on a GPU machine that
    starts JAX's GPU backend, which takes 75 % of the GPU's memory from the model. Searching
    1,000 products needs no GPU, so JAX stays on the CPU unless the user chose otherwise.
    bm25s also sets its logger to DEBUG on import and logs every index build.
    """
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import bm25s
    import Stemmer

    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s, Stemmer.Stemmer("porter")


def document(product: Product) -> str:
    options = " ".join(v for values in product.options.values() for v in values)
    first_bullet = product.bullet_points[0] if product.bullet_points else ""
    return f"{product.title} {product.description} {first_bullet} {options}".lower()


class SearchEngine:
    """Keyword search returning up to 50 products, best first; products with no matching term are left out."""

    def __init__(self, catalog: Catalog) -> None:
        bm25s, self._stemmer = _bm25s()
        self.products = catalog.products
        tokens = bm25s.tokenize(
            [document(p) for p in self.products], stopwords="en", stemmer=self._stemmer, show_progress=False
        )
        self.index = bm25s.BM25(method="lucene", k1=0.9, b=0.4)
        self.index.index(tokens, show_progress=False)
        self.vocab = tokens.vocab

    def search(self, keywords: str) -> list[Product]:
        bm25s, _ = _bm25s()
        query = bm25s.tokenize(
            keywords.lower(), stopwords="en", stemmer=self._stemmer, show_progress=False, return_ids=False
        )
        terms = [t for t in query[0] if t in self.vocab]
        if not terms:
            return []
        k = min(SEARCH_RETURN_N, len(self.products))
        docs, scores = self.index.retrieve([terms], k=k, show_progress=False, n_threads=1, backend_selection="numpy")
        return [self.products[int(d)] for d, s in zip(docs[0], scores[0], strict=True) if s > 0]
