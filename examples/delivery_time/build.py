"""Build the delivery-time example: a synthetic delivery dataset, a regression model trained on
it, the restaurants' features as CSV and Parquet, and a model repository that joins them in.

    python examples/delivery_time/build.py OUT [--redis redis://localhost:6379/0]

The app's request carries the restaurant id and the distance. How busy the restaurant is (orders
received, and orders still being prepared per minute, over the past hour) is pre-computed
elsewhere and looked up at prediction time. Writes:

- ``OUT/restaurants.csv`` and ``OUT/restaurants.parquet``: restaurant_id, incoming_orders_1h,
  outstanding_orders_per_min_1h;
- ``OUT/models/delivery_time/``: the model, with the embedded store reading restaurants.csv;
- with ``--redis``, ``OUT/models/delivery_time_redis/``: the same model reading Redis hashes
  ``restaurant:<id>`` (load them with ``inferd features load``).
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import skops.io as sio
from sklearn.ensemble import HistGradientBoostingRegressor
from sklearn.model_selection import train_test_split

FEATURES = ("incoming_orders_1h", "outstanding_orders_per_min_1h")
TOML = """\
[features]
store = "{store}"
entity = "restaurant_id"
prefix = "restaurant"
fetch = ["incoming_orders_1h", "outstanding_orders_per_min_1h"]
lookup_timeout_ms = 50
cache_ttl_s = 5

[features.inputs]
inputs = ["distance_km", "incoming_orders_1h", "outstanding_orders_per_min_1h"]

[sklearn]  # this file was written by build.py, so its tree type can be trusted
trusted_types = ["sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"]
"""


def restaurants(rng: np.random.Generator, count: int) -> dict[str, np.ndarray]:
    """Each restaurant's load over the past hour: orders in, and orders waiting per minute."""
    popularity = rng.gamma(2.0, 12.0, count)
    incoming = rng.poisson(popularity)
    kitchens = rng.uniform(0.5, 2.0, count)  # orders a kitchen finishes per minute
    outstanding = np.round(np.maximum(incoming / 60 - kitchens / 4, 0) + rng.exponential(0.1, count), 3)
    return {
        "restaurant_id": np.array([f"r{i}" for i in range(count)]),
        "incoming_orders_1h": incoming.astype(np.float64),
        "outstanding_orders_per_min_1h": outstanding,
    }


def deliveries(
    rng: np.random.Generator, table: dict[str, np.ndarray], count: int
) -> tuple[np.ndarray, np.ndarray]:
    """Inputs [distance_km, incoming, outstanding] and minutes: preparation slows with the
    kitchen's backlog, the ride grows with distance, and traffic adds noise."""
    which = rng.integers(0, len(table["restaurant_id"]), count)
    distance = rng.gamma(2.0, 1.6, count)
    incoming = table["incoming_orders_1h"][which]
    outstanding = table["outstanding_orders_per_min_1h"][which]
    minutes = 9 + 3.2 * distance + 0.08 * incoming + 14 * outstanding + rng.gamma(2.0, 1.5, count)
    return np.column_stack([distance, incoming, outstanding]), minutes


def build(out: Path, redis_url: str | None) -> None:
    rng = np.random.default_rng(7)
    table = restaurants(rng, 500)
    x, y = deliveries(rng, table, 8_000)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, random_state=0)
    model = HistGradientBoostingRegressor(max_iter=60).fit(x_train, y_train)
    error = np.abs(model.predict(x_test) - y_test).mean()
    print(f"held-out mean absolute error: {error:.2f} minutes")

    out.mkdir(parents=True, exist_ok=True)
    write_tables(out, table)
    folder = out / "models" / "delivery_time"
    (folder / "1").mkdir(parents=True, exist_ok=True)
    sio.dump(model, folder / "1" / "model.skops")
    (folder / "inferd.toml").write_text(TOML.format(store="../../restaurants.csv"))
    if redis_url:
        redis_folder = out / "models" / "delivery_time_redis"
        shutil.copytree(folder / "1", redis_folder / "1", dirs_exist_ok=True)
        (redis_folder / "inferd.toml").write_text(TOML.format(store=redis_url))
    print(f"wrote {out}/restaurants.csv, restaurants.parquet and the models under {out}/models")


def write_tables(out: Path, table: dict[str, np.ndarray]) -> None:
    rows = zip(*(table[name].tolist() for name in table), strict=True)
    lines = [",".join(table), *(",".join(str(v) for v in row) for row in rows)]
    (out / "restaurants.csv").write_text("\n".join(lines) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table(table), out / "restaurants.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--redis", metavar="URL", help="also write a model that reads Redis at URL")
    args = parser.parse_args()
    build(args.out, args.redis)


if __name__ == "__main__":
    main()
