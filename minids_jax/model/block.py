"""A pre-norm block: attention of the layer's kind, then a mixture of experts (or, in the
first_k_dense layers, a dense SwiGLU).

Shapes: B batch, L length, D model width.
"""

from __future__ import annotations

from flax import nnx

from minids_jax.config import ComputeConfig, ModelConfig
from minids_jax.model.attention import MHA
from minids_jax.model.layers import MLP, RMSNorm
from minids_jax.model.mhla import MHLA
from minids_jax.model.mla import MLA
from minids_jax.model.moe import MoE

ATTENTION_CLASSES = {"mha": MHA, "mhla": MHLA, "mla": MLA}


class Block(nnx.Module):
    """x = x + attn(norm1(x)); x = x + moe(norm2(x)) (a dense `mlp` in the first_k_dense)."""

    def __init__(self, cfg: ModelConfig, compute: ComputeConfig, layer: int, *,
                 rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, dtype=compute.dtype, param_dtype=cfg.param_dtype)
        self.norm1 = RMSNorm(cfg.d_model, **norm)
        self.attn = ATTENTION_CLASSES[cfg.attention_kind(layer)](cfg, compute, rngs=rngs)
        self.norm2 = RMSNorm(cfg.d_model, **norm)
        if cfg.is_moe_layer(layer):
            self.moe = MoE(cfg, compute, rngs=rngs)
        else:
            self.mlp = MLP(cfg.d_model, cfg.dense_mlp_dim, rngs=rngs, dtype=compute.dtype,
                           param_dtype=cfg.param_dtype, bias=cfg.mlp_bias)

    def __call__(self, x_BxLxD, positions_BxL, cache=None, moe_dispatch: str | None = None,
                 segments_BxL=None, scored_BxL=None):
        """(x, MoEStats or None for a dense layer, cache); the MoE's statistics count the
        tokens `scored_BxL` marks (all without it)."""
        attended_BxLxD, cache = self.attn(self.norm1(x_BxLxD), positions_BxL, cache,
                                          segments_BxL)
        x_BxLxD = x_BxLxD + attended_BxLxD
        if not hasattr(self, "moe"):
            return x_BxLxD + self.mlp(self.norm2(x_BxLxD)), None, cache
        moe_out_BxLxD, stats = self.moe(self.norm2(x_BxLxD), moe_dispatch, scored_BxL)
        return x_BxLxD + moe_out_BxLxD, stats, cache
