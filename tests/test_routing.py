"""DeepSeekMoE: group-limited sigmoid routing with a selection bias, shared experts, dense
first layers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax.model import MiniDeepSeek, routing
from minids_jax.model.moe import MoE, RouterBias
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


def test_sigmoid_routing_normalizes_a_single_expert_too():
    """transformers' DeepseekV3TopkRouter and the official Gate divide by the sum for any k:
    with one expert its weight is routed_scaling_factor, whatever its affinity."""
    cfg = small_model_config(**{**V3_ROUTING, "top_k": 1})
    logits = jax.random.normal(jax.random.key(5), (16, cfg.n_experts))
    result = routing.route(logits, jnp.zeros(cfg.n_experts), cfg)
    np.testing.assert_allclose(result.weight_TxK, 2.5, rtol=1e-6)
    weights, experts = slow_route(logits, jnp.zeros(cfg.n_experts), cfg)
    np.testing.assert_array_equal(result.expert_TxK, experts)
    np.testing.assert_allclose(result.weight_TxK, weights, rtol=1e-6)


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

    @nnx.jit  # one program: eager, each op would compile on its own
    def load_and_grads(model):
        load_NxE = model(tokens).aux["expert_load_NxE"]
        return load_NxE, nnx.grad(lambda m: jnp.mean(m(tokens).logits_BxLxV))(model)

    load_NxE, grads = load_and_grads(model)
    assert load_NxE.shape == (2, cfg.n_experts)
    assert len(jax.tree.leaves(nnx.state(grads, RouterBias))) == 0


@pytest.mark.parametrize("overrides", [dict(n_group=3), dict(topk_group=5),
                                       dict(n_group=8)])
def test_routing_config_errors_name_the_fields(overrides):
    from minids_jax.config import ConfigError
    with pytest.raises(ConfigError, match="n_group|topk_group"):
        small_model_config(**{**V3_ROUTING, **overrides})


def test_sequence_balance_loss_follows_the_paper():
    """sum_e f_e P_e per sequence: 1 when every sequence spreads evenly, E when one expert
    takes everything and holds all the probability."""
    from minids_jax.model.moe import sequence_balancing_loss

    experts, length = 4, 8
    even_BxLxK = jnp.tile(jnp.arange(experts), (1, length // experts))[..., None]
    uniform = jnp.full((1, length, experts), 1 / experts)
    assert float(sequence_balancing_loss(uniform, even_BxLxK, experts)) == pytest.approx(1.0)
    one_BxLxK = jnp.zeros((1, length, 1), jnp.int32)
    all_on_one = jax.nn.one_hot(jnp.zeros((1, length), jnp.int32), experts)
    assert float(sequence_balancing_loss(all_on_one, one_BxLxK, experts)) == pytest.approx(4.0)


def skewed_trainer(tmp_path=None, steps=60, **train):
    """A v3-like tiny run whose router starts badly skewed towards expert 0 (its bias is 0.5
    ahead, where sigmoid scores differ by about 0.1), with the learning rate near zero so
    that only the bias update can fix it."""
    from minids_jax.training import trainer as trainer_lib
    from tests.factories import tiny_config

    config = tiny_config(model=dict(n_experts=4, top_k=1, router_scoring="sigmoid",
                                    n_shared_experts=1),
                         optim=dict(lr=1e-9, warmup_steps=0, total_steps=steps),
                         train=dict(log_every=10, eval_batches=1, **train))
    run = trainer_lib.Trainer(config, None if tmp_path is None else str(tmp_path))
    state = run.state
    bias = state.model["blocks"][0]["moe"]["bias"]
    bias[...] = bias[...].at[0].set(0.5)
    run.state = state
    return run


@pytest.mark.slow  # trains end to end
def test_the_bias_update_balances_a_skewed_router():
    frozen = skewed_trainer(router_bias_rate=0.0).train()
    moving = skewed_trainer(router_bias_rate=0.02).train()
    first = lambda h: [r for r in h if "expert_load" in r][0]  # noqa: E731
    last = lambda h: [r for r in h if "expert_load" in r][-1]  # noqa: E731
    assert np.max(first(frozen)["expert_load"]) > 0.95  # expert 0 takes the tokens at first
    assert np.max(first(moving)["expert_load"]) > 0.6  # (after ten corrections, most of them)
    assert np.max(last(frozen)["expert_load"]) > 0.8  # and keeps them without the update
    assert np.max(last(moving)["expert_load"]) < 0.45  # the bias spread them
    assert last(moving)["router_bias_max"] < 0.5 and last(moving)["router_bias_min"] > 0.0
    assert (last(frozen)["router_bias_max"], last(frozen)["router_bias_min"]) == (0.5, 0.0)


@pytest.mark.slow  # trains end to end
def test_resume_after_bias_updates_is_exact(tmp_path, compile_cache):  # 3 runs, one program
    from minids_jax import checkpoint

    straight = skewed_trainer(tmp_path / "straight", steps=20, router_bias_rate=0.01)
    straight.train()
    first_half = skewed_trainer(tmp_path / "resumed", steps=20, router_bias_rate=0.01)
    first_half.train_step = _stop_after(first_half.train_step, 11)  # saved at 9, then 11 made
    with pytest.raises(KeyboardInterrupt):
        first_half.train()
    resumed = skewed_trainer(tmp_path / "resumed", steps=20, router_bias_rate=0.01)
    resumed.train()
    assert checkpoint.resolve(tmp_path / "resumed")[1] == 20
    for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(straight.state.model)),
                    jax.tree.leaves(nnx.to_pure_dict(resumed.state.model))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    biases = nnx.to_pure_dict(resumed.state.model)["blocks"][0]["moe"]["bias"]
    assert np.abs(np.asarray(biases)).max() > 0


def _stop_after(step_fn, steps):
    calls = []

    def step(state, batch):
        calls.append(1)
        if len(calls) > steps:
            raise KeyboardInterrupt  # a crash after `steps` steps
        return step_fn(state, batch)

    return step
