"""How fast this machine runs the products of one routed-expert window, each on its own.

    python benchmarks/window_products.py --rows 256 --d_model 512 --hidden 128

The blocked MoE dispatch (kernels/moe_windows.py) runs each window of R rows through its
expert's SwiGLU: forward x @ w1, x @ w2 ([R, D] x [D, F]) and h @ w3 ([R, F] x [F, D]);
backward dy @ w3^T, dh @ w1^T and dh @ w2^T, and the weight gradients x^T dh ([D, R] x [R, F])
and act^T dy. Each product is timed in a jitted loop over 64 different operand pairs (as the
windows' are): the best of 7 runs in each of 3 rounds over all the products, with a
[2048, D] x [D, D] product as a reference for what this machine gives larger products.
Shapes: R rows, D model width, F expert hidden width.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import jax
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minids_jax import cli  # noqa: E402

_ROWS = flags.DEFINE_integer("rows", 256, "Rows of a window.", lower_bound=1)
_D_MODEL = flags.DEFINE_integer("d_model", 512, "Model width.", lower_bound=1)
_HIDDEN = flags.DEFINE_integer("hidden", 128, "Expert hidden width.", lower_bound=1)
_PAIRS = 64  # operand pairs per timed loop


def timed_loop(lhs_shape, rhs_shape, product):
    """A function that runs `product` over the operand pairs once, and returns its seconds."""
    keys = jax.random.split(jax.random.key(0))
    lhs = jax.random.normal(keys[0], (_PAIRS, *lhs_shape))
    rhs = jax.random.normal(keys[1], (_PAIRS, *rhs_shape))

    @jax.jit
    def loop(lhs, rhs):
        return jax.lax.fori_loop(
            0, _PAIRS, lambda i, total: total + product(lhs[i], rhs[i])[0, 0], 0.0)

    loop(lhs, rhs).block_until_ready()

    def seconds() -> float:
        start = time.perf_counter()
        loop(lhs, rhs).block_until_ready()
        return time.perf_counter() - start

    return seconds


def main(argv):
    del argv
    r, d, f = _ROWS.value, _D_MODEL.value, _HIDDEN.value
    window_flops = 2 * r * d * f
    cases = [
        ("x @ w1        [R,D] x [D,F]", (r, d), (d, f), lambda a, b: a @ b, window_flops),
        ("h @ w3        [R,F] x [F,D]", (r, f), (f, d), lambda a, b: a @ b, window_flops),
        ("dy @ w3^T     [R,D] x [F,D]^T", (r, d), (f, d), lambda a, b: a @ b.T, window_flops),
        ("dh @ w1^T     [R,F] x [D,F]^T", (r, f), (d, f), lambda a, b: a @ b.T, window_flops),
        ("x^T @ dh      [R,D]^T x [R,F]", (r, d), (r, f), lambda a, b: a.T @ b, window_flops),
        ("act^T @ dy    [R,F]^T x [R,D]", (r, f), (r, d), lambda a, b: a.T @ b, window_flops),
        ("square        [2048,D] x [D,D]", (2048, d), (d, d), lambda a, b: a @ b,
         2 * 2048 * d * d),
    ]
    print(f"one window: R={r} rows, D={d}, F={f}, {jax.devices()[0].platform}, float32")
    loops = [timed_loop(lhs_shape, rhs_shape, product)
             for _, lhs_shape, rhs_shape, product, _ in cases]
    best = [float("inf")] * len(cases)
    for _ in range(3):  # rounds over every product, so that no product gets only a cold machine
        for i, seconds in enumerate(loops):
            best[i] = min(best[i], *(seconds() for _ in range(7)))
    for (name, *_, flops), seconds in zip(cases, best):
        per_product = seconds / _PAIRS
        print(f"{name:32s} {per_product * 1e3:8.3f} ms {flops / per_product / 1e9:8.0f} GFLOP/s")


if __name__ == "__main__":
    cli.run(main)
