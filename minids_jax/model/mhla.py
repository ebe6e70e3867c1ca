"""Causal multi-head latent attention (the original's MHLA, made causal): read, latent self, write.

K learned latents summarize the sequence in fixed segments, so attention costs O(L*K), not
O(L^2). Latent j summarizes the positions before its segment end e_j = (j+1) * max_seq_len / K
and sits at position e_j - 1 for RoPE. Causality: latent j reads only positions < e_j; latents
attend causally to each other; position i writes from the latents with e_j <= i + 1 only. The
segment ends depend on max_seq_len, not on the input length, so the output at i depends only
on tokens 0..i; positions before the first segment end see no latent and get exactly zero.

Decoding caches the read keys/values of every position and the latent-self and write
keys/values of each latent. At slot i only latent j = i // (L/K) is still open (e_j > i): a
step writes the token into the read cache, re-reads that one latent from it, runs it through
latent self against the cached latents j' <= j, and refreshes its write keys/values. Position
i then writes from the latents with e_j <= i + 1, whose entries are final.

Shapes: B batch, L length, T tokens of this call, S cache slots, D model width, K latents.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minids_jax.config import ComputeConfig, ModelConfig
from minids_jax.model.attention import (
    AttentionProjections,
    KeysValues,
    same_document,
    up_to,
)
from minids_jax.model.layers import RMSNorm


def latent_segment_ends(cfg: ModelConfig) -> jax.Array:
    """e_j = (j+1) * max_seq_len / K: latent j summarizes the positions before e_j."""
    return (jnp.arange(cfg.latent_k) + 1) * (cfg.max_seq_len // cfg.latent_k)


class MHLACache(NamedTuple):
    read: KeysValues  # [B, S, H, Dh]: every slot so far
    latent_self: KeysValues  # [B, K, H, Dh]: each latent after the read
    write: KeysValues  # [B, K, H, Dh]: each latent after latent self
    index: jax.Array  # int32: slots filled


class MHLA(nnx.Module):

    def __init__(self, cfg: ModelConfig, compute: ComputeConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        latent_init = nnx.initializers.normal(stddev=cfg.d_model ** -0.5)
        self.latents = nnx.Param(latent_init(rngs.params(), (cfg.latent_k, cfg.d_model),
                                             jnp.dtype(cfg.param_dtype)),
                                 out_sharding=(None, "embed"))
        norm = dict(eps=cfg.norm_eps, dtype=compute.dtype, param_dtype=cfg.param_dtype)
        self.read = AttentionProjections(cfg, compute, rngs=rngs)
        self.read_norm = RMSNorm(cfg.d_model, **norm)
        self.latent_self = AttentionProjections(cfg, compute, rngs=rngs)
        self.latent_self_norm = RMSNorm(cfg.d_model, **norm)
        self.write = AttentionProjections(cfg, compute, rngs=rngs)

    def init_cache(self, batch: int, max_len: int, dtype) -> MHLACache:
        """A cache for slots 0..max_len-1 (max_len <= model.max_seq_len: the segments are
        fixed by it)."""
        if max_len > self.cfg.max_seq_len:
            raise ValueError(f"an MHLA cache holds at most model.max_seq_len="
                             f"{self.cfg.max_seq_len} slots, not {max_len}.")
        latents = KeysValues.empty(batch, self.cfg.latent_k, self.cfg, dtype)
        return MHLACache(KeysValues.empty(batch, max_len, self.cfg, dtype), latents, latents,
                         jnp.zeros((), jnp.int32))

    def __call__(self, x_BxTxD, positions_BxT, cache: MHLACache | None = None,
                 segments_BxT: jax.Array | None = None):
        """Uncached: the whole sequence (with segments, each document on its own). Cached:
        one token (decoding) or, from slot 0, a prompt (prefill)."""
        read_kv = self.read.keys_values(x_BxTxD, positions_BxT)
        if cache is not None and x_BxTxD.shape[1] == 1:
            return self._decode(x_BxTxD, positions_BxT, read_kv, cache)
        if segments_BxT is not None:
            return self._documents(x_BxTxD, positions_BxT, segments_BxT, read_kv), None
        z1_BxKxD = self.read_latents(read_kv, positions_BxT)
        latent_pos_BxK = self.latent_positions(x_BxTxD.shape[0])
        latent_self_kv = self.latent_self.keys_values(z1_BxKxD, latent_pos_BxK)
        z2_BxKxD = self.latent_self_norm(z1_BxKxD + self.latent_self.attend(
            z1_BxKxD, latent_pos_BxK, latent_self_kv, is_causal=True))
        write_kv = self.write.keys_values(z2_BxKxD, latent_pos_BxK)
        ends_K = latent_segment_ends(self.cfg)
        write_mask_BxTxK = ends_K[None, None, :] <= positions_BxT[:, :, None] + 1
        out_BxTxD = self.write.attend(x_BxTxD, positions_BxT, write_kv,
                                      mask_BxQxS=write_mask_BxTxK)
        if cache is None:
            return out_BxTxD, None
        return out_BxTxD, MHLACache(cache.read.put(read_kv, 0), cache.latent_self.put(
            latent_self_kv, 0), cache.write.put(write_kv, 0), cache.index + x_BxTxD.shape[1])

    def _documents(self, x_BxTxD, positions_BxT, segments_BxT, read_kv: KeysValues):
        """The forward of a window packed with documents, positions restarting in each: every
        document gets its own latents, as if it were alone. Latent j of a document completes
        at its token with position e_j - 1; there are at most N = T // (L/K) such tokens in a
        window, so N slots hold them all: slot n is the n-th latent to complete in the row. It
        reads its document up to that token, attends to the earlier slots of its document, and
        is written from by its document's tokens from that token on."""
        cfg, tokens = self.cfg, positions_BxT.shape[1]
        segment = cfg.max_seq_len // cfg.latent_k
        ends_here_BxT = ((positions_BxT + 1) % segment == 0) & \
            (positions_BxT < cfg.latent_k * segment)
        slot_token_BxN = jax.vmap(lambda ends_T: jnp.nonzero(
            ends_T, size=max(1, tokens // segment), fill_value=tokens)[0])(ends_here_BxT)
        used_BxN = slot_token_BxN < tokens
        at_BxN = jnp.minimum(slot_token_BxN, tokens - 1)
        slot_pos_BxN = jnp.take_along_axis(positions_BxT, at_BxN, axis=1)  # e_j - 1
        slot_segment_BxN = jnp.where(used_BxN, jnp.take_along_axis(segments_BxT, at_BxN, 1), -1)
        latent_BxN = jnp.clip((slot_pos_BxN + 1) // segment - 1, 0, cfg.latent_k - 1)
        z0_BxNxD = self.latents[...][latent_BxN].astype(read_kv.v_BxSxHxDh.dtype)

        token_T = jnp.arange(tokens)
        same_BxNxT = same_document(slot_segment_BxN, segments_BxT)
        read_mask_BxNxT = same_BxNxT & (token_T[None, None, :] <= slot_token_BxN[:, :, None])
        z1_BxNxD = self.read_norm(z0_BxNxD + self.read.attend(
            z0_BxNxD, slot_pos_BxN, read_kv, mask_BxQxS=read_mask_BxNxT))
        self_mask_BxNxN = same_document(slot_segment_BxN, slot_segment_BxN) & used_BxN[:, :, None]
        z2_BxNxD = self.latent_self_norm(z1_BxNxD + self.latent_self.attend(
            z1_BxNxD, slot_pos_BxN, self.latent_self.keys_values(z1_BxNxD, slot_pos_BxN),
            mask_BxQxS=self_mask_BxNxN, is_causal=True))
        write_kv = self.write.keys_values(z2_BxNxD, slot_pos_BxN)
        write_mask_BxTxN = same_BxNxT.swapaxes(1, 2) & \
            (slot_token_BxN[:, None, :] <= token_T[None, :, None])
        return self.write.attend(x_BxTxD, positions_BxT, write_kv, mask_BxQxS=write_mask_BxTxN)

    def latent_positions(self, batch: int) -> jax.Array:
        """Latent j sits at position e_j - 1 (the last one it summarizes) for RoPE; [B, K]."""
        return jnp.broadcast_to(latent_segment_ends(self.cfg) - 1, (batch, self.cfg.latent_k))

    def read_latents(self, read_kv: KeysValues, positions_BxS: jax.Array) -> jax.Array:
        """Read: latent j attends to the positions before its segment end e_j."""
        batch = positions_BxS.shape[0]
        z0_BxKxD = jnp.broadcast_to(self.latents[...].astype(read_kv.v_BxSxHxDh.dtype),
                                    (batch, *self.latents.shape))
        read_mask_BxKxS = positions_BxS[:, None, :] < latent_segment_ends(self.cfg)[None, :, None]
        return self.read_norm(z0_BxKxD + self.read.attend(
            z0_BxKxD, self.latent_positions(batch), read_kv, mask_BxQxS=read_mask_BxKxS))

    def _decode(self, x_Bx1xD, positions_Bx1, read_kv: KeysValues, cache: MHLACache):
        cfg, batch, slot = self.cfg, x_Bx1xD.shape[0], cache.index
        segment = cfg.max_seq_len // cfg.latent_k
        open_latent = slot // segment  # the one latent whose segment is still being read
        latent_pos_Bx1 = jnp.full((batch, 1), (open_latent + 1) * segment - 1)

        # Read: the open latent attends to every slot so far (all lie before its end).
        read = cache.read.put(read_kv, slot)
        z0_Bx1xD = jnp.broadcast_to(jax.lax.dynamic_slice_in_dim(
            self.latents[...], open_latent, 1).astype(x_Bx1xD.dtype), (batch, 1, cfg.d_model))
        z1_Bx1xD = self.read_norm(z0_Bx1xD + self.read.attend(
            z0_Bx1xD, latent_pos_Bx1, read,
            mask_BxQxS=up_to(slot, read.k_BxSxHxDh.shape[1], batch)))

        # Latent self: causal over latents, against the cached (complete) latents before it.
        latent_self = cache.latent_self.put(
            self.latent_self.keys_values(z1_Bx1xD, latent_pos_Bx1), open_latent)
        z2_Bx1xD = self.latent_self_norm(z1_Bx1xD + self.latent_self.attend(
            z1_Bx1xD, latent_pos_Bx1, latent_self,
            mask_BxQxS=up_to(open_latent, cfg.latent_k, batch)))

        # Write: only latents whose segment has ended; the open one counts once slot = e_j - 1.
        write = cache.write.put(self.write.keys_values(z2_Bx1xD, latent_pos_Bx1), open_latent)
        ended_Bx1xK = jnp.broadcast_to(latent_segment_ends(cfg) <= slot + 1,
                                       (batch, 1, cfg.latent_k))
        out_Bx1xD = self.write.attend(x_Bx1xD, positions_Bx1, write, mask_BxQxS=ended_Bx1xK)
        return out_Bx1xD, MHLACache(read, latent_self, write, slot + 1)
