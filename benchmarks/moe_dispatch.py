"""MoE dispatches against one plain SwiGLU of the same size: forward+backward time and ratio.

    python benchmarks/moe_dispatch.py                      # 2048 tokens, d 256, hidden 1024
    python benchmarks/moe_dispatch.py --experts 2,8 --dispatches ragged,blocked --top_k 2
    python benchmarks/moe_dispatch.py --window_rows 256:256,1024:64 --experts 8   # window sweep

Each case is the gradient (with respect to the layer's parameters and its input) of the sum of
squares of the layer's output, jitted. A plain SwiGLU of d_model x hidden does the useful work
of one token through one expert, so a top-1 MoE that runs only the chosen expert is ~1x and
one that runs every expert on every token is ~n_experts x. The cases are timed in turn over
several rounds and each keeps its best time, so that other load on a shared machine (which
only ever slows a run) counts as little as possible. `dropless` is `blocked` on CPU and
`ragged` elsewhere (minids_jax/moe.py).
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from absl import app, flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens per layer call (batch x length).")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_MLP_MULT = flags.DEFINE_integer("mlp_mult", 4, "Hidden width = mlp_mult x d_model.")
_TOP_K = flags.DEFINE_integer("top_k", 1, "Experts per token.")
_EXPERTS = flags.DEFINE_list("experts", ["1", "2", "8"], "Expert counts.")
_DISPATCHES = flags.DEFINE_list("dispatches", ["ragged", "blocked", "capacity", "dense"],
                                "Dispatches (model.moe_dispatch values).")
_WINDOW_ROWS = flags.DEFINE_list("window_rows", [],
                                 "Blocked dispatch only: LARGEST:SMALLEST window sizes (powers "
                                 "of two) to try instead of the default ones; 256:256 is "
                                 "fixed blocks of 256 rows.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds over all cases; each keeps its best.")
_ITERS = flags.DEFINE_integer("iters", 3, "Calls per timing.")


def main(argv):
    del argv
    from minids_jax import devices

    devices.reuse_host_memory()  # as train.py does, before the backend starts
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minids_jax import moe as moe_lib
    from minids_jax.config import ModelConfig
    from minids_jax.layers import swiglu

    nnx.use_eager_sharding(False)
    d, tokens, dtype = _D_MODEL.value, _TOKENS.value, jnp.dtype(_DTYPE.value)
    hidden = _MLP_MULT.value * d
    x = jax.random.normal(jax.random.key(0), (1, tokens, d), dtype)

    keys = jax.random.split(jax.random.key(1), 3)
    plain_weights = tuple(jax.random.normal(k, s) * s[0] ** -0.5
                          for k, s in zip(keys, ((d, hidden), (d, hidden), (hidden, d))))
    plain = jax.jit(jax.grad(
        lambda ws, x: jnp.sum(swiglu(x[0], *(w.astype(dtype) for w in ws)).astype(
            jnp.float32) ** 2), argnums=(0, 1)))
    cases = {"plain SwiGLU": (plain, (plain_weights, x))}
    for n_experts in map(int, _EXPERTS.value):
        for dispatch in _DISPATCHES.value:
            cfg = ModelConfig(d_model=d, mlp_mult=_MLP_MULT.value, n_experts=n_experts,
                              top_k=min(_TOP_K.value, n_experts), moe_dispatch=dispatch,
                              max_seq_len=tokens, latent_k=1, n_heads=1, dtype=_DTYPE.value)
            layer = moe_lib.MoE(cfg, rngs=nnx.Rngs(0))
            graph, state = nnx.split(layer)
            kernel = moe_lib.resolve_dispatch(dispatch, jax.sharding.get_abstract_mesh())
            choices = [None]
            if kernel == "blocked" and _WINDOW_ROWS.value:
                choices = [moe_lib.halving_sizes(*map(int, pair.split(":")))
                           for pair in _WINDOW_ROWS.value]
            for sizes in choices:
                def loss(state, x, sizes=sizes, graph=graph):
                    with _window_rows(moe_lib, sizes):
                        out = nnx.merge(graph, state)(x)[0]
                    return jnp.sum(out.astype(jnp.float32) ** 2)
                default_sizes = moe_lib.window_rows(tokens * cfg.top_k, n_experts)
                label = f"E={n_experts} {dispatch}"
                if dispatch != kernel:
                    label += f" ({kernel})"
                if kernel == "blocked":
                    sizes = sizes or default_sizes
                    label += f" windows={sizes[0]}..{sizes[-1]}"
                cases[label] = (jax.jit(jax.grad(loss, argnums=(0, 1))), (state, x))

    print(f"{jax.default_backend()} ({jax.devices()[0].device_kind}), {tokens} tokens, "
          f"d_model {d}, hidden {hidden}, top_k {_TOP_K.value}, {_DTYPE.value}; "
          f"forward+backward, best of {_ROUNDS.value} rounds of {_ITERS.value} calls")
    for fn, args in cases.values():  # compile and warm up
        jax.block_until_ready(fn(*args))
    best = {label: float("inf") for label in cases}
    for _ in range(_ROUNDS.value):
        for label, (fn, args) in cases.items():
            start = time.perf_counter()
            for _ in range(_ITERS.value):
                out = fn(*args)
            jax.block_until_ready(out)
            best[label] = min(best[label], (time.perf_counter() - start) / _ITERS.value)
    base = best["plain SwiGLU"]
    print("| case | ms | x plain SwiGLU |\n|---|---:|---:|")
    for label, seconds in best.items():
        print(f"| {label} | {seconds * 1e3:.1f} | {seconds / base:.2f} |")


@contextlib.contextmanager
def _window_rows(moe_lib, sizes):
    """While tracing: the blocked dispatch uses windows of `sizes` rows (None: its default)."""
    default = moe_lib.window_rows
    if sizes is not None:
        moe_lib.window_rows = lambda assignments, n_experts: sizes
    try:
        yield
    finally:
        moe_lib.window_rows = default


if __name__ == "__main__":
    app.run(main)
