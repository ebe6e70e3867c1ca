"""MiniDeepSeek: pre-norm blocks of (MHA | MHLA | MLA) attention and a mixture of SwiGLU experts.

One forward serves training and decoding: without a cache it runs whole sequences; with the
cache of `init_cache` it continues a sequence (a prompt from slot 0, then a token at a time)
and returns the updated cache.

Shapes: B batch, L length, D model width, V vocab, N layers, E experts.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from minids_jax.config import ComputeConfig, ModelConfig
from minids_jax.model import scan as layer_scan
from minids_jax.model.block import Block
from minids_jax.model.layers import RMSNorm, linear
from minids_jax.model.moe import MoE, MoEStats, moe_aux
from minids_jax.model.mtp import MTPModule
from minids_jax.model.quant import is_quantized


class Output(NamedTuple):
    logits_BxLxV: jax.Array  # float32
    aux: dict[str, jax.Array]  # moe.moe_aux: aux_loss, expert_load_NxE, dropped_fraction, ...
    cache: Any  # the updated per-layer caches; None without a cache


class MiniDeepSeek(nnx.Module):
    """The language model: `model(tokens_BxL, positions_BxL=None, cache=None) -> Output`.

    `aux` holds `aux_loss` (balancing loss averaged over the MoE layers), `expert_load_NxE`
    (share of assignments per expert in each of the N MoE layers) and `dropped_fraction`.
    `compute` names concrete kernels (`kernels.resolve`; `model.build` resolves them for a
    platform). Parameters carry logical axis names; whoever builds the model under a mesh
    places them (sharding.py).
    """

    def __init__(self, cfg: ModelConfig, compute: ComputeConfig, *, rngs: nnx.Rngs):
        if not compute.scan_min_repeats:
            raise ValueError("compute.scan_min_repeats=0: resolve it for a platform first "
                             "(minids_jax.kernels.resolve).")
        self.cfg, self.compute = cfg, compute
        with nnx.use_eager_sharding(False):
            self.embed = nnx.Embed(
                cfg.vocab_size, cfg.d_model, dtype=jnp.dtype(compute.dtype),
                param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs,
                embedding_init=nnx.with_partitioning(nnx.initializers.normal(1.0),
                                                     ("vocab", "embed")))
            self.blocks = nnx.List([Block(cfg, compute, i, rngs=rngs)
                                    for i in range(cfg.n_layers)])
            self.final_norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps, dtype=compute.dtype,
                                      param_dtype=cfg.param_dtype)
            # Tied: the head is the embedding, transposed (logits, head_matmul).
            self.head = nnx.data(None if cfg.tie_embeddings else linear(
                cfg.d_model, cfg.vocab_size, ("embed", "vocab"), rngs=rngs,
                dtype=compute.dtype, param_dtype=cfg.param_dtype))
            # Last, so the main parameters of a seed do not depend on mtp_depth; None: no state.
            self.mtp = nnx.List([MTPModule(cfg, compute, k, rngs=rngs)
                                 for k in range(1, cfg.mtp_depth + 1)]) if cfg.mtp_depth else None

    def init_cache(self, batch: int, max_len: int | None = None) -> list:
        """Empty per-layer caches for decoding up to `max_len` (default model.max_seq_len)."""
        max_len = max_len or self.cfg.max_seq_len
        return [block.attn.init_cache(batch, max_len, jnp.dtype(self.compute.dtype))
                for block in self.blocks]

    def router_biases(self) -> list[nnx.Variable]:
        """The MoE layers' balancing biases (model.router_bias), in the order of the rows of
        aux["expert_load_NxE"]: the main layers', then the MTP modules'. [] without them."""
        blocks = list(self.blocks) + [module.block for module in self.mtp or ()]
        return [moe.bias for block in blocks for _, moe in nnx.iter_modules(block)
                if isinstance(moe, MoE) and moe.bias is not None]

    def __call__(self, tokens_BxL, positions_BxL=None, cache=None, *,
                 moe_dispatch: str | None = None, segments_BxL=None) -> Output:
        hidden_BxLxD, aux, cache = self.hidden(tokens_BxL, positions_BxL, cache,
                                               moe_dispatch=moe_dispatch,
                                               segments_BxL=segments_BxL)
        return Output(self.logits(hidden_BxLxD), aux, cache)

    def logits(self, features_BxLxD: jax.Array) -> jax.Array:
        """The head's float32 logits of final-normed features."""
        if self.head is None:
            return self.embed.attend(features_BxLxD).astype(jnp.float32)
        return self.head(features_BxLxD).astype(jnp.float32)

    def head_matmul(self, features_BxLxD: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(x, kernel_DxV) with x @ kernel = the head's logits, for the chunked head loss."""
        if self.head is None:
            return features_BxLxD, self.embed.embedding[...].T
        return self.head.as_one_matmul(features_BxLxD)

    def hidden(self, tokens_BxL, positions_BxL=None, cache=None, *,
               moe_dispatch: str | None = None, segments_BxL=None) -> tuple[jax.Array, dict, Any]:
        """(features, aux, cache): the final-normed features the head reads, i.e. `__call__`
        without the head (the loss applies the head itself, in chunks)."""
        features_BxLxD, aux, cache = self.trunk(tokens_BxL, positions_BxL, cache,
                                                moe_dispatch=moe_dispatch,
                                                segments_BxL=segments_BxL)
        return self.final_norm(features_BxLxD), aux, cache

    def trunk(self, tokens_BxL, positions_BxL=None, cache=None, *,
              moe_dispatch: str | None = None, segments_BxL=None,
              scored_BxL=None) -> tuple[jax.Array, dict, Any]:
        """(last block's output, aux, cache): `hidden` before the final norm, which is what
        the multi-token-prediction modules read. Positions default to the cache's next slots.
        `moe_dispatch` overrides the MoE's own (decoding asks for an exact one). With
        `segments_BxL` (a packed window's document numbers; no cache), attention stays
        inside each document, and the positions should restart in each. With `scored_BxL`
        (True where the loss scores the position), the MoE statistics count those tokens only:
        padding moves neither the expert loads nor the balance losses."""
        if segments_BxL is not None and cache is not None:
            raise ValueError("segments_BxL masks a whole packed window; a cache decodes one "
                             "sequence: pass one or the other.")
        if positions_BxL is None:
            start = 0 if cache is None else cache[0].index
            positions_BxL = jnp.broadcast_to(start + jnp.arange(tokens_BxL.shape[1]),
                                             tokens_BxL.shape)
        x_BxLxD = self.embed(tokens_BxL)
        if cache is None:  # a whole sequence: scanned and rematerialized as compute says
            x_BxLxD, all_stats = layer_scan.apply_blocks(
                self.blocks, x_BxLxD, positions_BxL, period=len(self.cfg.attn_pattern),
                scan_min_repeats=(self.compute.scan_min_repeats if self.compute.scan_layers
                                  else None), remat=self.compute.remat,
                moe_dispatch=moe_dispatch, segments_BxL=segments_BxL, scored_BxL=scored_BxL)
            return x_BxLxD, moe_aux(all_stats), None
        all_stats: list[MoEStats] = []
        new_cache = []
        for i, block in enumerate(self.blocks):
            x_BxLxD, stats, layer_cache = block(x_BxLxD, positions_BxL, cache[i], moe_dispatch,
                                                scored_BxL=scored_BxL)
            if stats is not None:
                all_stats.append(stats)
            new_cache.append(layer_cache)
        return x_BxLxD, moe_aux(all_stats), new_cache


def count_params(model: nnx.Module) -> int:
    """Parameters, a weight stored quantized (lora.base_quant) counting as its full shape."""
    quantized = sum(math.prod(module.shape) for _, module in nnx.iter_modules(model)
                    if is_quantized(module))
    return quantized + sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
