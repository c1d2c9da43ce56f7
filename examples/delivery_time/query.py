"""Ask the served delivery-time model for estimates, in TF Serving's and the V2 format.

    python examples/delivery_time/query.py [http://localhost:8501] [delivery_time]

The requests carry only what the app knows: the restaurant id and the distance.
"""

from __future__ import annotations

import sys

import requests


def main() -> None:
    url = sys.argv[1] if len(sys.argv) > 1 else "http://localhost:8501"
    model = sys.argv[2] if len(sys.argv) > 2 else "delivery_time"
    orders = [("r1", 1.2), ("r42", 4.5), ("r42", 0.8), ("r300", 7.0)]

    v1 = {"instances": [{"restaurant_id": r, "distance_km": d} for r, d in orders]}
    answer = requests.post(f"{url}/v1/models/{model}:predict", json=v1, timeout=10)
    answer.raise_for_status()
    for (restaurant, distance), minutes in zip(orders, answer.json()["predictions"], strict=True):
        print(f"v1  {restaurant:>5} {distance:4.1f} km: {minutes:5.1f} min")

    v2 = {
        "inputs": [
            {
                "name": "restaurant_id",
                "datatype": "BYTES",
                "shape": [len(orders)],
                "data": [r for r, _ in orders],
            },
            {
                "name": "distance_km",
                "datatype": "FP64",
                "shape": [len(orders)],
                "data": [d for _, d in orders],
            },
        ]
    }
    answer = requests.post(f"{url}/v2/models/{model}/infer", json=v2, timeout=10)
    answer.raise_for_status()
    print("v2  ", [round(m, 1) for m in answer.json()["outputs"][0]["data"]])
    signature = requests.get(f"{url}/v2/models/{model}", timeout=10).json()["inputs"]
    print("what a caller sends:", signature)


if __name__ == "__main__":
    main()
