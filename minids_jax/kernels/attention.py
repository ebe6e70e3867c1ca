"""Softmax attention with a hand-written backward, and causal attention in query blocks.

Exact (the numbers of autodiff of the plain formula, up to float rounding), with less work and
memory: the forward saves the probabilities, and the backward is five einsums and one fused
elementwise pass. `causal_attention` splits the queries into blocks, so keys above the causal
diagonal are never scored. Both work heads-first ([B, H, L, Dh]), so no einsum needs a
transposed copy. Query rows that may attend to nothing get exactly zero.

Shapes: B batch, Q queries, S sources (keys), H heads, Dh head width, L length; in
`grouped_attention`, K key-value heads, G query heads per key-value head, BK batch and
key-value heads flattened.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

f32 = jnp.float32


def _attention_forward(q_BxHxQxDh, k_BxHxSxDh, v_BxHxSxDh, mask_BxQxS):
    scale = q_BxHxQxDh.shape[-1] ** -0.5
    scores_BxHxQxS = jnp.einsum("bhqd,bhsd->bhqs", q_BxHxQxDh * scale, k_BxHxSxDh,
                                preferred_element_type=f32)
    visible_Bx1xQxS = mask_BxQxS[:, None]
    scores_BxHxQxS = jnp.where(visible_Bx1xQxS, scores_BxHxQxS, -jnp.inf)
    max_BxHxQx1 = jnp.max(scores_BxHxQxS, axis=-1, keepdims=True)
    # A row that sees nothing has max -inf: shift it by 0 instead, so its exps are all 0 and
    # its output is exactly 0 (not the uniform average a masked softmax would give).
    max_BxHxQx1 = jnp.where(jnp.isneginf(max_BxHxQx1), 0.0, max_BxHxQx1)
    exp_BxHxQxS = jnp.exp(scores_BxHxQxS - max_BxHxQx1)
    total_BxHxQx1 = jnp.sum(exp_BxHxQxS, axis=-1, keepdims=True)
    probs_BxHxQxS = exp_BxHxQxS / jnp.where(total_BxHxQx1 > 0, total_BxHxQx1, 1.0)
    out_BxHxQxDh = jnp.einsum("bhqs,bhsd->bhqd", probs_BxHxQxS.astype(v_BxHxSxDh.dtype),
                              v_BxHxSxDh)
    return out_BxHxQxDh, probs_BxHxQxS


def _attention_backward(q_BxHxQxDh, k_BxHxSxDh, v_BxHxSxDh, probs_BxHxQxS, dout_BxHxQxDh):
    scale = q_BxHxQxDh.shape[-1] ** -0.5
    dv_BxHxSxDh = jnp.einsum("bhqs,bhqd->bhsd", probs_BxHxQxS.astype(dout_BxHxQxDh.dtype),
                             dout_BxHxQxDh)
    dprobs_BxHxQxS = jnp.einsum("bhqd,bhsd->bhqs", dout_BxHxQxDh, v_BxHxSxDh,
                                preferred_element_type=f32)
    # Softmax backward: p * (dp - sum_s p dp). (dout . out equals that sum and is cheaper,
    # but only up to rounding: a query that sees a single key would then leak a ~1e-6
    # gradient into its own position, which the causality tests rightly reject.)
    row_dot_BxHxQx1 = jnp.sum(probs_BxHxQxS * dprobs_BxHxQxS, axis=-1, keepdims=True)
    dscores_BxHxQxS = (probs_BxHxQxS * (dprobs_BxHxQxS - row_dot_BxHxQx1) * scale).astype(
        q_BxHxQxDh.dtype)
    dq_BxHxQxDh = jnp.einsum("bhqs,bhsd->bhqd", dscores_BxHxQxS, k_BxHxSxDh)
    dk_BxHxSxDh = jnp.einsum("bhqs,bhqd->bhsd", dscores_BxHxQxS, q_BxHxQxDh)
    return dq_BxHxQxDh, dk_BxHxSxDh, dv_BxHxSxDh


def _heads_first(a_BxLxHxDh):
    """[B, L, H, Dh] <-> [B, H, L, Dh]. The kernels work heads-first, so that each head's rows
    are contiguous and no einsum needs a transposed copy; the layers' layout is swapped once
    on the way in and once on the way out."""
    return jnp.swapaxes(a_BxLxHxDh, 1, 2)


def softmax_attention(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh, mask_BxQxS):
    """softmax(q k^T / sqrt(Dh), masked) v; rows whose mask is all False get exactly 0."""
    return _heads_first(_softmax_attention(*map(_heads_first, (q_BxQxHxDh, k_BxSxHxDh,
                                                               v_BxSxHxDh)), mask_BxQxS))


def grouped_attention(q_BxQxHxDh, k_BKxSxDh, v_BKxSxDh, mask_BxQxS):
    """`softmax_attention` of H query heads over keys and values kept heads-first (a decode
    cache: [B x K, S, Dh], each sequence's K key-value heads flattened), each key-value head
    shared by G = H / K query heads (grouped-query attention): its G query heads become G x Q
    rows of queries, so neither the cache nor any of its heads is copied (repeating the heads,
    or swapping a [B, S, K, Dh] cache heads-first, copies all of it at every decode step:
    docs/performance.md)."""
    batch, queries, heads, head_dim = q_BxQxHxDh.shape
    kv_heads = k_BKxSxDh.shape[0] // batch
    group = heads // kv_heads
    q_BKx1xGQxDh = q_BxQxHxDh.reshape(batch, queries, kv_heads, group, head_dim).transpose(
        0, 2, 3, 1, 4).reshape(batch * kv_heads, 1, group * queries, head_dim)
    mask_BKxGQxS = jnp.repeat(jnp.tile(mask_BxQxS, (1, group, 1)), kv_heads, axis=0)
    out_BKx1xGQxDh = _softmax_attention(q_BKx1xGQxDh, k_BKxSxDh[:, None], v_BKxSxDh[:, None],
                                        mask_BKxGQxS)
    return out_BKx1xGQxDh.reshape(batch, kv_heads, group, queries, head_dim).transpose(
        0, 3, 1, 2, 4).reshape(batch, queries, heads, head_dim)


@jax.custom_vjp
def _softmax_attention(q_BxHxQxDh, k_BxHxSxDh, v_BxHxSxDh, mask_BxQxS):
    return _attention_forward(q_BxHxQxDh, k_BxHxSxDh, v_BxHxSxDh, mask_BxQxS)[0]


def _softmax_attention_fwd(q_BxHxQxDh, k_BxHxSxDh, v_BxHxSxDh, mask_BxQxS):
    out_BxHxQxDh, probs_BxHxQxS = _attention_forward(q_BxHxQxDh, k_BxHxSxDh, v_BxHxSxDh,
                                                     mask_BxQxS)
    return out_BxHxQxDh, (q_BxHxQxDh, k_BxHxSxDh, v_BxHxSxDh, probs_BxHxQxS)


def _softmax_attention_bwd(residuals, dout_BxHxQxDh):
    return (*_attention_backward(*residuals, dout_BxHxQxDh), None)


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)

# Query rows per causal block: the fastest measured on a CPU (docs/performance.md).
ATTENTION_BLOCK_ROWS = 64


def _causal_blocks(length, block_rows):
    return [(start, min(start + block_rows, length)) for start in range(0, length, block_rows)]


def causal_attention(q_BxLxHxDh, k_BxLxHxDh, v_BxLxHxDh, block_rows: int = ATTENTION_BLOCK_ROWS):
    """Causal self-attention (query i sees keys <= i), one query block at a time: the block of
    rows [a, b) scores keys [0, b) only, so the work above the diagonal is skipped. The
    backward adds each block's key and value gradients into their prefix in place (autodiff
    of the slices would pad each to full length first)."""
    return _heads_first(_causal_attention(*map(_heads_first, (q_BxLxHxDh, k_BxLxHxDh,
                                                              v_BxLxHxDh)), block_rows))


def _causal_forward(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, block_rows):
    """The output, and each block's probabilities [B, H, Q, end of block]."""
    batch, length = q_BxHxLxDh.shape[0], q_BxHxLxDh.shape[2]
    outs_BxHxQxDh, probs_BxHxQxS = [], []
    for start, end in _causal_blocks(length, block_rows):
        mask_QxS = jnp.arange(start, end)[:, None] >= jnp.arange(end)[None, :]
        out, probs = _attention_forward(q_BxHxLxDh[:, :, start:end], k_BxHxLxDh[:, :, :end],
                                        v_BxHxLxDh[:, :, :end],
                                        jnp.broadcast_to(mask_QxS, (batch, *mask_QxS.shape)))
        outs_BxHxQxDh.append(out)
        probs_BxHxQxS.append(probs)
    return jnp.concatenate(outs_BxHxQxDh, axis=2), probs_BxHxQxS


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_attention(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, block_rows):
    return _causal_forward(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, block_rows)[0]


def _causal_attention_fwd(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, block_rows):
    out_BxHxLxDh, probs_BxHxQxS = _causal_forward(q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh,
                                                  block_rows)
    return out_BxHxLxDh, (q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, probs_BxHxQxS)


def _causal_attention_bwd(block_rows, residuals, dout_BxHxLxDh):
    q_BxHxLxDh, k_BxHxLxDh, v_BxHxLxDh, probs_BxHxQxS = residuals
    dqs_BxHxQxDh = []
    dk_BxHxLxDh, dv_BxHxLxDh = jnp.zeros_like(k_BxHxLxDh), jnp.zeros_like(v_BxHxLxDh)
    blocks = _causal_blocks(q_BxHxLxDh.shape[2], block_rows)
    for (start, end), probs in zip(blocks, probs_BxHxQxS):
        dq, dk, dv = _attention_backward(
            q_BxHxLxDh[:, :, start:end], k_BxHxLxDh[:, :, :end], v_BxHxLxDh[:, :, :end], probs,
            dout_BxHxLxDh[:, :, start:end])
        dqs_BxHxQxDh.append(dq)
        dk_BxHxLxDh = dk_BxHxLxDh.at[:, :, :end].add(dk)
        dv_BxHxLxDh = dv_BxHxLxDh.at[:, :, :end].add(dv)
    return jnp.concatenate(dqs_BxHxQxDh, axis=2), dk_BxHxLxDh, dv_BxHxLxDh


_causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)
