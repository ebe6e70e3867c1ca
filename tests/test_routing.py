"""DeepSeekMoE: group-limited sigmoid routing with a selection bias, shared experts, dense
first layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax import routing
from minids_jax.model import MiniDeepSeek
from minids_jax.moe import MoE, RouterBias
from tests.factories import compute_config, small_model_config

V3_ROUTING = dict(router_scoring="sigmoid", n_experts=8, n_group=4, topk_group=2, top_k=3,
                  norm_topk_prob=True, routed_scaling_factor=2.5)


def slow_route(logits, bias, cfg):
    """Token by token, with Python sorting: the reference's algorithm as written out in
    ../shared/reference (a stable sort breaks ties toward the lower index)."""
    weights, experts = [], []
    for row_logits in np.asarray(logits, np.float64):
        s = 1 / (1 + np.exp(-row_logits))
        biased = s + np.asarray(bias, np.float64)
        size = cfg.n_experts // cfg.n_group
        group_scores = [sum(sorted(biased[g * size:(g + 1) * size], reverse=True)[:2])
                        for g in range(cfg.n_group)]
        kept = sorted(range(cfg.n_group), key=lambda g: (-group_scores[g], g))[:cfg.topk_group]
        allowed = [e for e in range(cfg.n_experts) if e // size in kept]
        chosen = sorted(allowed, key=lambda e: (-biased[e], e))[:cfg.top_k]
        w = s[chosen] / s[chosen].sum() * cfg.routed_scaling_factor
        weights.append(w), experts.append(chosen)
    return np.array(weights), np.array(experts)


def test_group_limited_sigmoid_routing_equals_a_per_token_reference():
    cfg = small_model_config(**V3_ROUTING)
    logits = jax.random.normal(jax.random.key(0), (64, cfg.n_experts))
    # Quantized logits and bias make ties, within and between groups.
    logits = jnp.round(logits * 2) / 2
    bias = jnp.round(jax.random.normal(jax.random.key(1), (cfg.n_experts,)) * 4) / 20
    result = routing.route(logits, bias, cfg)
    weights, experts = slow_route(logits, bias, cfg)
    np.testing.assert_array_equal(result.expert_TxK, experts)
    np.testing.assert_allclose(result.weight_TxK, weights, rtol=1e-6)
    dropped_groups = ~np.asarray(routing.kept_groups(logits + bias, cfg.n_group,
                                                      cfg.topk_group))
    assert dropped_groups.any()  # some good experts were out of reach for their group


def test_the_bias_changes_selection_but_not_the_weights():
    cfg = small_model_config(**V3_ROUTING)
    logits = jax.random.normal(jax.random.key(2), (32, cfg.n_experts))
    plain = routing.route(logits, jnp.zeros(cfg.n_experts), cfg)
    favored = 5
    pushed = routing.route(logits, jnp.zeros(cfg.n_experts).at[favored].set(10.0), cfg)
    assert np.all(np.any(np.asarray(pushed.expert_TxK) == favored, axis=1))
    assert not np.all(np.any(np.asarray(plain.expert_TxK) == favored, axis=1))
    s = jax.nn.sigmoid(logits)
    chosen = np.take_along_axis(np.asarray(s), np.asarray(pushed.expert_TxK), axis=1)
    np.testing.assert_allclose(pushed.weight_TxK, chosen / chosen.sum(1, keepdims=True) * 2.5,
                               rtol=1e-6)


def test_softmax_routing_keeps_the_original_semantics():
    cfg = small_model_config(top_k=1)
    logits = jax.random.normal(jax.random.key(3), (16, cfg.n_experts))
    result = routing.route(logits, None, cfg)
    probs = jax.nn.softmax(logits)
    np.testing.assert_array_equal(result.expert_TxK[:, 0], jnp.argmax(probs, -1))
    np.testing.assert_allclose(result.weight_TxK[:, 0], jnp.max(probs, -1), rtol=1e-6)


def test_shared_experts_see_every_token():
    cfg = small_model_config(**V3_ROUTING, n_shared_experts=2, moe_hidden_dim=16)
    moe = MoE(cfg, compute_config(), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 16, cfg.d_model))
    with_shared = moe(x)[0]
    shared = moe.shared(x)
    assert moe.w1.shape == (cfg.n_experts, cfg.d_model, 16)
    assert moe.shared.w1.kernel.shape == (cfg.d_model, 2 * 16)
    moe.shared = None
    np.testing.assert_allclose(with_shared - moe(x)[0], shared, rtol=1e-5, atol=1e-6)
    assert np.all(np.abs(np.asarray(shared)).sum(-1) > 0)


def test_the_bias_is_state_without_gradient_and_dense_layers_come_first():
    cfg = small_model_config(**V3_ROUTING, n_layers=3, first_k_dense=1, dense_hidden_dim=48)
    model = MiniDeepSeek(cfg, compute_config(), rngs=nnx.Rngs(0))
    assert not hasattr(model.blocks[0], "moe") and model.blocks[0].mlp.w1.kernel.shape[1] == 48
    biases = nnx.state(model, RouterBias)
    assert len(jax.tree.leaves(biases)) == 2  # one per MoE layer
    assert not any("bias" in str(path) for path, _ in nnx.to_flat_state(
        nnx.state(model, nnx.Param)))
    tokens = jnp.arange(32).reshape(2, 16) % cfg.vocab_size
    out = model(tokens)
    assert out.aux["expert_load_NxE"].shape == (2, cfg.n_experts)
    grads = nnx.grad(lambda m: jnp.mean(m(tokens).logits_BxLxV))(model)
    assert len(jax.tree.leaves(nnx.state(grads, RouterBias))) == 0


@pytest.mark.parametrize("overrides", [dict(n_group=3), dict(topk_group=5),
                                       dict(n_group=8)])
def test_routing_config_errors_name_the_fields(overrides):
    from minids_jax.config import ConfigError
    with pytest.raises(ConfigError, match="n_group|topk_group"):
        small_model_config(**{**V3_ROUTING, **overrides})
