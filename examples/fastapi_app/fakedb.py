"""The example's stand-in for a database: products, orders and reports in memory.

Every query sleeps ``QUERY_SECONDS`` first, so a cache miss costs what a round trip to a
real database would. Shared by ``app.py`` and ``baseline.py``, so both serve the same data
at the same cost.
"""

from __future__ import annotations

import os
from typing import TypeAlias

import anyio

#: One product as the API returns it (JSON: what the cache stores and gives back).
Product: TypeAlias = dict[str, int | float | str]

PRODUCT_COUNT = 10_000
QUERY_SECONDS = float(os.environ.get("EXAMPLE_DB_SECONDS", "0.002"))


class Database:
    """Products by id, order states by order id, and a slow report query."""

    def __init__(self) -> None:
        self.products: dict[int, Product] = {
            n: {"id": n, "name": f"product {n}", "price": 100 + n % 900}
            for n in range(1, PRODUCT_COUNT + 1)
        }
        self.orders: dict[str, str] = {}
        self.queries = 0

    async def product(self, product_id: int) -> Product | None:
        """The product, or None if there is no such id."""
        self.queries += 1
        await anyio.sleep(QUERY_SECONDS)
        found = self.products.get(product_id)
        return None if found is None else dict(found)

    async def set_price(self, product_id: int, price: int) -> Product | None:
        """Change a product's price; the updated product, or None if there is no such id."""
        self.queries += 1
        await anyio.sleep(QUERY_SECONDS)
        found = self.products.get(product_id)
        if found is None:
            return None
        found["price"] = price
        return dict(found)

    async def report(self, name: str) -> dict[str, int | str]:
        """A slow aggregate, the kind one worker should compute at a time."""
        self.queries += 1
        await anyio.sleep(QUERY_SECONDS * 10)
        total = sum(int(p["price"]) for p in self.products.values())
        return {"report": name, "products": len(self.products), "total_price": total}
