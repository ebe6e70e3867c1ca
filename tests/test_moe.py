import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax.moe import MoE, switch_balancing_loss
from tests.conftest import small_model_config


def per_token_reference(moe: MoE, x_BxLxD):
    """Slow and obvious: each token through its top-k experts, one at a time, in float64."""
    x_TxD = np.asarray(x_BxLxD, np.float64).reshape(-1, x_BxLxD.shape[-1])
    gate = np.asarray(moe.gate.kernel[...], np.float64)
    w1, w2, w3 = (np.asarray(w[...], np.float64) for w in (moe.w1, moe.w2, moe.w3))
    out = np.zeros_like(x_TxD)
    for t, x in enumerate(x_TxD):
        logits = x @ gate
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        chosen = np.argsort(-probs)[:moe.cfg.top_k]
        weights = probs[chosen] / (probs[chosen].sum() if moe.cfg.top_k > 1 else 1.0)
        for e, w in zip(chosen, weights):
            h = x @ w1[e]
            out[t] += w * (((h / (1 + np.exp(-h))) * (x @ w2[e])) @ w3[e])
    return out.reshape(x_BxLxD.shape)


@pytest.mark.parametrize("dispatch", ["dropless", "capacity", "dense"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_equals_per_token_reference(dispatch, top_k):
    cfg = small_model_config(moe_dispatch=dispatch, top_k=top_k, capacity_factor=4.0)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.d_model))
    out, stats = moe(x)
    np.testing.assert_allclose(out, per_token_reference(moe, x), rtol=1e-4, atol=1e-5)
    assert float(stats.dropped_fraction) == 0.0
    np.testing.assert_allclose(float(jnp.sum(stats.load_E)), 1.0, rtol=1e-6)


def test_capacity_dispatch_drops_overflow_and_reports_it():
    cfg = small_model_config(moe_dispatch="capacity", n_experts=2, capacity_factor=0.25)
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 16, cfg.d_model))
    out, stats = moe(x)
    capacity = moe.capacity(16)  # 2 slots per expert per sequence
    _, _, expert_TxK = moe.route(x[0])
    expert_T = np.asarray(expert_TxK[:, 0])
    reference = per_token_reference(moe, x)[0]
    for e in range(2):
        tokens = np.flatnonzero(expert_T == e)
        kept, dropped = tokens[:capacity], tokens[capacity:]
        np.testing.assert_allclose(out[0, kept], reference[kept], rtol=1e-4, atol=1e-5)
        np.testing.assert_array_equal(out[0, dropped], 0.0)
    expected_dropped = 1 - sum(min(capacity, np.sum(expert_T == e)) for e in range(2)) / 16
    np.testing.assert_allclose(float(stats.dropped_fraction), expected_dropped)


def test_router_receives_gradient():
    cfg = small_model_config()
    moe = MoE(cfg, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.d_model))
    # Only the expert output, no balancing loss: the gate must learn through the routing weight.
    grads = nnx.grad(lambda m: jnp.sum(m(x)[0] ** 2))(moe)
    assert float(jnp.max(jnp.abs(grads["gate"]["kernel"][...]))) > 1e-6


def test_balancing_loss_is_minimal_for_uniform_routing():
    n_experts, tokens = 4, 64
    uniform_probs = jnp.full((tokens, n_experts), 1 / n_experts)
    balanced_choice = jnp.arange(tokens)[:, None] % n_experts
    loss_uniform, load = switch_balancing_loss(uniform_probs, balanced_choice, n_experts)
    np.testing.assert_allclose(float(loss_uniform), 1.0, rtol=1e-6)
    np.testing.assert_allclose(load, 0.25)
    skewed_probs = jax.nn.softmax(jax.random.normal(jax.random.key(0), (tokens, n_experts)) * 3)
    skewed_choice = jnp.argmax(skewed_probs, -1)[:, None]
    loss_skewed, _ = switch_balancing_loss(skewed_probs, skewed_choice, n_experts)
    collapsed, _ = switch_balancing_loss(jnp.eye(n_experts)[jnp.zeros(tokens, int)],
                                         jnp.zeros((tokens, 1), int), n_experts)
    assert float(loss_skewed) > 1.0
    np.testing.assert_allclose(float(collapsed), n_experts)
