import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax import kernels
from minids_jax.config import ComputeConfig
from minids_jax.kernels.moe_windows import window_layout, window_rows
from minids_jax.model import dispatch as moe_dispatch
from minids_jax.model.moe import MoE, switch_balancing_loss
from tests.factories import compute_config, small_model_config


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


@pytest.mark.parametrize("dispatch", ["dropless", "ragged", "blocked", "capacity", "dense"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_equals_per_token_reference(dispatch, top_k):
    cfg = small_model_config(top_k=top_k)
    moe = MoE(cfg, compute_config(moe_dispatch=dispatch, capacity_factor=4.0), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.d_model))
    out, stats = moe(x)
    np.testing.assert_allclose(out, per_token_reference(moe, x), rtol=1e-4, atol=1e-5)
    assert float(stats.dropped_fraction) == 0.0
    np.testing.assert_allclose(float(jnp.sum(stats.load_E)), 1.0, rtol=1e-6)


@pytest.mark.parametrize("dispatch", ["dropless", "ragged", "blocked", "dense"])
@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_equals_reference_when_one_expert_takes_every_token(dispatch, top_k):
    # A constant feature and a gate that favours expert 0, then expert 1: expert 0 gets every
    # token (as first choice), experts 2 and 3 get none (top_k=1: only expert 0 gets any).
    cfg = small_model_config(top_k=top_k)
    moe = MoE(cfg, compute_config(moe_dispatch=dispatch), rngs=nnx.Rngs(0))
    moe.gate.kernel[...] = moe.gate.kernel[...].at[0].set(jnp.array([20.0, 10.0, 0.0, 0.0]))
    x = jax.random.normal(jax.random.key(1), (2, 16, cfg.d_model)).at[..., 0].set(1.0)
    out, stats = moe(x)
    np.testing.assert_allclose(stats.load_E, [1.0, 0, 0, 0] if top_k == 1 else [0.5, 0.5, 0, 0])
    np.testing.assert_allclose(out, per_token_reference(moe, x), rtol=1e-4, atol=1e-5)


def test_platform_names_resolve_once_into_concrete_kernels():
    def resolved(platform, **fields):
        compute = kernels.resolve(ComputeConfig(**fields), platform)
        return compute.attention_kernel, compute.moe_dispatch

    assert resolved("cpu") == ("fused", "blocked")
    assert resolved("gpu") == resolved("tpu") == ("dot_product_attention", "ragged")
    # cuDNN's flash attention takes half precision only; jax would pick XLA's unless told
    assert resolved("gpu", dtype="bfloat16") == ("cudnn", "ragged")
    assert resolved("tpu", dtype="bfloat16") == ("dot_product_attention", "ragged")
    assert resolved("cpu", moe_dispatch="capacity", attention_kernel="dot_product_attention") == (
        "dot_product_attention", "capacity")
    with pytest.raises(ValueError, match="resolve it"):  # a model never guesses the platform
        MoE(small_model_config(), ComputeConfig(), rngs=nnx.Rngs(0))


def _routings(tokens, n_experts, top_k):
    """Expert choices [T, k] (distinct per token): random, all to one expert, two left empty."""
    scores = jax.random.uniform(jax.random.key(3), (tokens, n_experts))
    random = jnp.argsort(scores, axis=-1)[:, :top_k]
    one_takes_all = (jnp.arange(top_k)[None, :] + jnp.zeros((tokens, 1), int)) + 1
    two_empty = jnp.where(random % 2 == 0, random + 1, random)  # only odd experts
    two_empty = two_empty.at[:, 1:].set(jnp.where(two_empty[:, :1] == 1, 3, 1)) if top_k > 1 \
        else two_empty
    return {"random": random, "one_takes_all": one_takes_all, "two_empty": two_empty}


# None: the default windows; (1,): one row per window; (20, 10, 5): groups padded to 5 rows
# and windows of three sizes.
@pytest.mark.parametrize("sizes", [None, (1,), (20, 10, 5)])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("routing", ["random", "one_takes_all", "two_empty"])
def test_blocked_dispatch_matches_dense_in_output_and_gradients(routing, top_k, sizes):
    cfg = small_model_config(n_experts=4, top_k=top_k)
    moe = MoE(cfg, compute_config(), rngs=nnx.Rngs(0))
    tokens = 24
    expert_TxK = _routings(tokens, cfg.n_experts, top_k)[routing]
    assert bool(jnp.all(jnp.sort(expert_TxK, -1)[:, 1:] != jnp.sort(expert_TxK, -1)[:, :-1]))
    x_TxD = jax.random.normal(jax.random.key(1), (tokens, cfg.d_model))
    probe = jax.random.normal(jax.random.key(2), (tokens, top_k, cfg.d_model))

    def outputs(dispatch, x, experts):  # one sequence of `tokens` tokens
        return dispatch(x[None], expert_TxK[None], experts)[0][0]

    def loss(dispatch, x, experts):
        return jnp.sum(outputs(dispatch, x, experts) * probe)

    def blocked(x, expert, experts):
        return moe_dispatch.blocked(x, expert, experts, window_sizes=sizes)

    experts = moe.experts()
    for dispatch in (blocked, moe_dispatch.ragged) if sizes is None else (blocked,):
        np.testing.assert_allclose(outputs(dispatch, x_TxD, experts),
                                   outputs(moe_dispatch.dense, x_TxD, experts),
                                   rtol=1e-5, atol=1e-6)
        grads = jax.grad(loss, argnums=(1, 2))(dispatch, x_TxD, experts)
        expected = jax.grad(loss, argnums=(1, 2))(moe_dispatch.dense, x_TxD, experts)
        # Weight gradients sum over every token an expert takes (all of them in one_takes_all).
        for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(expected)):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sizes", [(1,), (3,), (8, 4, 2), (12, 6, 3)])
def test_windows_tile_each_expert_group_in_order(sizes):
    n_experts = 5
    expert_A = jnp.array([4, 0, 4, 4, 2, 0, 4, 4, 4, 0, 2, 4, 4, 4, 4, 4, 4])  # 1 and 3: none
    layout = window_layout(expert_A, n_experts, sizes)
    assignments, unit = len(expert_A), sizes[-1]
    assignment_R = np.asarray(layout.assignment_R)
    row_A = np.asarray(layout.row_A)
    # Every assignment sits in exactly one row; rows of one expert keep the assignments' order.
    np.testing.assert_array_equal(assignment_R[row_A], np.arange(assignments))
    assert np.sum(assignment_R < assignments) == assignments
    for e in range(n_experts):
        assert np.all(np.diff(row_A[np.asarray(expert_A) == e]) > 0)
    # The windows in use cover each expert's rows, padded to whole units, exactly once, and
    # hold no row of another expert; the largest windows come first within each group.
    expert_of_row = np.full(len(assignment_R), -1)
    for size, first_W, expert_W, used in zip(sizes, layout.first_rows, layout.experts,
                                             layout.windows_used):
        for first, e in zip(np.asarray(first_W)[:int(used)], np.asarray(expert_W)[:int(used)]):
            assert np.all(expert_of_row[first:first + size] == -1), "windows overlap"
            expert_of_row[first:first + size] = e
    np.testing.assert_array_equal(expert_of_row[row_A], expert_A)
    group_sizes = -(-np.bincount(expert_A, minlength=n_experts) // unit) * unit
    np.testing.assert_array_equal(np.bincount(expert_of_row[expert_of_row >= 0],
                                              minlength=n_experts), group_sizes)
    largest = sizes[0]
    assert int(layout.windows_used[0]) == np.sum(group_sizes // largest)


def test_window_rows_halve_from_an_experts_share_down_to_64():
    assert window_rows(1024, 4) == (256, 128, 64)
    assert window_rows(2048, 4) == (512, 256, 128, 64)
    assert window_rows(65536, 2) == (512, 256, 128, 64)  # capped at 512
    assert window_rows(48, 4) == (8,)  # tiny batches: one size, at least 8 rows
    with pytest.raises(ValueError, match="halve"):
        window_layout(jnp.zeros(4, jnp.int32), 2, (8, 3))


def test_capacity_dispatch_drops_overflow_and_reports_it():
    cfg = small_model_config(n_experts=2)
    moe = MoE(cfg, compute_config(moe_dispatch="capacity", capacity_factor=0.25),
              rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 16, cfg.d_model))
    out, stats = moe(x)
    capacity = moe_dispatch.capacity_per_sequence(16, 1, 2, 0.25)
    assert capacity == 2  # slots per expert per sequence
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
    moe = MoE(cfg, compute_config(), rngs=nnx.Rngs(0))
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


def test_the_router_stays_float32_whatever_the_parameters_dtype():
    """transformers keeps the router in float32: with bfloat16 parameters the gate kernel and
    the correction bias are float32, and route as a float32 model's router does."""
    cfg = small_model_config(router_scoring="sigmoid", n_experts=8, top_k=2, n_group=2,
                             topk_group=1)
    compute = compute_config(dtype="bfloat16")
    half = MoE(dataclasses.replace(cfg, param_dtype="bfloat16"), compute, rngs=nnx.Rngs(0))
    full = MoE(cfg, compute, rngs=nnx.Rngs(0))
    assert half.gate.kernel.dtype == half.bias.dtype == jnp.float32
    assert half.w1.dtype == jnp.bfloat16  # the experts follow param_dtype
    bias_E = jax.random.normal(jax.random.key(2), (cfg.n_experts,)) * 0.01
    half.bias[...], full.bias[...] = bias_E, bias_E
    x_TxD = jax.random.normal(jax.random.key(1), (4096, cfg.d_model))
    ours, reference = half.route(x_TxD), full.route(x_TxD)
    np.testing.assert_array_equal(ours.expert_TxK, reference.expert_TxK)
    np.testing.assert_array_equal(ours.weight_TxK, reference.weight_TxK)
