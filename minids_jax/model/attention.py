"""Causal multi-head attention (MHA) and the projections and caches MHLA (mhla.py) shares.

Each layer is `layer(x_BxTxD, positions_BxT, cache=None, segments_BxT=None) -> (out_BxTxD,
cache)`: without a cache, the training forward over a whole sequence (with segments, over each
document of a packed window on its own); with one (from `init_cache`), the tokens are
slots `cache.index ..` of a sequence being decoded, and the updated cache comes back. A cached
call over a prompt from slot 0 (prefill), then one token at a time, gives the outputs of the
uncached forward (tests/test_generation.py).

Shapes: B batch, L length, T tokens of this call, S cache slots, D model width, H heads
(key-value heads in a cache), BH a cache's batch and heads flattened, Dh head width,
K latents.
"""

from __future__ import annotations

import functools
import logging
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minids_jax.config import ComputeConfig, ModelConfig
from minids_jax.kernels import attention as attention_kernels
from minids_jax.model.layers import linear
from minids_jax.model.rotary import Rope, softmax_mscale

KERNELS = ("fused", "dot_product_attention", "cudnn")  # compute.attention_kernel, resolved


def multi_head_attention(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh, *, kernel: str,
                         mask_BxQxS: jax.Array | None = None, is_causal: bool = False):
    """softmax(q k^T / sqrt(Dh)) v per head, where mask (True: may attend) and, if is_causal,
    key <= query allow. Query rows that may attend to nothing get exactly zero, not the
    uniform average a fully masked softmax would give (that would leak what they must not see).
    `kernel`: 'fused' (kernels/attention.py), 'dot_product_attention' (XLA's) or 'cudnn'.
    Keys and values may have fewer heads than the queries (grouped-query attention: query head
    h reads key-value head h // group, as transformers' repeat_kv does); XLA's and cuDNN's
    kernels take them so, the fused ones repeated."""
    if kernel == "fused":
        group = q_BxQxHxDh.shape[2] // k_BxSxHxDh.shape[2]
        if group > 1:
            k_BxSxHxDh, v_BxSxHxDh = (jnp.repeat(a, group, axis=2)
                                      for a in (k_BxSxHxDh, v_BxSxHxDh))
        if mask_BxQxS is None and is_causal:
            return attention_kernels.causal_attention(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh)
        batch, queries, sources = q_BxQxHxDh.shape[0], q_BxQxHxDh.shape[1], k_BxSxHxDh.shape[1]
        if mask_BxQxS is None:
            mask_BxQxS = jnp.ones((batch, queries, sources), bool)
        if is_causal:
            mask_BxQxS = mask_BxQxS & jnp.tril(jnp.ones((queries, sources), bool))
        return attention_kernels.softmax_attention(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh,
                                                   mask_BxQxS)
    mask_Bx1xQxS = None if mask_BxQxS is None else mask_BxQxS[:, None]
    # It needs values as wide as the keys (MLA's are not): pad them with zeros, then cut.
    value_dims, key_dims = v_BxSxHxDh.shape[-1], k_BxSxHxDh.shape[-1]
    if value_dims < key_dims:
        v_BxSxHxDh = jnp.pad(v_BxSxHxDh, [(0, 0)] * 3 + [(0, key_dims - value_dims)])
    attend = functools.partial(jax.nn.dot_product_attention, q_BxQxHxDh, k_BxSxHxDh,
                               v_BxSxHxDh, mask=mask_Bx1xQxS, is_causal=is_causal)
    try:  # jax picks XLA's kernel unless told; cuDNN's refuses some shapes and dtypes
        attended_BxQxHxDh = attend(implementation="cudnn" if kernel == "cudnn" else None)
    except (ValueError, NotImplementedError, TypeError, RuntimeError) as error:
        logging.warning("cuDNN attention refused %s (%s): XLA's attention instead",
                        q_BxQxHxDh.shape, error)
        attended_BxQxHxDh = attend()
    attended_BxQxHxDh = attended_BxQxHxDh[..., :value_dims]
    if mask_BxQxS is not None:
        sees_any_BxQx1x1 = jnp.any(mask_BxQxS, axis=-1)[:, :, None, None]
        attended_BxQxHxDh = jnp.where(sees_any_BxQx1x1, attended_BxQxHxDh, 0)
    return attended_BxQxHxDh


def same_document(segments_BxQ: jax.Array, segments_BxS: jax.Array) -> jax.Array:
    """Mask [B, Q, S]: query q may see source s of its own document (data.doc_mask)."""
    return segments_BxQ[:, :, None] == segments_BxS[:, None, :]


def within_documents(segments_BxT: jax.Array | None) -> jax.Array | None:
    """The [B, T, T] mask of a window's own documents, or None for a window without them."""
    return None if segments_BxT is None else same_document(segments_BxT, segments_BxT)


class KeysValues(NamedTuple):
    """Cached RoPE'd keys and values of one attention, one slot per source: its n_kv_heads
    key-value heads (H here), which grouped-query attention shares among the query heads."""
    k_BxSxHxDh: jax.Array
    v_BxSxHxDh: jax.Array

    @classmethod
    def empty(cls, batch: int, slots: int, cfg: ModelConfig, dtype) -> KeysValues:
        zeros = jnp.zeros((batch, slots, cfg.n_kv_heads, cfg.head_dim), dtype)
        return cls(zeros, zeros)

    def put(self, new: KeysValues, slot) -> KeysValues:
        """The cache with `new`'s sources written from `slot` on."""
        return KeysValues(*(jax.lax.dynamic_update_slice_in_dim(old, fresh.astype(old.dtype),
                                                               slot, axis=1)
                            for old, fresh in zip(self, new)))

    @property
    def slots(self) -> int:
        return self.k_BxSxHxDh.shape[1]


class HeadsFirstKeysValues(NamedTuple):
    """A decode cache's keys and values as the fused kernels read them, [B x KV, S, Dh] (BH:
    each sequence's key-value heads, flattened): a step's products take the cache as it is.
    Kept [B, S, KV, Dh], it would be copied heads-first at every step; kept [B, KV, S, Dh],
    XLA's CPU backend copied it at batch 1, whose axis its dots drop (docs/performance.md)."""
    k_BHxSxDh: jax.Array
    v_BHxSxDh: jax.Array

    @classmethod
    def empty(cls, batch: int, slots: int, cfg: ModelConfig, dtype) -> HeadsFirstKeysValues:
        zeros = jnp.zeros((batch * cfg.n_kv_heads, slots, cfg.head_dim), dtype)
        return cls(zeros, zeros)

    def put(self, new: KeysValues, slot) -> HeadsFirstKeysValues:
        """The cache with `new`'s sources ([B, T, KV, Dh]) written from `slot` on."""
        def heads_first(a_BxTxHxDh):
            batch, tokens, heads, head_dim = a_BxTxHxDh.shape
            return jnp.swapaxes(a_BxTxHxDh, 1, 2).reshape(batch * heads, tokens, head_dim)

        return HeadsFirstKeysValues(*(jax.lax.dynamic_update_slice_in_dim(
            old, heads_first(fresh).astype(old.dtype), slot, axis=1)
            for old, fresh in zip(self, new)))

    @property
    def slots(self) -> int:
        return self.k_BHxSxDh.shape[1]


def up_to(last_slot, slots: int, batch: int, queries: int = 1) -> jax.Array:
    """Mask [B, Q, slots]: query q may see slots 0..last_slot + q."""
    last_Qx1 = (last_slot + jnp.arange(queries))[:, None]
    return jnp.broadcast_to(jnp.arange(slots)[None, :] <= last_Qx1, (batch, queries, slots))


class AttentionProjections(nnx.Module):
    """q from one stream, k and v from another, and the output projection back to width D.
    With fewer key-value heads than query heads (grouped-query attention), query head h
    reads key-value head h // (n_heads / n_kv_heads), as transformers' repeat_kv does."""

    def __init__(self, cfg: ModelConfig, compute: ComputeConfig, *, rngs: nnx.Rngs):
        self.cfg, self.kernel = cfg, compute.attention_kernel
        if self.kernel not in KERNELS:
            raise ValueError(f"compute.attention_kernel={self.kernel!r}: resolve it for a "
                             f"platform first (minids_jax.kernels.resolve).")
        self.rope, self.query_scale = Rope.of(cfg, cfg.head_dim), softmax_mscale(cfg)
        make = dict(rngs=rngs, dtype=compute.dtype, param_dtype=cfg.param_dtype)
        queries, keys = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        self.q = linear(cfg.d_model, queries, ("embed", "heads"), bias=cfg.qkv_bias, **make)
        self.k = linear(cfg.d_model, keys, ("embed", "heads"), bias=cfg.qkv_bias, **make)
        self.v = linear(cfg.d_model, keys, ("embed", "heads"), bias=cfg.qkv_bias, **make)
        self.out = linear(queries, cfg.d_model, ("heads", "embed"), bias=cfg.out_bias, **make)

    def heads(self, x_BxLxF: jax.Array) -> jax.Array:
        """[B, L, heads * Dh] as [B, L, heads, Dh] (query or key-value heads)."""
        return x_BxLxF.reshape(*x_BxLxF.shape[:2], -1, self.cfg.head_dim)

    def keys_values(self, sources_BxSxD: jax.Array, source_pos_BxS: jax.Array) -> KeysValues:
        """RoPE'd keys and values [B, S, KV, Dh]: what a cache stores per source."""
        k_BxSxHxDh = self.rope(self.heads(self.k(sources_BxSxD)), source_pos_BxS)
        return KeysValues(k_BxSxHxDh, self.heads(self.v(sources_BxSxD)))

    def attend(self, queries_BxQxD, query_pos_BxQ,
               keys_values: KeysValues | HeadsFirstKeysValues, *,
               mask_BxQxS: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        """RoPE'd multi-head attention of the queries over projected keys and values (a cache
        kept heads-first takes a mask, not is_causal)."""
        q_BxQxHxDh = self.rope(self.heads(self.q(queries_BxQxD)), query_pos_BxQ)
        if self.query_scale != 1.0:  # YaRN's softmax correction
            q_BxQxHxDh = q_BxQxHxDh * self.query_scale
        if isinstance(keys_values, HeadsFirstKeysValues):
            attended_BxQxHxDh = attention_kernels.grouped_attention(q_BxQxHxDh, *keys_values,
                                                                    mask_BxQxS)
            return self.out(attended_BxQxHxDh.reshape(*queries_BxQxD.shape[:2], -1))
        attended_BxQxHxDh = multi_head_attention(q_BxQxHxDh, *keys_values,
                                                 kernel=self.kernel, mask_BxQxS=mask_BxQxS,
                                                 is_causal=is_causal)
        return self.out(attended_BxQxHxDh.reshape(*queries_BxQxD.shape[:2], -1))


class MHACache(NamedTuple):
    keys_values: KeysValues | HeadsFirstKeysValues  # every slot so far (heads-first: fused)
    index: jax.Array  # int32: slots filled


class MHA(nnx.Module):
    """Causal multi-head self-attention."""

    def __init__(self, cfg: ModelConfig, compute: ComputeConfig, *, rngs: nnx.Rngs):
        self.attention = AttentionProjections(cfg, compute, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype) -> MHACache:
        # Heads-first for the fused kernels, which read it so; XLA's and cuDNN's take it as is.
        heads_first = self.attention.kernel == "fused"
        layout = HeadsFirstKeysValues if heads_first else KeysValues
        return MHACache(layout.empty(batch, max_len, self.attention.cfg, dtype),
                        jnp.zeros((), jnp.int32))

    def __call__(self, x_BxTxD, positions_BxT, cache: MHACache | None = None,
                 segments_BxT: jax.Array | None = None):
        """`segments_BxT` (uncached only): each token attends within its own document."""
        fresh = self.attention.keys_values(x_BxTxD, positions_BxT)
        if cache is None:
            return self.attention.attend(x_BxTxD, positions_BxT, fresh, is_causal=True,
                                         mask_BxQxS=within_documents(segments_BxT)), None
        keys_values = cache.keys_values.put(fresh, cache.index)
        batch, tokens = x_BxTxD.shape[:2]
        mask_BxTxS = up_to(cache.index, keys_values.slots, batch, tokens)
        out_BxTxD = self.attention.attend(x_BxTxD, positions_BxT, keys_values,
                                          mask_BxQxS=mask_BxTxS)
        return out_BxTxD, MHACache(keys_values, cache.index + tokens)

