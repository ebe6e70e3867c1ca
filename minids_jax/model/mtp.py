"""Multi-token prediction (DeepSeek-V3): sequential modules that each predict one token further.

Module k (1-based) turns the previous module's hidden state h^{k-1} (for k = 1 the main model's
features after its final norm, what its head reads, as transformers' drafter, vLLM and
Megatron-LM feed it) and the embedding of the token k ahead into

    h^k = block_k(proj_k([embed_norm_k(embed(t_{i+k})) ; hidden_norm_k(h^{k-1}_i)]))

(embedding first, as the published checkpoints' `eh_proj` expects), and scores
head(out_norm_k(h^k_i)) against the token k+1 ahead, t_{i+k+1}. The embedding and the head are
the main model's. Names follow the checkpoints: enorm = embed_norm, hnorm = hidden_norm,
eh_proj = proj, shared_head.norm = out_norm. Generation never runs these modules.

Shapes: B batch, L length, D model width.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minids_jax.config import ComputeConfig, ModelConfig
from minids_jax.model.block import Block
from minids_jax.model.layers import RMSNorm, linear
from minids_jax.model.moe import MoEStats, moe_aux


class MTPModule(nnx.Module):
    def __init__(self, cfg: ModelConfig, compute: ComputeConfig, depth: int, *,
                 rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, dtype=compute.dtype, param_dtype=cfg.param_dtype)
        self.embed_norm = RMSNorm(cfg.d_model, **norm)
        self.hidden_norm = RMSNorm(cfg.d_model, **norm)
        self.proj = linear(2 * cfg.d_model, cfg.d_model, (None, "embed"), rngs=rngs,
                           dtype=compute.dtype, param_dtype=cfg.param_dtype)
        # The layers after the main ones: their attention kind continues the pattern, and
        # they are MoE layers (first_k_dense counts main layers only).
        self.block = Block(cfg, compute, cfg.n_layers + depth - 1, rngs=rngs)
        self.out_norm = RMSNorm(cfg.d_model, **norm)

    def __call__(self, hidden_BxLxD, ahead_embedded_BxLxD, positions_BxL, segments_BxL=None,
                 scored_BxL=None):
        """(h^k before out_norm, out_norm(h^k), the block's MoEStats) from h^{k-1} and the
        embeddings k ahead; with segments, attention stays inside each document (loss.py
        scores no target beyond a position's document); the statistics count the positions
        `scored_BxL` marks (all without it)."""
        joined_BxLx2D = jnp.concatenate([self.embed_norm(ahead_embedded_BxLxD),
                                         self.hidden_norm(hidden_BxLxD)], axis=-1)
        hidden_BxLxD, stats, _ = self.block(self.proj(joined_BxLx2D), positions_BxL,
                                            segments_BxL=segments_BxL, scored_BxL=scored_BxL)
        return hidden_BxLxD, self.out_norm(hidden_BxLxD), stats


def shift_left(a_BxL: jax.Array, k: int, fill=0) -> jax.Array:
    """a[:, i + k] at i, `fill` where i + k runs past the window."""
    return jnp.concatenate([a_BxL[:, k:], jnp.full((a_BxL.shape[0], k), fill, a_BxL.dtype)],
                           axis=1)


def mtp_chain(modules, embed, tokens_BxL, features_BxLxD, positions_BxL,
              segments_BxL=None, scored=None) -> tuple[list[jax.Array], list[MoEStats]]:
    """The features out_norm(h^k) of modules k = 1..depth, whose scores at position i are
    for the token k + 1 ahead, and the modules' MoE statistics (module k's of the positions
    `scored[k - 1]` marks, [B, L] each; all without `scored`). `features_BxLxD` are the main
    model's final-normed features (h^0), `embed` its embedding."""
    hidden_BxLxD, features, stats = features_BxLxD, [], []
    for k, module in enumerate(modules, start=1):
        ahead_BxLxD = embed(shift_left(tokens_BxL, k))
        hidden_BxLxD, features_BxLxD, module_stats = module(
            hidden_BxLxD, ahead_BxLxD, positions_BxL, segments_BxL,
            None if scored is None else scored[k - 1])
        features.append(features_BxLxD)
        stats.append(module_stats)
    return features, stats


def with_more_moe_layers(aux: dict[str, jax.Array], stats: list[MoEStats]) -> dict:
    """`aux` of N MoE layers extended by the layers of `stats` (the MTP modules' blocks): the
    means cover all of them, and their loads follow as the last rows of expert_load_NxE."""
    n_before, more = aux["expert_load_NxE"].shape[0], moe_aux(stats)
    if not n_before:  # a dense main model: the modules' layers are all there is
        return {**aux, **more}
    weights = (n_before / (n_before + len(stats)), len(stats) / (n_before + len(stats)))
    merged = {key: weights[0] * aux[key] + weights[1] * more[key]
              for key in ("aux_loss", "dropped_fraction", "sequence_aux_loss")}
    rows = {key: jnp.concatenate([aux[key], more[key]])
            for key in ("expert_load_NxE", "scored_tokens_N")}
    return {**aux, **merged, **rows}
