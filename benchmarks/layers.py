"""Where a train step's time goes: forward+backward of each kind of layer on its own.

    python benchmarks/layers.py --config configs/mini.py --config.model.d_model=256 \
        --config.model.vocab_size=8192 --config.model.max_seq_len=256 \
        --config.model.n_layers=4 --config.model.n_heads=8 --config.model.latent_k=16

Each layer runs on the config's batch (random activations of the model's width), jitted, with
the gradient of its parameters and input; the figure is the best of `--iters` calls. The
head + loss line is the trainer's fused loss (minids_jax/kernels/head_loss.py); `--kernels` and
`--dispatches` compare attention kernels and MoE dispatches side by side (`auto` and `dropless`
name the platform's own, shown after a colon), `--vs_original` times the PyTorch original's
layers at the same sizes (benchmarks/original_layers.py), and `--vs_hf` those of transformers'
DeepseekV3ForCausalLM for a DeepSeek-V3-format config (benchmarks/hf_peer.py --layers).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minids_jax import cli  # noqa: E402  (imports no jax)
# benchmarks/timing.py, beside this file
from timing import hf_config_file, original_environment, peer_environment  # noqa: E402

_CONFIG = cli.define_config_flag("config", "configs/tiny.py")
_ITERS = flags.DEFINE_integer("iters", 7, "Timed calls per layer (the best is reported).")
_KERNELS = flags.DEFINE_list("kernels", None,
                             "Attention kernels, e.g. fused,dot_product_attention (default: the "
                             "config's).")
_DISPATCHES = flags.DEFINE_list("dispatches", None,
                                "MoE dispatches, e.g. dropless,capacity (default: the config's).")
_VS_ORIGINAL = flags.DEFINE_string("vs_original", None,
                                   "Path to the PyTorch original's script, to compare.")
_ORIGINAL_PYTHON = flags.DEFINE_string("original_python", sys.executable,
                                       "Python that has torch, for --vs_original.")
_VS_HF = flags.DEFINE_bool("vs_hf", False, "Also time transformers' DeepseekV3 layers.")
_HF_PYTHON = flags.DEFINE_string("hf_python", sys.executable,
                                 "Python that has torch and transformers, for --vs_hf.")


def time_grad(module, loss_fn, x, iters: int) -> float:
    """Best seconds per call of the jitted gradient of loss_fn(module, x) for module and x."""
    import jax
    from flax import nnx

    graphdef, state = nnx.split(module)
    grad = jax.jit(jax.grad(lambda s, x: loss_fn(nnx.merge(graphdef, s), x), argnums=(0, 1)))
    jax.block_until_ready(grad(state, x))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(grad(state, x))
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv):
    del argv
    from minids_jax import config as config_lib
    from minids_jax import startup

    startup.use_huge_pages(cli.wants_huge_pages(_CONFIG))  # as train.py does, before all else
    config = config_lib.from_config_dict(_CONFIG.value)
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from minids_jax import kernels, sharding
    from minids_jax.kernels.head_loss import head_cross_entropy
    from minids_jax.model import MiniDeepSeek
    from minids_jax.model.attention import MHA
    from minids_jax.model.layers import MLP
    from minids_jax.model.mhla import MHLA
    from minids_jax.model.mla import MLA
    from minids_jax.model.moe import MoE
    from minids_jax.training import optim
    from minids_jax.training.loss import loss_chunk

    cfg, batch = config.model, config.train.batch_size
    platform = sharding.mesh_platform()

    def resolved(**changes):
        """The config's compute with `changes`, its kernel names made concrete for `platform`."""
        return kernels.resolve(dataclasses.replace(config.compute, **changes), platform)

    def named(asked: str, runs: str) -> str:
        """A kernel's label: the name asked for, and what it runs where that differs."""
        return asked if asked == runs else f"{asked}: {runs}"

    keys = jax.random.split(jax.random.key(0), 2)
    x_BxLxD = jax.random.normal(keys[0], (batch, cfg.max_seq_len, cfg.d_model))
    targets_BxL = jax.random.randint(keys[1], x_BxLxD.shape[:2], 0, cfg.vocab_size)
    weights_BxL = jnp.ones(targets_BxL.shape)
    positions_BxL = jnp.broadcast_to(jnp.arange(cfg.max_seq_len), targets_BxL.shape)
    sum_of_squares = lambda out: jnp.sum(jnp.square(out))
    print(f"forward+backward on {batch} x {cfg.max_seq_len} tokens, d_model {cfg.d_model}, "
          f"{jax.devices()[0].platform}")

    def report(name, module, loss_fn):
        print(f"{name:40s} {time_grad(module, loss_fn, x_BxLxD, _ITERS.value) * 1e3:8.1f} ms",
              flush=True)

    with nnx.use_eager_sharding(False):
        for kernel in _KERNELS.value or [config.compute.attention_kernel]:
            compute = resolved(attention_kernel=kernel)
            for cls in (MHA, MHLA, MLA):
                report(f"{cls.__name__} ({named(kernel, compute.attention_kernel)})",
                       cls(cfg, compute, rngs=nnx.Rngs(0)),
                       lambda m, x: sum_of_squares(m(x, positions_BxL)[0]))
        for dispatch in _DISPATCHES.value or [config.compute.moe_dispatch]:
            compute = resolved(moe_dispatch=dispatch)
            report(f"MoE ({named(dispatch, compute.moe_dispatch)})",
                   MoE(cfg, compute, rngs=nnx.Rngs(0)), lambda m, x: sum_of_squares(m(x)[0]))
        if cfg.first_k_dense:
            report(f"MLP (dense, {cfg.dense_mlp_dim} wide)",
                   MLP(cfg.d_model, cfg.dense_mlp_dim, rngs=nnx.Rngs(0),
                       dtype=config.compute.dtype, param_dtype=cfg.param_dtype),
                   lambda m, x: sum_of_squares(m(x)))
        model = MiniDeepSeek(cfg, resolved(), rngs=nnx.Rngs(0))
        chunk = loss_chunk(*targets_BxL.shape, cfg.vocab_size, platform)
        report("head + loss (fused)", model.head, lambda m, x: head_cross_entropy(
            x, m.kernel[...], targets_BxL, weights_BxL, chunk))
        report("head + loss (logits, then optax)", model.head, lambda m, x: jnp.sum(
            optax.softmax_cross_entropy_with_integer_labels(m(x), targets_BxL)))
        optimizer = nnx.Optimizer(model, optim.optimizer(config.optim), wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))
        grads = jax.tree.map(jnp.ones_like, nnx.state(model, nnx.Param))

        @jax.jit
        def update(state, grads):
            model, optimizer = nnx.merge(graphdef, state)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer))

        state = jax.block_until_ready(update(state, grads))
        times = []
        for _ in range(_ITERS.value):
            start = time.perf_counter()
            state = jax.block_until_ready(update(state, grads))
            times.append(time.perf_counter() - start)
        print(f"{'AdamW update (whole model)':40s} {np.min(times) * 1e3:8.1f} ms")
    if _VS_ORIGINAL.value:
        original_layers = Path(__file__).with_name("original_layers.py")
        result = subprocess.run(
            [_ORIGINAL_PYTHON.value, str(original_layers), _VS_ORIGINAL.value, str(_ITERS.value)],
            env=original_environment(config), capture_output=True, text=True)
        print(result.stdout.rstrip() if result.returncode == 0 else
              f"original run failed (does {_ORIGINAL_PYTHON.value} have torch?):\n"
              f"{result.stderr[-1500:]}")
    config_json = hf_config_file(config) if _VS_HF.value else None
    if config_json:
        argv = [_HF_PYTHON.value, str(Path(__file__).with_name("hf_peer.py")), config_json,
                "--batch", str(batch), "--layers", str(_ITERS.value)]
        try:
            result = subprocess.run(argv, env=peer_environment(OMP_WAIT_POLICY="PASSIVE"),
                                    capture_output=True, text=True)
        except OSError as error:
            print(f"transformers run failed: cannot run {argv[0]} ({error})")
            return
        lines = result.stderr.strip().splitlines()
        if result.returncode == 0:
            print(result.stdout.rstrip())
        elif lines and lines[-1].startswith("hf_peer: "):  # its one-line error: no torch, ...
            print(f"transformers run failed: {lines[-1][len('hf_peer: '):]}")
        else:
            print(f"transformers run failed:\n{result.stderr[-1500:]}")


if __name__ == "__main__":
    cli.run(main)  # a user error ends in one line
