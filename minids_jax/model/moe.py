"""Mixture of SwiGLU experts with a learned top-k router and Switch load balancing, and
DeepSeekMoE's shared experts and biased sigmoid routing (routing.py).

The router picks each token's top-k experts; `dispatch.py` computes their outputs (all
dispatches agree when nothing is dropped), weighted here by the routing weights; shared experts,
if any, add a dense SwiGLU of every token. With sigmoid routing each layer keeps a per-expert
selection bias: a `RouterBias` variable, model state that is not a parameter (no gradient, no
weight decay, no optimizer moments), saved and restored with the model. Under a mesh
whose batch axes are split (data parallel, FSDP), routing and dispatch run per device on its own
tokens (`shard_map` over those axes): left to the compiler, the global top-k and sort would
gather every token onto every device and repeat the expert work there.

The balancing statistics (expert loads, balance losses) count the scored tokens only, given as
a mask (`scored_BxL`, the loss's weights > 0): padding is routed like any token but must not
move the router biases or the balance losses, as it moves no loss.

Shapes: B batch, L length, D model width, F expert hidden width, E experts, T tokens (B*L),
k experts per token.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.spmd import get_logical_axis_rules
from jax.sharding import PartitionSpec as P

from minids_jax.config import ComputeConfig, ModelConfig
from minids_jax.config.run import as_axes
from minids_jax.model import routing
from minids_jax.model.dispatch import DISPATCHES, Experts
from minids_jax.model.layers import MLP, linear
from minids_jax.model.quant import is_quantized

EXPERT_AXES = {"w1": ("expert", "embed", "mlp"), "w2": ("expert", "embed", "mlp"),
               "w3": ("expert", "mlp", "embed")}  # the logical axes of the routed experts


class RouterBias(nnx.Variable):
    """DeepSeek-V3's per-expert selection bias (HF `e_score_correction_bias`)."""


class MoEStats(NamedTuple):
    aux_loss: jax.Array  # scalar, Switch balancing loss, 1.0 at perfectly uniform routing
    load_E: jax.Array  # fraction of the scored tokens' assignments per expert (sums to 1)
    dropped_fraction: jax.Array  # scalar, assignments dropped for lack of capacity
    sequence_loss: jax.Array  # scalar, DeepSeek-V3's sequence-wise balance loss (1 if uniform)
    scored_tokens: jax.Array  # scalar, the tokens the loads and losses count


def _scored(scored, shape) -> jax.Array:
    """The mask as float32 weights (every token where there is no mask)."""
    return jnp.ones(shape, jnp.float32) if scored is None else scored.astype(jnp.float32)


def sequence_balancing_loss(probs_BxLxE: jax.Array, expert_BxLxK: jax.Array, n_experts: int,
                            axis_names: tuple[str, ...] = (), *,
                            scored_BxL: jax.Array | None = None):
    """sum_e f_e P_e per sequence, averaged over sequences (DeepSeek-V3, eq. 17-20): f_e =
    E / (K L) * assignments to e in the sequence, P_e = the mean normalized score of e, over
    the sequence's L scored tokens (`scored_BxL`; all by default). A sequence without scored
    tokens counts for nothing; inside a shard_map over `axis_names`, the mean is over every
    shard's sequences."""
    top_k = expert_BxLxK.shape[-1]
    scored_BxL = _scored(scored_BxL, expert_BxLxK.shape[:2])
    tokens_B = jnp.sum(scored_BxL, axis=1)
    onehot_BxLxKxE = jax.nn.one_hot(expert_BxLxK, n_experts, dtype=jnp.float32)
    counts_BxE = jnp.sum(onehot_BxLxKxE * scored_BxL[..., None, None], axis=(1, 2))
    prob_sums_BxE = jnp.sum(probs_BxLxE * scored_BxL[..., None], axis=1)
    per_token_B = 1.0 / jnp.maximum(tokens_B, 1.0)
    f_BxE = counts_BxE * (n_experts / top_k) * per_token_B[:, None]
    loss_sum = jnp.sum(jnp.sum(f_BxE * prob_sums_BxE, axis=-1) * per_token_B)
    sequences = jnp.sum((tokens_B > 0).astype(jnp.float32))
    if axis_names:
        loss_sum, sequences = jax.lax.psum((loss_sum, sequences), axis_names)
    return loss_sum / jnp.maximum(sequences, 1.0)


def switch_balancing_loss(probs_TxE: jax.Array, expert_TxK: jax.Array, n_experts: int,
                          axis_names: tuple[str, ...] = (), *, scored_T: jax.Array | None = None):
    """E * sum_e f_e * P_e (Switch Transformer); f_e: assignment share, P_e: mean probability,
    both over the scored tokens (`scored_T`; all by default). Returns the loss and f.

    Inside a shard_map over `axis_names`, f and P are sums over all shards divided by all
    shards' scored tokens, so the loss is the global one.
    """
    top_k = expert_TxK.shape[-1]
    scored_T = _scored(scored_T, expert_TxK.shape[:1])
    onehot_TxKxE = jax.nn.one_hot(expert_TxK, n_experts, dtype=jnp.float32)
    counts_E = jnp.sum(onehot_TxKxE * scored_T[:, None, None], axis=(0, 1))
    prob_sums_E = jnp.sum(probs_TxE * scored_T[:, None], axis=0)
    tokens = jnp.sum(scored_T)
    if axis_names:
        counts_E, prob_sums_E, tokens = jax.lax.psum((counts_E, prob_sums_E, tokens), axis_names)
    per_token = 1.0 / jnp.maximum(tokens, 1.0)
    load_E = counts_E * per_token / top_k
    return n_experts * jnp.sum(load_E * prob_sums_E * per_token), load_E


def local_batch_axes() -> tuple[jax.sharding.AbstractMesh, tuple[str, ...]]:
    """The context mesh and the mesh axes, split >1 ways, over which tokens stay local.

    Those are the axes of the "batch" rule, except ones that also split the experts (their
    tokens must travel to the experts; the compiler's partitioning handles that exchange).
    """
    mesh = jax.sharding.get_abstract_mesh()
    rules = dict(get_logical_axis_rules())
    if mesh.empty or "batch" not in rules:
        return mesh, ()
    expert_axes = set(as_axes(rules.get("expert")))
    return mesh, tuple(a for a in as_axes(rules["batch"])
                       if a not in expert_axes and mesh.shape.get(a, 1) > 1)


class MoE(nnx.Module):
    """`moe(x_BxLxD, scored_BxL=None) -> (y_BxLxD, MoEStats)`, with the dispatch it was built
    with; the statistics count the tokens `scored_BxL` marks (all without it)."""

    def __init__(self, cfg: ModelConfig, compute: ComputeConfig, *, rngs: nnx.Rngs):
        if compute.moe_dispatch not in DISPATCHES:
            raise ValueError(f"compute.moe_dispatch={compute.moe_dispatch!r}: resolve it for "
                             f"a platform first (minids_jax.kernels.resolve).")
        self.cfg, self.dtype = cfg, jnp.dtype(compute.dtype)
        self.dispatch, self.capacity_factor = compute.moe_dispatch, compute.capacity_factor
        d, f, e = cfg.d_model, cfg.expert_hidden_dim, cfg.n_experts
        # The router is stored, trained and applied in float32 whatever model.param_dtype
        # (as transformers keeps it): in bfloat16, 1 to 2% of tokens change their experts.
        self.gate = linear(d, e, ("embed", None), rngs=rngs, dtype="float32",
                           param_dtype="float32")
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.w1 = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                            out_sharding=EXPERT_AXES["w1"])
        self.w2 = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                            out_sharding=EXPERT_AXES["w2"])
        self.w3 = nnx.Param(init(rngs.params(), (e, f, d), param_dtype),
                            out_sharding=EXPERT_AXES["w3"])
        # Adapters of w1, w2, w3 (lora.py): [E, in, R] and [E, R, out], or None.
        for name in ("w1", "w2", "w3"):
            setattr(self, f"{name}_lora_a", nnx.data(None))
            setattr(self, f"{name}_lora_b", nnx.data(None))
        self.lora_scale = 0.0
        self.bias = (RouterBias(jnp.zeros((e,), jnp.float32), out_sharding=(None,))
                     if cfg.router_scoring == "sigmoid" else None)
        self.shared = (MLP(d, cfg.n_shared_experts * f, rngs=rngs, dtype=compute.dtype,
                           param_dtype=cfg.param_dtype) if cfg.n_shared_experts else None)

    def route(self, x_TxD: jax.Array, gate_DxE: jax.Array | None = None,
              bias_E: jax.Array | None = None) -> routing.Routing:
        """Each token's top-k experts and their weights (routing.py), in float32: the logits
        at full float32 precision too, where a GPU or TPU would otherwise multiply float32 in
        TF32 or bfloat16 passes."""
        gate_DxE = self.gate.kernel[...] if gate_DxE is None else gate_DxE
        logits_TxE = jnp.matmul(x_TxD.astype(jnp.float32), gate_DxE.astype(jnp.float32),
                                precision=jax.lax.Precision.HIGHEST)
        if bias_E is None and self.bias is not None:
            bias_E = self.bias[...]
        return routing.route(logits_TxE, bias_E, self.cfg)

    def expert_weight(self, name: str) -> jax.Array:
        """Expert weight `name` ('w1', 'w2', 'w3'), its adapters merged in if it has some
        (the dispatches take whole weights; the merge costs E * in * out * rank, far below the
        tokens' work). A quantized weight is dequantized (see `__call__`)."""
        weight, a, b = (getattr(self, name), getattr(self, f"{name}_lora_a"),
                        getattr(self, f"{name}_lora_b"))
        if a is None:
            return weight[...]
        delta = jnp.einsum("edr,erf->edf", a[...].astype(jnp.float32), b[...].astype(jnp.float32))
        return (weight[...] + self.lora_scale * delta).astype(weight.dtype)

    def experts(self) -> Experts:
        return Experts(*(self.expert_weight(name).astype(self.dtype)
                         for name in ("w1", "w2", "w3")))

    def __call__(self, x_BxLxD: jax.Array, dispatch: str | None = None,
                 scored_BxL: jax.Array | None = None):
        """`dispatch` overrides the built-in one (decoding asks for an exact one)."""
        if not is_quantized(self.w1):
            return self._apply(x_BxLxD, dispatch, scored_BxL)
        # A quantized base: the backward pass runs the layer again from its input (as
        # compute.remat does) instead of keeping every layer's experts dequantized.
        return nnx.remat(type(self)._apply, static_argnums=(2,))(
            self, x_BxLxD, dispatch, scored_BxL)

    def _apply(self, x_BxLxD, dispatch, scored_BxL):
        dispatch = DISPATCHES[dispatch or self.dispatch]
        scored_BxL = _scored(scored_BxL, x_BxLxD.shape[:2])
        gate_DxE = self.gate.kernel[...].astype(jnp.float32)
        bias_E = (jnp.zeros((self.cfg.n_experts,), jnp.float32) if self.bias is None
                  else jax.lax.stop_gradient(self.bias[...]))
        shared_BxLxD = 0.0 if self.shared is None else self.shared(x_BxLxD)
        mesh, axes = local_batch_axes()
        if not axes:
            y_BxLxD, stats = self._forward(x_BxLxD, scored_BxL, gate_DxE, bias_E,
                                           self.experts(), dispatch)
            return y_BxLxD + shared_BxLxD, stats
        # Each device routes and dispatches its own tokens; weights enter whole over `axes`
        # (under FSDP that is the usual all-gather, and the gradient's reduce-scatter).
        tokens, replicated = P(axes), P()
        y_BxLxD, stats = jax.shard_map(
            functools.partial(self._forward, dispatch=dispatch, axis_names=axes), mesh=mesh,
            in_specs=(tokens, tokens, replicated, replicated, replicated),
            out_specs=(tokens, MoEStats(*[replicated] * len(MoEStats._fields))),
            axis_names=set(axes), check_vma=False)(x_BxLxD, scored_BxL, gate_DxE, bias_E,
                                                   self.experts())
        return y_BxLxD + shared_BxLxD, stats

    def _forward(self, x_BxLxD, scored_BxL, gate_DxE, bias_E, experts: Experts, dispatch,
                 axis_names: tuple[str, ...] = ()):
        batch, length, d = x_BxLxD.shape
        routed = self.route(x_BxLxD.reshape(-1, d), gate_DxE, bias_E)
        weight_TxK, expert_TxK = routed.weight_TxK, routed.expert_TxK
        probs_TxE = routing.balance_probabilities(routed)
        aux_loss, load_E = switch_balancing_loss(probs_TxE, expert_TxK, self.cfg.n_experts,
                                                 axis_names, scored_T=scored_BxL.reshape(-1))
        sequence_loss = sequence_balancing_loss(
            probs_TxE.reshape(batch, length, -1), expert_TxK.reshape(batch, length, -1),
            self.cfg.n_experts, axis_names, scored_BxL=scored_BxL)
        scored_tokens = jnp.sum(scored_BxL)
        if axis_names:
            scored_tokens = jax.lax.psum(scored_tokens, axis_names)
        y_BxLxKxD, dropped = dispatch(x_BxLxD, expert_TxK.reshape(batch, length, -1), experts,
                                      self.capacity_factor)
        if axis_names:
            dropped = jax.lax.pmean(dropped, axis_names)
        weight_BxLxK = weight_TxK.reshape(batch, length, -1).astype(y_BxLxKxD.dtype)
        y_BxLxD = jnp.einsum("blkd,blk->bld", y_BxLxKxD, weight_BxLxK)
        return y_BxLxD, MoEStats(aux_loss, load_E, dropped, sequence_loss, scored_tokens)


def moe_aux(stats: list[MoEStats]) -> dict[str, jax.Array]:
    """The MoE layers' statistics as `Output.aux` holds them: balancing losses and dropped
    share averaged over the layers, and each layer's expert load (a row of expert_load_NxE)
    and the scored tokens it counts (scored_tokens_N). A dense model (no MoE layer) has no
    balancing to do: zeros, and no rows."""
    if not stats:
        zero = jnp.zeros((), jnp.float32)
        return {"aux_loss": zero, "expert_load_NxE": jnp.zeros((0, 0), jnp.float32),
                "dropped_fraction": zero, "sequence_aux_loss": zero,
                "scored_tokens_N": jnp.zeros((0,), jnp.float32)}
    return {
        "aux_loss": jnp.mean(jnp.stack([s.aux_loss for s in stats])),
        "expert_load_NxE": jnp.stack([s.load_E for s in stats]),
        "dropped_fraction": jnp.mean(jnp.stack([s.dropped_fraction for s in stats])),
        "sequence_aux_loss": jnp.mean(jnp.stack([s.sequence_loss for s in stats])),
        "scored_tokens_N": jnp.stack([s.scored_tokens for s in stats]),
    }
