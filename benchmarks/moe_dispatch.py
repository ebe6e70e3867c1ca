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
`ragged` elsewhere (`minids_jax.kernels.resolve`). `--window_rows` runs the blocked dispatch
with the given window sizes (its `window_sizes=`) in place of the ones it picks itself.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minids_jax import cli  # noqa: E402  (imports no jax)

_TOKENS = flags.DEFINE_integer("tokens", 2048, "Tokens per layer call (batch x length).")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "Model width.")
_MLP_MULT = flags.DEFINE_integer("mlp_mult", 4, "Hidden width = mlp_mult x d_model.")
_TOP_K = flags.DEFINE_integer("top_k", 1, "Experts per token.")
_EXPERTS = flags.DEFINE_list("experts", ["1", "2", "8"], "Expert counts.")
_DISPATCHES = flags.DEFINE_list("dispatches", ["ragged", "blocked", "capacity", "dense"],
                                "Dispatches (compute.moe_dispatch values).")
_WINDOW_ROWS = flags.DEFINE_list("window_rows", [],
                                 "Blocked dispatch only: LARGEST:SMALLEST window sizes (powers "
                                 "of two) to try instead of the default ones; 256:256 is "
                                 "fixed blocks of 256 rows.")
_DTYPE = flags.DEFINE_string("dtype", "float32", "Compute dtype.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Rounds over all cases; each keeps its best.")
_ITERS = flags.DEFINE_integer("iters", 3, "Calls per timing.")


def main(argv):
    del argv
    from minids_jax import startup

    startup.use_huge_pages()  # as train.py does, before the backend starts
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minids_jax import kernels, sharding
    from minids_jax.config import ComputeConfig, ModelConfig
    from minids_jax.kernels.moe_windows import halving_sizes, window_rows
    from minids_jax.model.layers import swiglu
    from minids_jax.model.moe import MoE

    nnx.use_eager_sharding(False)
    d, tokens, dtype = _D_MODEL.value, _TOKENS.value, jnp.dtype(_DTYPE.value)
    hidden = _MLP_MULT.value * d
    x = jax.random.normal(jax.random.key(0), (1, tokens, d), dtype)
    platform = sharding.mesh_platform()

    keys = jax.random.split(jax.random.key(1), 3)
    plain_weights = tuple(jax.random.normal(k, s) * s[0] ** -0.5
                          for k, s in zip(keys, ((d, hidden), (d, hidden), (hidden, d))))
    plain = jax.jit(jax.grad(
        lambda ws, x: jnp.sum(swiglu(x[0], *(w.astype(dtype) for w in ws)).astype(
            jnp.float32) ** 2), argnums=(0, 1)))
    cases = {"plain SwiGLU": (plain, (plain_weights, x))}
    for n_experts in map(int, _EXPERTS.value):
        cfg = ModelConfig(d_model=d, mlp_mult=_MLP_MULT.value, n_experts=n_experts,
                          top_k=min(_TOP_K.value, n_experts), max_seq_len=tokens, latent_k=1,
                          n_heads=1)
        for dispatch in _DISPATCHES.value:
            compute = kernels.resolve(ComputeConfig(dtype=_DTYPE.value, moe_dispatch=dispatch),
                                      platform)
            kernel = compute.moe_dispatch  # `dropless`: the platform's exact dispatch
            layer = MoE(cfg, compute, rngs=nnx.Rngs(0))
            graph, state = nnx.split(layer)
            choices = [None]
            if kernel == "blocked" and _WINDOW_ROWS.value:
                choices = [halving_sizes(*map(int, pair.split(":")))
                           for pair in _WINDOW_ROWS.value]
                own = window_rows(tokens * cfg.top_k, n_experts)  # what the layer picks
                check = jax.jit(lambda x: (layer(x)[0], with_windows(layer, x, own)))
                if not np.allclose(*map(np.asarray, check(x)), rtol=1e-3, atol=1e-3):
                    raise RuntimeError("with_windows no longer computes what MoE does")
            for sizes in choices:
                def loss(state, x, sizes=sizes, graph=graph):
                    moe = nnx.merge(graph, state)
                    out = moe(x)[0] if sizes is None else with_windows(moe, x, sizes)
                    return jnp.sum(out.astype(jnp.float32) ** 2)
                label = f"E={n_experts} {dispatch}"
                if dispatch != kernel:
                    label += f" ({kernel})"
                if kernel == "blocked":
                    shown = sizes or window_rows(tokens * cfg.top_k, n_experts)
                    label += f" windows={shown[0]}..{shown[-1]}"
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


def with_windows(layer, x_BxLxD, sizes: tuple[int, ...]):
    """What `layer(x_BxLxD)[0]` computes off a mesh, with the blocked dispatch's windows of
    `sizes` rows: the layer's routing and experts, `moe_dispatch.blocked(window_sizes=sizes)`,
    the routing weights. (The balancing loss is left out: no output here depends on it.)"""
    import jax.numpy as jnp

    from minids_jax.model.dispatch import blocked

    batch, length, d = x_BxLxD.shape
    _, weight_TxK, expert_TxK = layer.route(x_BxLxD.reshape(-1, d))
    y_BxLxKxD, _ = blocked(x_BxLxD, expert_TxK.reshape(batch, length, -1), layer.experts(),
                           window_sizes=sizes)
    weight_BxLxK = weight_TxK.reshape(batch, length, -1).astype(y_BxLxKxD.dtype)
    return jnp.einsum("blkd,blk->bld", y_BxLxKxD, weight_BxLxK)


if __name__ == "__main__":
    cli.run(main)  # a user error ends in one line
