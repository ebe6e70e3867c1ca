"""Building blocks: RMSNorm, SwiGLU, and a sharded Linear (RoPE is rotary.py's).

Shapes: B batch, L length, D model width, H heads, Dh head width, F expert hidden width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx


class RMSNorm(nnx.Module):
    """y = x / sqrt(mean(x^2) + eps) * scale, computed in float32 for stability."""

    def __init__(self, dim: int, *, eps: float, dtype: str = "float32",
                 param_dtype: str = "float32"):
        self.eps = eps
        self.dtype = jnp.dtype(dtype)
        self.scale = nnx.Param(jnp.ones((dim,), jnp.dtype(param_dtype)), out_sharding=("norm",))

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        x_f32 = x_BxLxD.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x_f32), axis=-1, keepdims=True) + self.eps)
        return (x_f32 * inv_rms * self.scale[...].astype(jnp.float32)).astype(self.dtype)


class Linear(nnx.Module):
    """y = x @ kernel, bias-free, the kernel [in, out] carrying logical axis names; with
    adapters (lora.py) also + scale * (x @ lora_a) @ lora_b."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *,
                 rngs: nnx.Rngs, dtype: str, param_dtype: str):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), jnp.dtype(param_dtype)))
        self.dtype, self.axes = jnp.dtype(dtype), axes
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)  # adapters (lora.py)
        self.lora_scale = 0.0

    def weight(self) -> jax.Array:
        """The kernel the layer applies: with adapters, kernel + scale * lora_a @ lora_b."""
        if self.lora_a is None:
            return self.kernel[...]
        delta = (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))
        return (self.kernel[...] + self.lora_scale * delta).astype(self.kernel.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        y = x @ self.kernel[...].astype(self.dtype)
        if self.lora_a is None:
            return y
        low_rank = (x @ self.lora_a[...].astype(self.dtype)) @ self.lora_b[...].astype(self.dtype)
        return y + self.lora_scale * low_rank


def linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
           dtype: str, param_dtype: str) -> Linear:
    return Linear(d_in, d_out, axes, rngs=rngs, dtype=dtype, param_dtype=param_dtype)


def swiglu(x_TxD: jax.Array, w1_DxF: jax.Array, w2_DxF: jax.Array, w3_FxD: jax.Array) -> jax.Array:
    """The original's SwiGLU expert: w3(silu(w1 x) * w2 x)."""
    return (jax.nn.silu(x_TxD @ w1_DxF) * (x_TxD @ w2_DxF)) @ w3_FxD


class MLP(nnx.Module):
    """A dense SwiGLU, w3(silu(w1 x) * w2 x): DeepSeek-V3's first dense layers and its shared
    experts (HF gate_proj = w1, up_proj = w2, down_proj = w3, transposed)."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype: str,
                 param_dtype: str):
        make = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.w1 = linear(d_model, hidden, ("embed", "mlp"), **make)
        self.w2 = linear(d_model, hidden, ("embed", "mlp"), **make)
        self.w3 = linear(hidden, d_model, ("mlp", "embed"), **make)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.w3(jax.nn.silu(self.w1(x_BxLxD)) * self.w2(x_BxLxD))
