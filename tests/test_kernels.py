"""The kernels (minids_jax/kernels/) against autodiff of the plain formulas they replace."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from minids_jax.kernels import attention as fused
from minids_jax.kernels.head_loss import head_cross_entropy
from minids_jax.model import MiniDeepSeek
from minids_jax.training import loss
from tests.factories import compute_config, small_model_config


def _qkv(batch=2, queries=37, sources=37, heads=3, head_dim=8, seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    return (jax.random.normal(keys[0], (batch, queries, heads, head_dim)),
            jax.random.normal(keys[1], (batch, sources, heads, head_dim)),
            jax.random.normal(keys[2], (batch, sources, heads, head_dim)))


def _reference_attention(q, k, v, mask):
    """Plain masked softmax attention, autodiff'd; rows that see nothing set to zero."""
    scores = jnp.einsum("bqhd,bshd->bhqs", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(mask[:, None], scores, -1e30)
    out = jnp.einsum("bhqs,bshd->bqhd", jax.nn.softmax(scores, axis=-1), v)
    return jnp.where(jnp.any(mask, -1)[:, :, None, None], out, 0.0)


def _grads(fn, *args):
    """Value and gradients of a non-linear read-out of fn(*args) (so every path is exercised)."""
    return jax.jit(jax.value_and_grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=(0, 1, 2)))(
        *args)


def test_softmax_attention_matches_reference_values_and_gradients():
    q, k, v = _qkv(queries=11, sources=23)
    mask = jax.random.bernoulli(jax.random.key(7), 0.4, (2, 11, 23)).at[:, :3].set(False)
    value, grads = _grads(lambda *a: fused.softmax_attention(*a, mask), q, k, v)
    ref_value, ref_grads = _grads(lambda *a: _reference_attention(*a, mask), q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=1e-5)
    # Rows that may attend to nothing: exactly zero output, and no gradient through them.
    out = fused.softmax_attention(q, k, v, mask)
    np.testing.assert_array_equal(out[:, :3], 0.0)
    dq = jax.grad(lambda q: jnp.sum(fused.softmax_attention(q, k, v, mask) ** 2))(q)
    assert np.all(np.isfinite(dq))
    np.testing.assert_array_equal(dq[:, :3], 0.0)


@pytest.mark.parametrize("block_rows", [8, 16, 64])  # 37 positions: ragged last block, or one
def test_causal_blocks_match_dot_product_attention(block_rows):
    q, k, v = _qkv()
    value, grads = _grads(lambda *a: fused.causal_attention(*a, block_rows=block_rows), q, k, v)
    ref_value, ref_grads = _grads(
        lambda *a: jax.nn.dot_product_attention(*a, is_causal=True), q, k, v)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=1e-5)


def test_a_query_that_sees_one_key_passes_no_gradient_to_itself():
    """Its output is that key's value whatever the query: the gradient must be exactly 0, not
    rounding noise (causality tests compare influences against exact zeros)."""
    q, k, v = _qkv(queries=1, sources=4)
    mask = jnp.zeros((2, 1, 4), bool).at[:, :, 2].set(True)
    dq = jax.grad(lambda q: jnp.sum(fused.softmax_attention(q, k, v, mask) ** 2))(q)
    np.testing.assert_array_equal(dq, 0.0)


def _head_inputs(batch=2, length=13, width=16, vocab=50):
    keys = jax.random.split(jax.random.key(3), 3)
    x = jax.random.normal(keys[0], (batch, length, width))
    kernel = jax.random.normal(keys[1], (width, vocab)) / np.sqrt(width)
    targets = jax.random.randint(keys[2], (batch, length), 0, vocab)
    weights = jnp.asarray(np.arange(batch * length).reshape(batch, length) % 3 != 0, jnp.float32)
    return x, kernel, targets, weights


@pytest.mark.parametrize("chunk", [1, 4, 13, 64])  # 13 positions: padded chunks, whole, more
def test_head_cross_entropy_matches_autodiff_of_optax(chunk):
    x, kernel, targets, weights = _head_inputs()

    def reference(x, kernel):
        losses = optax.softmax_cross_entropy_with_integer_labels(x @ kernel, targets)
        return 2.5 * jnp.sum(losses * weights)

    def fused_loss(x, kernel):
        return 2.5 * head_cross_entropy(x, kernel, targets, weights, chunk)

    value, grads = jax.value_and_grad(fused_loss, argnums=(0, 1))(x, kernel)
    ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1))(x, kernel)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for grad, ref in zip(grads, ref_grads):
        np.testing.assert_allclose(grad, ref, atol=1e-5)
    # Zero-weight positions get no gradient at all.
    np.testing.assert_array_equal(grads[0][weights == 0], 0.0)
    # Without differentiation the loss alone is computed, and it is the same.
    np.testing.assert_allclose(jax.jit(fused_loss)(x, kernel), ref_value, rtol=1e-5)


def test_model_loss_equals_cross_entropy_of_the_models_logits():
    """The trainer's fused loss is the loss of `model(inputs)`: same value, same gradients."""
    cfg = small_model_config()
    model = MiniDeepSeek(cfg, compute_config(), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, cfg.max_seq_len + 1), 0, cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
             "weights": jnp.ones((2, cfg.max_seq_len)).at[1, :5].set(0.0)}

    def unfused(model):
        logits = model(batch["inputs"]).logits_BxLxV
        return loss.cross_entropy(logits, batch["targets"], batch["weights"])

    value, grads = nnx.jit(nnx.value_and_grad(lambda m: loss.model_loss(m, batch, chunk=5)[0]))(model)
    ref_value, ref_grads = nnx.jit(nnx.value_and_grad(unfused))(model)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for grad, ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(grad, ref, atol=1e-5)


def test_loss_chunks_count_each_devices_share_of_the_batch():
    """Positions per chunk of one device's rows: on a CPU about 2M logits and at least 256 rows;
    elsewhere the whole sequence."""
    assert loss.loss_chunk(8, 256, vocab=8192, platform="cpu") == 32
    assert loss.loss_chunk(8, 256, vocab=32768, platform="cpu") == 32  # at least 256 rows
    assert loss.loss_chunk(8, 256, vocab=2048, platform="cpu") == 128  # about 2M logits
    assert loss.loss_chunk(1, 100, vocab=8192, platform="cpu") == 100  # at most the sequence
    assert loss.loss_chunk(1, 256, vocab=8192, platform="cpu") == 256  # a batch split 8 ways
    assert loss.loss_chunk(8, 4096, vocab=32768, platform="gpu") == 4096
