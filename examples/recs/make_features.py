"""Build ``features.sqlite``, the example's feature store: one row of 8 features per user
(``user_features``, keyed by ``user_id`` 1..1000) and the product catalogue (``products``,
the model's score columns in order). Fixed seed: the same rows every time.

    python examples/recs/make_features.py
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
DIM, USERS, PRODUCTS, SEED = 8, 1000, 50, 17
COLUMNS = [f"f{i}" for i in range(DIM)]


def build(path: Path = HERE / "features.sqlite") -> Path:
    rng = np.random.default_rng(SEED)
    features = rng.normal(size=(USERS, DIM)).round(4)
    path.unlink(missing_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE user_features (user_id INTEGER PRIMARY KEY, "
                   + ", ".join(f"{c} REAL NOT NULL" for c in COLUMNS) + ")")
        db.executemany(f"INSERT INTO user_features VALUES (?{', ?' * DIM})",
                       [(u + 1, *map(float, row)) for u, row in enumerate(features)])
        db.execute("CREATE TABLE products (position INTEGER PRIMARY KEY, product_id TEXT)")
        db.executemany("INSERT INTO products VALUES (?, ?)",
                       [(i, f"sku-{1000 + i * 7}") for i in range(PRODUCTS)])
    db.close()
    return path


if __name__ == "__main__":
    print(build())
