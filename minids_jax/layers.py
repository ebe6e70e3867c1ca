"""Building blocks: RMSNorm, rotary position embedding, SwiGLU, and a sharded Linear.

Shapes: B batch, L length, D model width, H heads, Dh head width, F expert hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def mesh_platform(mesh: jax.sharding.AbstractMesh | None = None) -> str:
    """The platform a layer runs on: that of the (context) mesh's devices, else JAX's default
    backend. Layers use it to pick the kernel that is fastest there."""
    mesh = jax.sharding.get_abstract_mesh() if mesh is None else mesh
    device = None if mesh.empty else mesh.abstract_device
    return device.platform if device is not None else jax.default_backend()


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 for stability."""

    def __init__(self, dim: int, *, eps: float, dtype: str = "float32",
                 param_dtype: str = "float32"):
        self.eps = eps
        self.dtype = dtype_of(dtype)
        self.scale = nnx.Param(jnp.ones((dim,), dtype_of(param_dtype)), out_sharding=("norm",))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x_f32 = x_BxLxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True) + self.eps)
        return (x_f32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
           dtype: str, param_dtype: str) -> nnx.Linear:
    """A bias-free Linear whose kernel carries logical axis names for sharding."""
    return nnx.Linear(
        d_in, d_out, use_bias=False, dtype=dtype_of(dtype), param_dtype=dtype_of(param_dtype),
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes), rngs=rngs)


def rope_angles(positions_BxL: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """Rotation angles [B, L, Dh/2]: pair i turns by position * theta^(-2i/Dh)."""
    inv_freq = theta ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    return positions_BxL.astype(jnp.float32)[..., None] * inv_freq


def apply_rope(x_BxLxHxDh: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
    """Rotates the interleaved pairs (x[2i], x[2i+1]) of each head by its position's angle, and
    returns them as halves, as the seed does: out[i] and out[Dh/2 + i] are pair i rotated.

    Applied to q and k (never v) after the per-head projection, so q.k depends only on the
    distance between the two positions (the same reordering of both leaves q.k unchanged).
    Halves, not re-interleaved pairs: 20% less time forward+backward on a CPU, where
    re-interleaving and strided slices cost layout copies.
    """
    angles_BxLx1xP = rope_angles(positions_BxL, x_BxLxHxDh.shape[-1], theta)[:, :, None, :]
    return _rotate_pairs(x_BxLxHxDh, jnp.cos(angles_BxLx1xP), jnp.sin(angles_BxLx1xP))


@jax.custom_vjp
def _rotate_pairs(x_BxLxHxDh, cos_BxLx1xP, sin_BxLx1xP):
    pairs_BxLxHxPx2 = x_BxLxHxDh.astype(jnp.float32).reshape(*x_BxLxHxDh.shape[:-1], -1, 2)
    even, odd = pairs_BxLxHxPx2[..., 0], pairs_BxLxHxPx2[..., 1]
    rotated = jnp.concatenate([even * cos_BxLx1xP - odd * sin_BxLx1xP,
                               even * sin_BxLx1xP + odd * cos_BxLx1xP], axis=-1)
    return rotated.astype(x_BxLxHxDh.dtype)


def _rotate_pairs_fwd(x_BxLxHxDh, cos_BxLx1xP, sin_BxLx1xP):
    return _rotate_pairs(x_BxLxHxDh, cos_BxLx1xP, sin_BxLx1xP), (cos_BxLx1xP, sin_BxLx1xP)


def _rotate_pairs_bwd(residuals, drotated_BxLxHxDh):
    """The inverse rotation, written back as interleaved pairs in one pass (autodiff of the
    strided reads pads each half to full width and adds them: 6-7% of an attention layer)."""
    cos_BxLx1xP, sin_BxLx1xP = residuals
    first, second = jnp.split(drotated_BxLxHxDh.astype(jnp.float32), 2, axis=-1)
    dpairs_BxLxHxPx2 = jnp.stack([first * cos_BxLx1xP + second * sin_BxLx1xP,
                                  second * cos_BxLx1xP - first * sin_BxLx1xP], axis=-1)
    dx_BxLxHxDh = dpairs_BxLxHxPx2.reshape(drotated_BxLxHxDh.shape)
    # The angles come from integer positions: no gradient flows to them.
    return dx_BxLxHxDh.astype(drotated_BxLxHxDh.dtype), None, None


_rotate_pairs.defvjp(_rotate_pairs_fwd, _rotate_pairs_bwd)


def swiglu(x_TxD: jax.Array, w1_DxF: jax.Array, w2_DxF: jax.Array, w3_FxD: jax.Array) -> jax.Array:
    """The seed's SwiGLU expert: w3(silu(w1 x) * w2 x)."""
    return (jax.nn.silu(x_TxD @ w1_DxF) * (x_TxD @ w2_DxF)) @ w3_FxD
