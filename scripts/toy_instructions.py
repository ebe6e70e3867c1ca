"""Writes a small instruction set made for fine-tuning demonstrations: word reversal, sums of
small numbers and capitals of countries, as JSON Lines.

    python scripts/toy_instructions.py --out data/toy.jsonl [--count 400] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import random

WORDS = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest",
         "rocket", "window", "garden", "silver", "planet", "yellow", "summer")
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid",
            "Egypt": "Cairo", "Peru": "Lima", "Kenya": "Nairobi", "Canada": "Ottawa",
            "Norway": "Oslo", "Chile": "Santiago", "Greece": "Athens", "Cuba": "Havana"}


def record(rng: random.Random) -> dict:
    kind = rng.randrange(3)
    if kind == 0:
        word = rng.choice(WORDS)
        return {"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
    if kind == 1:
        a, b = rng.randrange(10), rng.randrange(10)
        return {"instruction": "Add the numbers.", "input": f"{a} {b}", "output": str(a + b)}
    country = rng.choice(sorted(CAPITALS))
    return {"instruction": f"What is the capital of {country}?", "input": "",
            "output": CAPITALS[country]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(record(rng)) + "\n" for _ in range(args.count)))


if __name__ == "__main__":
    main()
