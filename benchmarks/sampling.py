"""Time of one sampled token's choice from the logits (`generation.sample_logits`), looking at
the most likely candidates against sorting the whole vocabulary.

    python benchmarks/sampling.py --vocab 129280 --batches 1,8 --rounds 5

For each batch size and sampling setting (temperature, top_k, top_p), the compiled
`sample_logits` over random logits (normal, scaled by --spread: larger is a more confident
model), best of --iters calls, in --rounds rounds alternating between `candidates` as shipped
(generation.CANDIDATES) and `candidates=1`, which sorts unless top_k is 1. Prints both times,
their ratio (the median over rounds, and each round's) and which way the shipped version went.
"""

from __future__ import annotations

import functools
import statistics
import sys
import time
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minids_jax import cli  # (imports no jax)

_VOCAB = flags.DEFINE_integer("vocab", 129280, "Vocabulary size (DeepSeek-V3's by default).")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Rows sampled together.")
_SETTINGS = flags.DEFINE_list(
    "settings", ["0.8/50/0.95", "0.8/0/0.95", "0.6/0/0.9", "1.0/0/1.0"],
    "temperature/top_k/top_p triples (generate.py's default first).")
_SPREAD = flags.DEFINE_float("spread", 4.0, "Standard deviation of the random logits.")
_ITERS = flags.DEFINE_integer("iters", 10, "Calls per round; the best is kept.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating rounds.")


def best_ms(fn, *args) -> float:
    import jax

    jax.block_until_ready(fn(*args))  # compiles
    times = []
    for _ in range(_ITERS.value):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def parsed_flags() -> tuple[list[int], list[tuple[str, tuple]]]:
    """(batch sizes, [(setting, generation.Sampling(...).arrays())]); a malformed flag is a
    ConfigError (one error line)."""
    from minids_jax import generation
    from minids_jax.config import ConfigError

    try:
        batches = [int(batch) for batch in _BATCHES.value]
        if min(batches) < 1 or _VOCAB.value < 1:
            raise ValueError("batches and --vocab must be positive")
    except ValueError as error:
        raise ConfigError(f"--batches={','.join(_BATCHES.value)} --vocab={_VOCAB.value}: "
                          f"{error}.") from None
    return batches, [(setting, generation.Sampling.parse(setting, "--settings").arrays())
                     for setting in _SETTINGS.value]


def main(argv):
    del argv
    batches, settings = parsed_flags()
    import jax
    import numpy as np

    from minids_jax import generation

    shipped = jax.jit(generation.sample_logits)
    sorting = jax.jit(functools.partial(generation.sample_logits, candidates=1))
    print(f"vocab {_VOCAB.value:,}, logits ~ N(0, {_SPREAD.value}^2), "
          f"{jax.devices()[0].platform}; candidates {generation.CANDIDATES} against sorting")
    print(f"{'batch':>5s} {'T/top_k/top_p':>14s} {'candidates ms':>14s} {'sorting ms':>11s} "
          f"{'speedup (rounds)':>20s}")
    for batch in batches:
        logits_BxV = jax.numpy.asarray(np.random.default_rng(0).normal(
            0, _SPREAD.value, (batch, _VOCAB.value)).astype(np.float32))
        for setting, sampling in settings:
            args = (logits_BxV, jax.random.key(0), *sampling)
            ours, theirs = [], []
            for _ in range(_ROUNDS.value):
                ours.append(best_ms(shipped, *args))
                theirs.append(best_ms(sorting, *args))
            ratios = [t / o for o, t in zip(ours, theirs)]
            print(f"{batch:5d} {setting:>14s} {statistics.median(ours):14.2f} "
                  f"{statistics.median(theirs):11.2f} {statistics.median(ratios):6.1f}x "
                  f"({', '.join(f'{r:.1f}' for r in ratios)})", flush=True)


if __name__ == "__main__":
    cli.run(main)
