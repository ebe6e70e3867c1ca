"""Building blocks: RMSNorm, SwiGLU, a sharded Linear, its adapters' dropout (RoPE: rotary.py).

Shapes: B batch, L length, D model width, H heads, Dh head width, F expert hidden width.
"""

from __future__ import annotations

import contextlib
import contextvars

import jax
import jax.numpy as jnp
from flax import nnx

from minids_jax.model.quant import is_quantized, quantized_matmul


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
    """y = x @ kernel (+ bias if it has one), the kernel [in, out] carrying logical axis
    names; with adapters (lora.py) also + scale * (x @ lora_a) @ lora_b. A frozen kernel may
    be stored quantized (quant.py): reading it dequantizes."""

    def __init__(self, d_in: int, d_out: int, axes: tuple[str | None, str | None], *,
                 rngs: nnx.Rngs, dtype: str, param_dtype: str, bias: bool = False):
        init = nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)
        self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out), jnp.dtype(param_dtype)))
        self.bias = nnx.data(nnx.Param(jnp.zeros((d_out,), jnp.dtype(param_dtype)),
                                       out_sharding=(axes[1],)) if bias else None)
        self.dtype, self.axes = jnp.dtype(dtype), axes
        self.lora_a, self.lora_b = nnx.data(None), nnx.data(None)  # adapters (lora.py)
        self.lora_scale = 0.0

    def weight(self) -> jax.Array:
        """The kernel the layer applies: with adapters, kernel + scale * lora_a @ lora_b."""
        if self.lora_a is None:
            return self.kernel[...]
        delta = (self.lora_a[...].astype(jnp.float32) @ self.lora_b[...].astype(jnp.float32))
        return (self.kernel[...] + self.lora_scale * delta).astype(self.kernel.dtype)

    def as_one_matmul(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x', kernel') with x' @ kernel' = self(x), for callers that apply the kernel
        themselves (the chunked head loss): the merged weight, or under adapter dropout the
        adapter's path as R more input features, [x, scale * drop(x) @ lora_a] @ [kernel;
        lora_b]."""
        dropped = adapter_input(x) if self.lora_a is not None else x
        if dropped is x:
            return x, self.weight()
        low_rank = self.lora_scale * (dropped @ self.lora_a[...].astype(x.dtype))
        return (jnp.concatenate([x, low_rank.astype(x.dtype)], axis=-1),
                jnp.concatenate([self.kernel[...], self.lora_b[...].astype(self.kernel.dtype)]))

    def __call__(self, x: jax.Array) -> jax.Array:
        # As one [tokens, in] matrix: autodiff of a matmul over [B, L, in] contracts two axes
        # for the kernel's gradient, which XLA's CPU backend lays out through a transposed
        # copy fused with whatever produced the gradient (docs/performance.md measures it).
        x_NxI = x.astype(self.dtype).reshape(-1, x.shape[-1])
        if is_quantized(self.kernel):
            y_NxO = quantized_matmul(x_NxI, self.kernel, self.dtype)
        else:
            y_NxO = x_NxI @ self.kernel[...].astype(self.dtype)
        if self.lora_a is not None:
            low_rank_NxO = (adapter_input(x_NxI) @ self.lora_a[...].astype(self.dtype)) @ \
                self.lora_b[...].astype(self.dtype)
            y_NxO = y_NxO + self.lora_scale * low_rank_NxO
        if self.bias is not None:
            y_NxO = y_NxO + self.bias[...].astype(self.dtype)
        return y_NxO.reshape(*x.shape[:-1], y_NxO.shape[-1])


class _AdapterDropout:
    """The adapter dropout of one traced training forward: its rate, and a key per call."""

    def __init__(self, key: jax.Array, rate: float):
        self.key, self.rate, self.calls = key, rate, 0

    def next_key(self) -> jax.Array:
        self.calls += 1
        return jax.random.fold_in(self.key, self.calls)


_ADAPTER_DROPOUT: contextvars.ContextVar = contextvars.ContextVar("adapter_dropout",
                                                                  default=None)


@contextlib.contextmanager
def adapter_dropout(key: jax.Array | None, rate: float):
    """Within, every adapter's input drops `rate` of its entries and scales the rest by
    1 / (1 - rate) (PEFT's lora_dropout): a training forward. A context rather than an
    argument because the forward reaches the adapters through every layer kind; it is read
    while the step is traced. Off with no key or a zero rate."""
    scope = _AdapterDropout(key, rate) if key is not None and rate > 0 else None
    token = _ADAPTER_DROPOUT.set(scope)
    try:
        yield
    finally:
        _ADAPTER_DROPOUT.reset(token)


@contextlib.contextmanager
def adapter_dropout_of_layer(layer):
    """Within, the adapters draw the masks of block `layer` (an int, or a scan's traced
    index): the same whether the blocks run as a loop or as a scan."""
    scope = _ADAPTER_DROPOUT.get()
    if scope is None:
        yield
        return
    with adapter_dropout(jax.random.fold_in(jax.random.fold_in(scope.key, 0), layer),
                         scope.rate):
        yield


def adapter_input(x: jax.Array) -> jax.Array:
    """x as an adapter reads it: with entries dropped inside `adapter_dropout`."""
    scope = _ADAPTER_DROPOUT.get()
    if scope is None:
        return x
    keep = jax.random.bernoulli(scope.next_key(), 1.0 - scope.rate, x.shape)
    return jnp.where(keep, x / (1.0 - scope.rate), 0).astype(x.dtype)


def linear(d_in: int, d_out: int, axes: tuple[str | None, str | None], *, rngs: nnx.Rngs,
           dtype: str, param_dtype: str, bias: bool = False) -> Linear:
    return Linear(d_in, d_out, axes, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                  bias=bias)


def swiglu(x_TxD: jax.Array, w1_DxF: jax.Array, w2_DxF: jax.Array, w3_FxD: jax.Array) -> jax.Array:
    """The original's SwiGLU expert: w3(silu(w1 x) * w2 x)."""
    return (jax.nn.silu(x_TxD @ w1_DxF) * (x_TxD @ w2_DxF)) @ w3_FxD


class MLP(nnx.Module):
    """A dense SwiGLU, w3(silu(w1 x) * w2 x): DeepSeek-V3's first dense layers and its shared
    experts (HF gate_proj = w1, up_proj = w2, down_proj = w3, transposed)."""

    def __init__(self, d_model: int, hidden: int, *, rngs: nnx.Rngs, dtype: str,
                 param_dtype: str, bias: bool = False):
        make = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, bias=bias)
        self.w1 = linear(d_model, hidden, ("embed", "mlp"), **make)
        self.w2 = linear(d_model, hidden, ("embed", "mlp"), **make)
        self.w3 = linear(hidden, d_model, ("mlp", "embed"), **make)

    def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
        return self.w3(jax.nn.silu(self.w1(x_BxLxD)) * self.w2(x_BxLxD))
