"""DeepSeek-V3's multi-head latent attention (MLA), decoded from its compressed cache.

    q      = q_up(q_norm(q_down(x)))  (or q_proj(x) when q_lora_rank is 0)  -> H x (dn + dr)
    latent = kv_norm(kv_down(x)[:R]),  k_rope = RoPE(kv_down(x)[R:])       -> R, and dr for all heads
    k, v   = kv_up(latent)                                                 -> H x dn, H x dv
    out    = o_proj(softmax([q_nope | RoPE(q_rope)] . [k | k_rope] * (dn + dr)^-0.5) v)

Names and shapes follow Hugging Face's DeepseekV3Attention (q_a_proj = q_down, q_b_proj = q_up,
kv_a_proj_with_mqa = kv_down, kv_b_proj = kv_up, o_proj = out; kernels are [in, out]). A cache
holds only the normalized latent and the rotated RoPE key of each token (R + dr numbers per
token, against 2 H Dh for MHA). A one-token step attends in the absorbed form: kv_up's key half
is folded into the query, so scores are taken against the latents directly, and its value half
is applied after the weighted sum of latents; a longer cached call (a prompt) expands the cache
through kv_up instead, which is cheaper when many queries share the keys.

Shapes: B batch, T tokens of this call, S cache slots or sources, D width, H heads, R latent
rank, Rq query rank, Dn/Dr/Dv no-RoPE/RoPE/value head dims, Dq = Dn + Dr.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minids_jax.config import ComputeConfig, ModelConfig
from minids_jax.model.attention import multi_head_attention, up_to, within_documents
from minids_jax.model.layers import RMSNorm, linear
from minids_jax.model.rotary import Rope, softmax_mscale

LATENT_NORM_EPS = 1e-6  # the references' q_a_layernorm and kv_a_layernorm always use 1e-6


class MLACache(NamedTuple):
    latent_BxSxR: jax.Array  # kv_norm(kv_down(x)[:R]) of every slot so far
    k_rope_BxSxDr: jax.Array  # RoPE'd kv_down(x)[R:], one key for all heads
    index: jax.Array  # int32: slots filled


class MLA(nnx.Module):
    def __init__(self, cfg: ModelConfig, compute: ComputeConfig, *, rngs: nnx.Rngs):
        self.cfg, self.kernel = cfg, compute.attention_kernel
        heads, d_model = cfg.n_heads, cfg.d_model
        self.dn, self.dr, self.dv, self.rank = (cfg.qk_nope_head_dim, cfg.qk_rope_head_dim,
                                                cfg.v_head_dim, cfg.kv_lora_rank)
        # Down-projections split D over fsdp; up-projections split their rank over fsdp ("lora")
        # and the heads over tensor, so every matrix is split under FSDP.
        make = dict(rngs=rngs, dtype=compute.dtype, param_dtype=cfg.param_dtype)
        norm = dict(eps=LATENT_NORM_EPS, dtype=compute.dtype, param_dtype=cfg.param_dtype)
        query_dims = heads * (self.dn + self.dr)
        if cfg.q_lora_rank:
            self.q_down = linear(d_model, cfg.q_lora_rank, ("embed", None), **make)
            self.q_norm = RMSNorm(cfg.q_lora_rank, **norm)
            self.q_up = linear(cfg.q_lora_rank, query_dims, ("lora", "heads"), **make)
        else:
            self.q = linear(d_model, query_dims, ("embed", "heads"), **make)
        self.kv_down = linear(d_model, self.rank + self.dr, ("embed", None), **make)
        self.kv_norm = RMSNorm(self.rank, **norm)
        self.kv_up = linear(self.rank, heads * (self.dn + self.dv), ("lora", "heads"), **make)
        self.out = linear(heads * self.dv, d_model, ("heads", "embed"), **make)
        self.rope = Rope.of(cfg, self.dr)
        # YaRN's correction goes on the queries; the kernels scale by Dq^-0.5 themselves.
        self.query_scale = softmax_mscale(cfg)

    def init_cache(self, batch: int, max_len: int, dtype) -> MLACache:
        return MLACache(jnp.zeros((batch, max_len, self.rank), dtype),
                        jnp.zeros((batch, max_len, self.dr), dtype), jnp.zeros((), jnp.int32))

    def queries(self, x_BxTxD, positions_BxT) -> tuple[jax.Array, jax.Array]:
        """(q_nope [B, T, H, Dn], RoPE'd q_rope [B, T, H, Dr]), scaled for YaRN."""
        q_BxTxHD = self.q_up(self.q_norm(self.q_down(x_BxTxD))) if self.cfg.q_lora_rank else \
            self.q(x_BxTxD)
        q_BxTxHxDq = q_BxTxHD.reshape(*x_BxTxD.shape[:2], self.cfg.n_heads, self.dn + self.dr)
        if self.query_scale != 1.0:
            q_BxTxHxDq = q_BxTxHxDq * self.query_scale
        q_nope_BxTxHxDn, q_rope_BxTxHxDr = jnp.split(q_BxTxHxDq, [self.dn], axis=-1)
        return q_nope_BxTxHxDn, self.rope(q_rope_BxTxHxDr, positions_BxT)

    def compressed(self, x_BxTxD, positions_BxT) -> tuple[jax.Array, jax.Array]:
        """(latent [B, T, R], RoPE'd k_rope [B, T, Dr]): what the cache keeps per token."""
        kv_BxTxRDr = self.kv_down(x_BxTxD)
        latent_BxTxR = self.kv_norm(kv_BxTxRDr[..., :self.rank])
        k_rope_BxTxDr = self.rope(kv_BxTxRDr[..., None, self.rank:], positions_BxT)[:, :, 0]
        return latent_BxTxR, k_rope_BxTxDr

    def __call__(self, x_BxTxD, positions_BxT, cache: MLACache | None = None,
                 segments_BxT: jax.Array | None = None):
        q_nope_BxTxHxDn, q_rope_BxTxHxDr = self.queries(x_BxTxD, positions_BxT)
        latent_BxTxR, k_rope_BxTxDr = self.compressed(x_BxTxD, positions_BxT)
        if cache is None:
            attended_BxTxHxDv = self._expanded(q_nope_BxTxHxDn, q_rope_BxTxHxDr, latent_BxTxR,
                                               k_rope_BxTxDr, within_documents(segments_BxT),
                                               is_causal=True)
            return self._output(attended_BxTxHxDv), None
        put = lambda old, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
            old, new.astype(old.dtype), cache.index, axis=1)
        latent_BxSxR = put(cache.latent_BxSxR, latent_BxTxR)
        k_rope_BxSxDr = put(cache.k_rope_BxSxDr, k_rope_BxTxDr)
        batch, tokens = x_BxTxD.shape[:2]
        mask_BxTxS = up_to(cache.index, latent_BxSxR.shape[1], batch, tokens)
        attend = self._absorbed if tokens == 1 else self._expanded
        attended_BxTxHxDv = attend(q_nope_BxTxHxDn, q_rope_BxTxHxDr, latent_BxSxR,
                                   k_rope_BxSxDr, mask_BxTxS)
        return (self._output(attended_BxTxHxDv),
                MLACache(latent_BxSxR, k_rope_BxSxDr, cache.index + tokens))

    def _output(self, attended_BxTxHxDv):
        return self.out(attended_BxTxHxDv.reshape(*attended_BxTxHxDv.shape[:2], -1))

    def _up_weights(self) -> tuple[jax.Array, jax.Array]:
        """kv_up's kernel as W_UK [R, H, Dn] and W_UV [R, H, Dv]."""
        kernel_RxHD = self.kv_up.weight().astype(self.kv_up.dtype)
        kernel_RxHxDnv = kernel_RxHD.reshape(self.rank, self.cfg.n_heads, self.dn + self.dv)
        return kernel_RxHxDnv[..., :self.dn], kernel_RxHxDnv[..., self.dn:]

    def _expanded(self, q_nope_BxTxHxDn, q_rope_BxTxHxDr, latent_BxSxR, k_rope_BxSxDr,
                  mask_BxTxS, is_causal: bool = False):
        """Keys and values expanded from the latents through kv_up, then plain attention."""
        heads = self.cfg.n_heads
        kv_BxSxHxDnv = self.kv_up(latent_BxSxR).reshape(*latent_BxSxR.shape[:2], heads,
                                                        self.dn + self.dv)
        k_nope_BxSxHxDn, v_BxSxHxDv = jnp.split(kv_BxSxHxDnv, [self.dn], axis=-1)
        k_rope_BxSxHxDr = jnp.broadcast_to(k_rope_BxSxDr[:, :, None, :].astype(
            k_nope_BxSxHxDn.dtype), (*k_rope_BxSxDr.shape[:2], heads, self.dr))
        q_BxTxHxDq = jnp.concatenate([q_nope_BxTxHxDn, q_rope_BxTxHxDr], axis=-1)
        k_BxSxHxDq = jnp.concatenate([k_nope_BxSxHxDn, k_rope_BxSxHxDr], axis=-1)
        return multi_head_attention(q_BxTxHxDq, k_BxSxHxDq, v_BxSxHxDv, kernel=self.kernel,
                                    mask_BxQxS=mask_BxTxS, is_causal=is_causal)

    def _absorbed(self, q_nope_BxTxHxDn, q_rope_BxTxHxDr, latent_BxSxR, k_rope_BxSxDr,
                  mask_BxTxS):
        """Scores against the latents themselves: q_nope . W_UK^T is a query in latent space;
        the weighted sum of latents goes through W_UV afterwards."""
        w_uk_RxHxDn, w_uv_RxHxDv = self._up_weights()
        dtype = latent_BxSxR.dtype
        q_latent_BxTxHxR = jnp.einsum("bthd,rhd->bthr", q_nope_BxTxHxDn, w_uk_RxHxDn)
        scores_BxHxTxS = (
            jnp.einsum("bthr,bsr->bhts", q_latent_BxTxHxR.astype(dtype), latent_BxSxR,
                       preferred_element_type=jnp.float32)
            + jnp.einsum("bthd,bsd->bhts", q_rope_BxTxHxDr.astype(dtype), k_rope_BxSxDr,
                         preferred_element_type=jnp.float32)) * (self.dn + self.dr) ** -0.5
        scores_BxHxTxS = jnp.where(mask_BxTxS[:, None], scores_BxHxTxS, -jnp.inf)
        probs_BxHxTxS = jax.nn.softmax(scores_BxHxTxS, axis=-1)  # each row sees its own slot
        mixed_BxTxHxR = jnp.einsum("bhts,bsr->bthr", probs_BxHxTxS.astype(dtype), latent_BxSxR)
        return jnp.einsum("bthr,rhd->bthd", mixed_BxTxHxR, w_uv_RxHxDv)
