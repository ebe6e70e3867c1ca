"""Causal attention: multi-head (MHA) and the seed's latent attention (MHLA), made causal.

Shapes: B batch, L length, D model width, H heads, Dh head width, K latents.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minids_jax import fused
from minids_jax.config import ModelConfig
from minids_jax.layers import RMSNorm, apply_rope, linear, mesh_platform


class AttentionProjections(nnx.Module):
    """q from one stream, k and v from another, and the output projection back to width D."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        make = dict(rngs=rngs, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.q = linear(cfg.d_model, cfg.d_model, ("embed", "heads"), **make)
        self.k = linear(cfg.d_model, cfg.d_model, ("embed", "heads"), **make)
        self.v = linear(cfg.d_model, cfg.d_model, ("embed", "heads"), **make)
        self.out = linear(cfg.d_model, cfg.d_model, ("heads", "embed"), **make)

    def heads(self, x_BxLxD: jax.Array) -> jax.Array:
        return x_BxLxD.reshape(*x_BxLxD.shape[:2], self.cfg.n_heads, self.cfg.head_dim)

    def keys_values(self, sources_BxSxD: jax.Array, source_pos_BxS: jax.Array):
        """RoPE'd keys and values [B, S, H, Dh]: what a decoding cache stores per source."""
        k_BxSxHxDh = apply_rope(self.heads(self.k(sources_BxSxD)), source_pos_BxS,
                                self.cfg.rope_theta)
        return k_BxSxHxDh, self.heads(self.v(sources_BxSxD))

    def attend(self, queries_BxQxD, query_pos_BxQ, sources_BxSxD, source_pos_BxS, *,
               mask_BxQxS: jax.Array | None = None, is_causal: bool = False) -> jax.Array:
        """RoPE'd multi-head attention of queries over sources; returns [B, Q, D]."""
        k_BxSxHxDh, v_BxSxHxDh = self.keys_values(sources_BxSxD, source_pos_BxS)
        return self.attend_keys_values(queries_BxQxD, query_pos_BxQ, k_BxSxHxDh, v_BxSxHxDh,
                                       mask_BxQxS=mask_BxQxS, is_causal=is_causal)

    def attend_keys_values(self, queries_BxQxD, query_pos_BxQ, k_BxSxHxDh, v_BxSxHxDh, *,
                           mask_BxQxS: jax.Array | None = None,
                           is_causal: bool = False) -> jax.Array:
        """Attention over keys and values already projected (by `keys_values`, or a cache)."""
        q_BxQxHxDh = apply_rope(self.heads(self.q(queries_BxQxD)), query_pos_BxQ,
                                self.cfg.rope_theta)
        attended_BxQxHxDh = multi_head_attention(
            q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh, mask_BxQxS=mask_BxQxS, is_causal=is_causal,
            kernel=self.cfg.attention_kernel)
        return self.out(attended_BxQxHxDh.reshape(queries_BxQxD.shape))


def resolve_kernel(kernel: str, mesh: jax.sharding.AbstractMesh | None = None) -> str:
    """`auto` as the attention kernel that is fastest on the platform the layer runs on."""
    if kernel != "auto":
        return kernel
    return "fused" if mesh_platform(mesh) == "cpu" else "dot_product_attention"


def multi_head_attention(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh, *,
                         mask_BxQxS: jax.Array | None = None, is_causal: bool = False,
                         kernel: str = "auto") -> jax.Array:
    """softmax(q k^T / sqrt(Dh)) v per head, where mask (True: may attend) and, if is_causal,
    key <= query allow. Query rows that may attend to nothing get exactly zero, not the
    uniform average a fully masked softmax would give (that average would leak positions they
    must not see)."""
    if resolve_kernel(kernel) == "fused":
        if mask_BxQxS is None and is_causal:
            return fused.causal_attention(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh)
        batch, queries, sources = q_BxQxHxDh.shape[0], q_BxQxHxDh.shape[1], k_BxSxHxDh.shape[1]
        if mask_BxQxS is None:
            mask_BxQxS = jnp.ones((batch, queries, sources), bool)
        if is_causal:
            mask_BxQxS = mask_BxQxS & jnp.tril(jnp.ones((queries, sources), bool))
        return fused.softmax_attention(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh, mask_BxQxS)
    mask_Bx1xQxS = None if mask_BxQxS is None else mask_BxQxS[:, None]
    attended_BxQxHxDh = jax.nn.dot_product_attention(
        q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh, mask=mask_Bx1xQxS, is_causal=is_causal)
    if mask_BxQxS is not None:
        sees_any_BxQx1x1 = jnp.any(mask_BxQxS, axis=-1)[:, :, None, None]
        attended_BxQxHxDh = jnp.where(sees_any_BxQx1x1, attended_BxQxHxDh, 0)
    return attended_BxQxHxDh


class MHA(nnx.Module):
    """Causal multi-head self-attention (on GPU: cuDNN's flash kernel through
    jax.nn.dot_product_attention; on CPU: the causal blocks of fused.py)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.attention = AttentionProjections(cfg, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        return self.attention.attend(x_BxLxD, positions_BxL, x_BxLxD, positions_BxL, is_causal=True)


def latent_segment_ends(cfg: ModelConfig) -> jax.Array:
    """e_j = (j+1) * max_seq_len / K: latent j summarizes the positions before e_j."""
    return (jnp.arange(cfg.latent_k) + 1) * (cfg.max_seq_len // cfg.latent_k)


class MHLA(nnx.Module):
    """Causal multi-head latent attention: read, latent self, write.

    K learned latents summarize the sequence in fixed segments, so attention costs O(L*K), not
    O(L^2). Causality: latent j reads only positions < e_j; latents attend causally to each
    other; position i writes from latents with e_j <= i + 1 only. Latent j sits at position
    e_j - 1 for RoPE. The segment ends depend on max_seq_len, not on the input length, so the
    output at i depends only on tokens 0..i.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        latent_init = nnx.initializers.normal(stddev=cfg.d_model ** -0.5)
        self.latents = nnx.Param(latent_init(rngs.params(), (cfg.latent_k, cfg.d_model),
                                             jnp.dtype(cfg.param_dtype)),
                                 out_sharding=(None, "embed"))
        norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.read = AttentionProjections(cfg, rngs=rngs)
        self.read_norm = RMSNorm(cfg.d_model, **norm)
        self.latent_self = AttentionProjections(cfg, rngs=rngs)
        self.latent_self_norm = RMSNorm(cfg.d_model, **norm)
        self.write = AttentionProjections(cfg, rngs=rngs)

    def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        z1_BxKxD = self.read_sequence(x_BxLxD, positions_BxL)
        z2_BxKxD = self.attend_latents(z1_BxKxD)
        return self.write_sequence(x_BxLxD, positions_BxL, z2_BxKxD)

    def latent_positions(self, batch: int) -> jax.Array:
        """Latent j sits at position e_j - 1 (the last one it summarizes) for RoPE; [B, K]."""
        return jnp.broadcast_to(latent_segment_ends(self.cfg) - 1, (batch, self.cfg.latent_k))

    def read_sequence(self, x_BxLxD: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        """Read: latent j attends to the positions before its segment end e_j."""
        batch = x_BxLxD.shape[0]
        z0_BxKxD = jnp.broadcast_to(self.latents[...].astype(x_BxLxD.dtype),
                                    (batch, *self.latents.shape))
        read_mask_BxKxL = positions_BxL[:, None, :] < latent_segment_ends(self.cfg)[None, :, None]
        return self.read_norm(z0_BxKxD + self.read.attend(
            z0_BxKxD, self.latent_positions(batch), x_BxLxD, positions_BxL,
            mask_BxQxS=read_mask_BxKxL))

    def attend_latents(self, z1_BxKxD: jax.Array) -> jax.Array:
        """Latent self: causal over latents (j attends to j' <= j)."""
        latent_pos_BxK = self.latent_positions(z1_BxKxD.shape[0])
        return self.latent_self_norm(z1_BxKxD + self.latent_self.attend(
            z1_BxKxD, latent_pos_BxK, z1_BxKxD, latent_pos_BxK, is_causal=True))

    def write_sequence(self, x_BxLxD, positions_BxL, z2_BxKxD) -> jax.Array:
        """Write: position i attends to the latents whose segment has ended, e_j <= i + 1."""
        ends_K = latent_segment_ends(self.cfg)
        write_mask_BxLxK = ends_K[None, None, :] <= positions_BxL[:, :, None] + 1
        return self.write.attend(x_BxLxD, positions_BxL, z2_BxKxD,
                                 self.latent_positions(x_BxLxD.shape[0]),
                                 mask_BxQxS=write_mask_BxLxK)


ATTENTION_CLASSES = {"mha": MHA, "mhla": MHLA}
