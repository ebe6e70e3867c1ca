import jax
import jax.numpy as jnp
import numpy as np

from minids_jax.model.layers import RMSNorm
from minids_jax.model.rotary import Rope


def test_rmsnorm_matches_formula():
    norm = RMSNorm(8, eps=1e-5)
    norm.scale[...] = jnp.arange(1.0, 9.0)
    x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3.0
    x_np = np.asarray(x, np.float64)
    expected = x_np / np.sqrt(np.mean(x_np**2, axis=-1, keepdims=True) + 1e-5) * np.arange(1, 9)
    np.testing.assert_allclose(norm(x), expected, rtol=1e-5, atol=1e-6)


def test_rope_scores_depend_only_on_relative_position():
    q = jax.random.normal(jax.random.key(1), (1, 1, 2, 16))
    k = jax.random.normal(jax.random.key(2), (1, 1, 2, 16))

    def score(q_pos, k_pos):
        q_rot = Rope.plain(q.shape[-1])(q, jnp.array([[q_pos]]))
        k_rot = Rope.plain(k.shape[-1])(k, jnp.array([[k_pos]]))
        return jnp.sum(q_rot * k_rot, axis=-1)

    np.testing.assert_allclose(score(7, 3), score(107, 103), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(score(0, 0), jnp.sum(q * k, axis=-1), rtol=1e-5)
    # ...and does depend on the distance, or RoPE would be doing nothing.
    assert not np.allclose(score(7, 3), score(7, 5), atol=1e-3)


def test_rope_rotates_interleaved_pairs_and_keeps_norms():
    x = jax.random.normal(jax.random.key(3), (1, 5, 1, 8))
    positions = jnp.arange(5)[None]
    rotated = Rope.plain(x.shape[-1])(x, positions)
    # Input pair i is (x[2i], x[2i+1]); it comes out as (out[i], out[4 + i]).
    np.testing.assert_allclose(jnp.hypot(rotated[..., :4], rotated[..., 4:]),
                               jnp.hypot(x[..., 0::2], x[..., 1::2]), rtol=1e-5)
    # Pair 0 turns by exactly the position (its frequency is 1).
    angle = jnp.arctan2(rotated[0, :, 0, 4], rotated[0, :, 0, 0]) - jnp.arctan2(x[0, :, 0, 1], x[0, :, 0, 0])
    np.testing.assert_allclose(np.cos(angle), np.cos(np.arange(5)), atol=1e-5)


def test_rope_gradient_is_the_inverse_rotation():
    """The hand-written backward against autodiff of the same rotation written with complex
    numbers: pair (x[2i], x[2i+1]) is x[2i] + i x[2i+1], turned by e^(i angle)."""
    x = jax.random.normal(jax.random.key(4), (2, 6, 3, 8))
    positions = jnp.array([[0, 1, 2, 3, 4, 5], [9, 3, 7, 1, 0, 2]])
    probe = jax.random.normal(jax.random.key(5), x.shape)

    def reference(x):
        inv_freq = 10000.0 ** (-jnp.arange(0, 8, 2) / 8)
        turn = jnp.exp(1j * positions[..., None, None] * inv_freq)
        rotated = (x[..., 0::2] + 1j * x[..., 1::2]) * turn
        return jnp.concatenate([rotated.real, rotated.imag], axis=-1)

    np.testing.assert_allclose(Rope.plain(x.shape[-1])(x, positions), reference(x), atol=1e-5)
    grad = jax.grad(lambda x: jnp.sum(Rope.plain(x.shape[-1])(x, positions) * probe))(x)
    expected = jax.grad(lambda x: jnp.sum(reference(x) * probe))(x)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-5)
