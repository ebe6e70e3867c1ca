import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from minids_jax import MiniDeepSeek
from minids_jax.config import OptimConfig
from minids_jax.training import optim
from tests.conftest import small_model_config
from tests.factories import compute_config


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
    model = MiniDeepSeek(small_model_config(), compute_config(), rngs=nnx.Rngs(0))
    cfg = OptimConfig(lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5, clip_norm=0)
    optimizer = nnx.Optimizer(model, optim.optimizer(cfg), wrt=nnx.Param)
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
    tx = optim.optimizer(cfg)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["w"], expected["w"], rtol=1e-6)
    unclipped, _ = reference.update(grads, reference.init(params), params)
    assert not np.allclose(updates["w"], unclipped["w"], rtol=1e-2)


def test_cosine_and_wsd_schedules_warm_up_then_end_at_the_floor():
    common = dict(lr=1e-3, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    cosine = optim.schedule(OptimConfig(schedule="cosine", **common))
    wsd = optim.schedule(OptimConfig(schedule="wsd", decay_fraction=0.2, **common))
    for lr in (cosine, wsd):
        np.testing.assert_allclose(float(lr(0)), 1e-4, rtol=1e-5)  # update 1 of 10 warming up
        np.testing.assert_allclose(float(lr(9)), 1e-3, rtol=1e-5)  # the peak at the warm-up's end
        np.testing.assert_allclose(float(lr(109)), 1e-4, rtol=1e-5)  # the floor at the end
        np.testing.assert_allclose(float(lr(500)), 1e-4, rtol=1e-5)  # and after it
    np.testing.assert_allclose(float(cosine(59)), (1e-4 + 1e-3) / 2, rtol=1e-5)  # half-way
    # wsd: constant until the last 20% of the 100 steps after the warm-up, then linear
    np.testing.assert_allclose([float(wsd(c)) for c in (50, 89, 99)],
                               [1e-3, 1e-3, 1e-3 - 0.9e-3 * 0.5], rtol=1e-5)


def _decay_only_step(name: str):
    """One update with zero gradients: only the weight decay can move a parameter."""
    params = {"kernel": jnp.ones((4, 4)), "scale": jnp.ones(4), "embedding": jnp.ones((8, 4))}
    cfg = OptimConfig(name=name, lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5,
                      clip_norm=0)
    tx = optim.optimizer(cfg)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zeros, tx.init(params), params)
    return optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "muon"])
def test_every_optimizer_decays_matrices_only_and_by_lr_times_rate(name):
    after = _decay_only_step(name)
    lr = float(optim.schedule(OptimConfig(lr=0.1, warmup_steps=0, total_steps=10))(0))
    np.testing.assert_allclose(after["kernel"], 1 - lr * 0.5, rtol=1e-5)  # decoupled, x lr
    np.testing.assert_array_equal(after["scale"], 1.0)
    np.testing.assert_array_equal(after["embedding"], 1.0)


@pytest.mark.parametrize("name", ["adamw", "adafactor", "lion", "muon"])
def test_every_optimizer_lowers_the_loss_of_a_tiny_model(name):
    from minids_jax.training import loss as loss_lib

    model = MiniDeepSeek(small_model_config(n_layers=1, attn_pattern=("mha",)), compute_config(),
                         rngs=nnx.Rngs(0))
    cfg = OptimConfig(name=name, lr=3e-3, warmup_steps=0, total_steps=20)
    optimizer = nnx.Optimizer(model, optim.optimizer(cfg), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, model.cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": jnp.ones((2, 16))}

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(
            lambda m: loss_lib.model_loss(m, batch, 16)[0])(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(5)]
    assert losses[-1] < losses[0] - 0.05, losses
