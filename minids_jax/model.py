"""MiniDeepSeek: pre-norm blocks of (MHA | MHLA) attention and a mixture of SwiGLU experts.

Shapes: B batch, L length, D model width, V vocab, N layers, E experts.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minids_jax.attention import ATTENTION_CLASSES
from minids_jax.config import ModelConfig
from minids_jax.layers import RMSNorm, linear
from minids_jax.moe import MoE, MoEStats


class Block(nnx.Module):
    """x = x + attn(norm1(x)); x = x + moe(norm2(x))."""

    def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype)
        self.norm1 = RMSNorm(cfg.d_model, **norm)
        self.attn = ATTENTION_CLASSES[cfg.attention_kind(layer)](cfg, rngs=rngs)
        self.norm2 = RMSNorm(cfg.d_model, **norm)
        self.moe = MoE(cfg, rngs=rngs)

    def __call__(self, x_BxLxD, positions_BxL) -> tuple[jax.Array, MoEStats]:
        x_BxLxD = x_BxLxD + self.attn(self.norm1(x_BxLxD), positions_BxL)
        moe_out_BxLxD, stats = self.moe(self.norm2(x_BxLxD))
        return x_BxLxD + moe_out_BxLxD, stats


class MiniDeepSeek(nnx.Module):
    """The language model: `model(tokens_BxL) -> (logits_BxLxV in float32, aux)`.

    `aux` holds `aux_loss` (balancing loss averaged over layers), `expert_load_NxE`
    (share of assignments per expert in each layer) and `dropped_fraction`.
    Parameters carry logical axis names; they are placed on devices by whoever builds the
    model under a mesh (see `sharding.py`), so building one here never shards eagerly.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        with nnx.use_eager_sharding(False):
            self.embed = nnx.Embed(
                cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(cfg.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0),
                                                     ("vocab", "embed")))
            self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layers)])
            self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=cfg.dtype,
                                      param_dtype=cfg.param_dtype)
            self.head = linear(cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs,
                               dtype=cfg.dtype, param_dtype=cfg.param_dtype)

    def __call__(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None):
        hidden_BxLxD, aux = self.hidden(tokens_BxL, positions_BxL)
        return self.head(hidden_BxLxD).astype(jnp.float32), aux

    def hidden(self, tokens_BxL: jax.Array, positions_BxL: jax.Array | None = None):
        """The final-normed features the head reads, and `aux`: `__call__` without the head
        (the trainer's loss applies the head itself, in chunks; see fused.py)."""
        if positions_BxL is None:
            positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
        x_BxLxD = self.embed(tokens_BxL)
        all_stats = []
        for block in self.blocks:
            x_BxLxD, stats = block(x_BxLxD, positions_BxL)
            all_stats.append(stats)
        aux = {
            "aux_loss": jnp.mean(jnp.stack([s.aux_loss for s in all_stats])),
            "expert_load_NxE": jnp.stack([s.load_E for s in all_stats]),
            "dropped_fraction": jnp.mean(jnp.stack([s.dropped_fraction for s in all_stats])),
        }
        return self.final_norm(x_BxLxD), aux


def count_params(model: nnx.Module) -> int:
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
