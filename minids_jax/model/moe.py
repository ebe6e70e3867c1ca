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


class RouterBias(nnx.Variable):
    """DeepSeek-V3's per-expert selection bias (HF `e_score_correction_bias`)."""


class MoEStats(NamedTuple):
    aux_loss: jax.Array  # scalar, Switch balancing loss, 1.0 at perfectly uniform routing
    load_E: jax.Array  # fraction of assignments routed to each expert (sums to 1)
    dropped_fraction: jax.Array  # scalar, assignments dropped for lack of capacity
    sequence_loss: jax.Array  # scalar, DeepSeek-V3's sequence-wise balance loss (1 if uniform)


def sequence_balancing_loss(probs_BxLxE: jax.Array, expert_BxLxK: jax.Array, n_experts: int,
                            axis_names: tuple[str, ...] = ()):
    """sum_e f_e P_e per sequence, averaged over sequences (DeepSeek-V3, eq. 17-20): f_e =
    E / (K L) * assignments to e in the sequence, P_e = the mean normalized score of e."""
    length, top_k = expert_BxLxK.shape[1:]
    counts_BxE = jnp.sum(jax.nn.one_hot(expert_BxLxK, n_experts, dtype=jnp.float32), (1, 2))
    f_BxE = counts_BxE * n_experts / (top_k * length)
    loss = jnp.mean(jnp.sum(f_BxE * jnp.mean(probs_BxLxE, axis=1), axis=-1))
    return jax.lax.pmean(loss, axis_names) if axis_names else loss


def switch_balancing_loss(probs_TxE: jax.Array, expert_TxK: jax.Array, n_experts: int,
                          axis_names: tuple[str, ...] = ()):
    """E * sum_e f_e * P_e (Switch Transformer); f_e: assignment share, P_e: mean probability.

    Inside a shard_map over `axis_names`, f and P are averaged over all shards first (equal
    shard sizes: the mean of the means is the global mean), so the loss is the global one.
    """
    load_E = jnp.mean(jax.nn.one_hot(expert_TxK, n_experts, dtype=jnp.float32), axis=(0, 1))
    mean_prob_E = jnp.mean(probs_TxE, axis=0)
    if axis_names:
        load_E, mean_prob_E = jax.lax.pmean((load_E, mean_prob_E), axis_names)
    return n_experts * jnp.sum(load_E * mean_prob_E), load_E


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
    """`moe(x_BxLxD) -> (y_BxLxD, MoEStats)`, with the dispatch it was built with."""

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
                            out_sharding=("expert", "embed", "mlp"))
        self.w2 = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                            out_sharding=("expert", "embed", "mlp"))
        self.w3 = nnx.Param(init(rngs.params(), (e, f, d), param_dtype),
                            out_sharding=("expert", "mlp", "embed"))
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
        tokens' work)."""
        weight, a, b = (getattr(self, name), getattr(self, f"{name}_lora_a"),
                        getattr(self, f"{name}_lora_b"))
        if a is None:
            return weight[...]
        delta = jnp.einsum("edr,erf->edf", a[...].astype(jnp.float32), b[...].astype(jnp.float32))
        return (weight[...] + self.lora_scale * delta).astype(weight.dtype)

    def experts(self) -> Experts:
        return Experts(*(self.expert_weight(name).astype(self.dtype)
                         for name in ("w1", "w2", "w3")))

    def __call__(self, x_BxLxD: jax.Array, dispatch: str | None = None):
        """`dispatch` overrides the built-in one (decoding asks for an exact one)."""
        dispatch = DISPATCHES[dispatch or self.dispatch]
        gate_DxE = self.gate.kernel[...].astype(jnp.float32)
        bias_E = (jnp.zeros((self.cfg.n_experts,), jnp.float32) if self.bias is None
                  else jax.lax.stop_gradient(self.bias[...]))
        shared_BxLxD = 0.0 if self.shared is None else self.shared(x_BxLxD)
        mesh, axes = local_batch_axes()
        if not axes:
            y_BxLxD, stats = self._forward(x_BxLxD, gate_DxE, bias_E, self.experts(), dispatch)
            return y_BxLxD + shared_BxLxD, stats
        # Each device routes and dispatches its own tokens; weights enter whole over `axes`
        # (under FSDP that is the usual all-gather, and the gradient's reduce-scatter).
        tokens, replicated = P(axes), P()
        y_BxLxD, stats = jax.shard_map(
            functools.partial(self._forward, dispatch=dispatch, axis_names=axes), mesh=mesh,
            in_specs=(tokens, replicated, replicated, replicated),
            out_specs=(tokens, MoEStats(replicated, replicated, replicated, replicated)),
            axis_names=set(axes), check_vma=False)(x_BxLxD, gate_DxE, bias_E, self.experts())
        return y_BxLxD + shared_BxLxD, stats

    def _forward(self, x_BxLxD, gate_DxE, bias_E, experts: Experts, dispatch,
                 axis_names: tuple[str, ...] = ()):
        batch, length, d = x_BxLxD.shape
        routed = self.route(x_BxLxD.reshape(-1, d), gate_DxE, bias_E)
        weight_TxK, expert_TxK = routed.weight_TxK, routed.expert_TxK
        probs_TxE = routing.balance_probabilities(routed)
        aux_loss, load_E = switch_balancing_loss(probs_TxE, expert_TxK, self.cfg.n_experts,
                                                 axis_names)
        sequence_loss = sequence_balancing_loss(
            probs_TxE.reshape(batch, length, -1), expert_TxK.reshape(batch, length, -1),
            self.cfg.n_experts, axis_names)
        y_BxLxKxD, dropped = dispatch(x_BxLxD, expert_TxK.reshape(batch, length, -1), experts,
                                      self.capacity_factor)
        if axis_names:
            dropped = jax.lax.pmean(dropped, axis_names)
        weight_BxLxK = weight_TxK.reshape(batch, length, -1).astype(y_BxLxKxD.dtype)
        y_BxLxD = jnp.einsum("blkd,blk->bld", y_BxLxKxD, weight_BxLxK)
        return y_BxLxD, MoEStats(aux_loss, load_E, dropped, sequence_loss)


def moe_aux(stats: list[MoEStats]) -> dict[str, jax.Array]:
    """The MoE layers' statistics as `Output.aux` holds them: balancing losses and dropped
    share averaged over the layers, and each layer's expert load (a row of expert_load_NxE).
    A dense model (no MoE layer) has no balancing to do: zeros, and no load rows."""
    if not stats:
        zero = jnp.zeros((), jnp.float32)
        return {"aux_loss": zero, "expert_load_NxE": jnp.zeros((0, 0), jnp.float32),
                "dropped_fraction": zero, "sequence_aux_loss": zero}
    return {
        "aux_loss": jnp.mean(jnp.stack([s.aux_loss for s in stats])),
        "expert_load_NxE": jnp.stack([s.load_E for s in stats]),
        "dropped_fraction": jnp.mean(jnp.stack([s.dropped_fraction for s in stats])),
        "sequence_aux_loss": jnp.mean(jnp.stack([s.sequence_loss for s in stats])),
    }
