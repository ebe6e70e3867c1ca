"""RoPE's rotation of interleaved pairs, with a hand-written backward.

The forward reads the pairs (x[2i], x[2i+1]) and returns them rotated as halves (out[i] and
out[Dh/2 + i] are pair i), as the original does; the backward writes the inverse rotation back
as interleaved pairs in one pass, where autodiff of the strided reads would pad each half to
full width and add them.

Shapes: B batch, L length, H heads, Dh head width, P pairs (Dh/2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.custom_vjp
def rotate_pairs(x_BxLxHxDh, cos_BxLx1xP, sin_BxLx1xP):
    pairs_BxLxHxPx2 = x_BxLxHxDh.astype(jnp.float32).reshape(*x_BxLxHxDh.shape[:-1], -1, 2)
    even, odd = pairs_BxLxHxPx2[..., 0], pairs_BxLxHxPx2[..., 1]
    rotated = jnp.concatenate([even * cos_BxLx1xP - odd * sin_BxLx1xP,
                               even * sin_BxLx1xP + odd * cos_BxLx1xP], axis=-1)
    return rotated.astype(x_BxLxHxDh.dtype)


def _rotate_pairs_fwd(x_BxLxHxDh, cos_BxLx1xP, sin_BxLx1xP):
    return rotate_pairs(x_BxLxHxDh, cos_BxLx1xP, sin_BxLx1xP), (cos_BxLx1xP, sin_BxLx1xP)


def _rotate_pairs_bwd(residuals, drotated_BxLxHxDh):
    cos_BxLx1xP, sin_BxLx1xP = residuals
    first, second = jnp.split(drotated_BxLxHxDh.astype(jnp.float32), 2, axis=-1)
    dpairs_BxLxHxPx2 = jnp.stack([first * cos_BxLx1xP + second * sin_BxLx1xP,
                                  second * cos_BxLx1xP - first * sin_BxLx1xP], axis=-1)
    dx_BxLxHxDh = dpairs_BxLxHxPx2.reshape(drotated_BxLxHxDh.shape)
    # The angles come from integer positions: no gradient flows to them.
    return dx_BxLxHxDh.astype(drotated_BxLxHxDh.dtype), None, None


rotate_pairs.defvjp(_rotate_pairs_fwd, _rotate_pairs_bwd)
