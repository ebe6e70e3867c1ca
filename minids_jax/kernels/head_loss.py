"""The output head fused with its cross-entropy, in chunks of positions.

`head_cross_entropy` computes d(logits) in the forward pass, chunk by chunk, so the [B, L, V]
logits never exist at once and each chunk's softmax is read once while still in cache. Exact:
the numbers of autodiff of `optax.softmax_cross_entropy_with_integer_labels` on the logits.

Shapes: B batch, L length, D model width, V vocab, C positions per chunk, N chunks.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

f32 = jnp.float32


def _head_loss_chunk(x_BxCxD, kernel_DxV, targets_BxC, weights_BxC, with_grad: bool):
    """Weighted cross-entropy sum of one chunk and, if asked, its gradients for x and kernel."""
    # Its positions as rows of one matrix: a kernel gradient contracting two axes (batch,
    # position) goes through a transposed copy on XLA's CPU backend.
    x_NxD, targets_N, weights_N = (x_BxCxD.reshape(-1, x_BxCxD.shape[-1]),
                                   targets_BxC.reshape(-1), weights_BxC.reshape(-1))
    logits_NxV = jnp.matmul(x_NxD, kernel_DxV, preferred_element_type=f32)
    max_Nx1 = jnp.max(logits_NxV, axis=-1, keepdims=True)
    exp_NxV = jnp.exp(logits_NxV - max_Nx1)
    total_Nx1 = jnp.sum(exp_NxV, axis=-1, keepdims=True)
    is_target_NxV = jnp.arange(logits_NxV.shape[-1]) == targets_N[:, None]
    target_logit_N = jnp.sum(jnp.where(is_target_NxV, logits_NxV, 0.0), axis=-1)
    logsumexp_N = jnp.log(total_Nx1[:, 0]) + max_Nx1[:, 0]
    loss = jnp.sum((logsumexp_N - target_logit_N) * weights_N)
    if not with_grad:
        return loss, None, None
    # d(loss)/d(logits) = weight * (softmax - onehot(target)).
    weights_Nx1 = weights_N[:, None].astype(f32)
    dlogits_NxV = (exp_NxV * (weights_Nx1 / total_Nx1)
                   - jnp.where(is_target_NxV, weights_Nx1, 0.0)).astype(x_BxCxD.dtype)
    dx_BxCxD = (dlogits_NxV @ kernel_DxV.T).reshape(x_BxCxD.shape)
    dkernel_DxV = jnp.matmul(x_NxD.T, dlogits_NxV, preferred_element_type=f32)
    return loss, dx_BxCxD, dkernel_DxV


def _head_loss(x_BxLxD, kernel_DxV, targets_BxL, weights_BxL, chunk: int, with_grad: bool):
    batch, length, width = x_BxLxD.shape
    n_chunks = -(-length // chunk)
    pad = n_chunks * chunk - length  # padded positions weigh 0: no loss, no gradient

    def chunked(a_BxL, fill=0):
        a_BxL = jnp.pad(a_BxL, [(0, 0), (0, pad)] + [(0, 0)] * (a_BxL.ndim - 2),
                        constant_values=fill)
        return jnp.swapaxes(a_BxL.reshape(batch, n_chunks, chunk, *a_BxL.shape[2:]), 0, 1)

    def step(carry, chunk_inputs):
        loss, dkernel_DxV = carry
        loss_c, dx_BxCxD, dkernel_c = _head_loss_chunk(*chunk_inputs[:1], kernel_DxV,
                                                       *chunk_inputs[1:], with_grad)
        if with_grad:
            dkernel_DxV = dkernel_DxV + dkernel_c
        return (loss + loss_c, dkernel_DxV), dx_BxCxD

    dkernel_DxV = jnp.zeros(kernel_DxV.shape if with_grad else (), f32)
    (loss, dkernel_DxV), dx_NxBxCxD = jax.lax.scan(
        step, (jnp.zeros((), f32), dkernel_DxV),
        (chunked(x_BxLxD), chunked(targets_BxL), chunked(weights_BxL)))
    if not with_grad:
        return loss, None
    dx_BxLxD = jnp.swapaxes(dx_NxBxCxD, 0, 1).reshape(batch, -1, width)[:, :length]
    return loss, (dx_BxLxD, dkernel_DxV.astype(kernel_DxV.dtype))


def head_cross_entropy(x_BxLxD, kernel_DxV, targets_BxL, weights_BxL, chunk: int):
    """sum over positions of weight * cross_entropy(x @ kernel, target), in float32.

    `chunk` positions per step (times the batch: the rows of each chunk's matmuls). The
    weights are data: they get no gradient.
    """
    return _head_cross_entropy(x_BxLxD, kernel_DxV, targets_BxL, weights_BxL.astype(f32), chunk)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _head_cross_entropy(x_BxLxD, kernel_DxV, targets_BxL, weights_BxL, chunk: int):
    return _head_loss(x_BxLxD, kernel_DxV, targets_BxL, weights_BxL, chunk, False)[0]


def _head_cross_entropy_fwd(x_BxLxD, kernel_DxV, targets_BxL, weights_BxL, chunk):
    """The loss, and as residuals its gradients, computed in the same pass over the chunks."""
    return _head_loss(x_BxLxD, kernel_DxV, targets_BxL, weights_BxL, chunk, True)


def _head_cross_entropy_bwd(chunk, grads, dloss):
    dx_BxLxD, dkernel_DxV = grads
    return ((dloss * dx_BxLxD).astype(dx_BxLxD.dtype),
            (dloss * dkernel_DxV).astype(dkernel_DxV.dtype), None, None)


_head_cross_entropy.defvjp(_head_cross_entropy_fwd, _head_cross_entropy_bwd)
