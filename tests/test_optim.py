import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from minids_jax import MiniDeepSeek, optim
from minids_jax.config import OptimConfig
from tests.conftest import small_model_config


def seed_lr(cfg: OptimConfig, s: int) -> float:
    """The seed's formula, with s counted from 1 at the first update."""
    if s < cfg.warmup_steps:
        return cfg.lr * s / cfg.warmup_steps
    return cfg.lr * (1 - s / cfg.total_steps)


@pytest.mark.parametrize("warmup", [0, 1, 100])
def test_schedule_matches_the_seed(warmup):
    cfg = OptimConfig(lr=3e-4, warmup_steps=warmup, total_steps=1000)
    lr = optim.schedule(cfg)
    for s in sorted({1, 2, max(warmup - 1, 1), warmup or 1, warmup + 1, 500, 999, 1000}):
        np.testing.assert_allclose(float(lr(s - 1)), seed_lr(cfg, s), rtol=1e-5, atol=1e-6 * cfg.lr,
                                   err_msg=f"update {s}")


def test_weight_decay_skips_norms_embeddings_and_latents():
    model = MiniDeepSeek(small_model_config(), rngs=nnx.Rngs(0))
    cfg = OptimConfig(lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, clip_norm=0)
    optimizer = nnx.Optimizer(model, optim.adamw(cfg), wrt=nnx.Param)
    before = jax.tree.map(jnp.copy, nnx.state(model, nnx.Param))
    zero_grads = jax.tree.map(jnp.zeros_like, before)
    optimizer.update(model, zero_grads)  # with zero gradients only weight decay moves a weight
    after = nnx.state(model, nnx.Param)
    moved = {jax.tree_util.keystr(path): not np.allclose(a, b)
             for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(after),
                                     jax.tree.leaves(before))}
    for path, did_move in moved.items():
        frozen = any(name in path for name in ("scale", "embedding", "latents"))
        assert did_move != frozen, path
    assert moved["['head']['kernel'].value"] and moved["['blocks'][0]['moe']['w1'].value"]


def test_gradients_are_clipped_to_the_global_norm():
    # A large eps makes Adam's first step depend on the gradient's scale, so clipping shows.
    cfg = OptimConfig(lr=1.0, warmup_steps=0, total_steps=10, weight_decay=0.0, clip_norm=1.0,
                      eps=1.0)
    params = {"w": jnp.ones(4)}
    grads = {"w": jnp.array([10.0, -20.0, 0.0, 5.0])}
    norm = float(jnp.linalg.norm(grads["w"]))
    reference = optax.adam(optim.schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
    expected, _ = reference.update({"w": grads["w"] / norm}, reference.init(params), params)
    tx = optim.adamw(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    unclipped, _ = reference.update(grads, reference.init(params), params)
    assert not np.allclose(updates["w"], unclipped["w"], rtol=1e-2)
