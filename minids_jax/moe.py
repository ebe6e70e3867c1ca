"""Mixture of SwiGLU experts with a learned top-k router and Switch load balancing.

Shapes: B batch, L length, D model width, F expert hidden width, E experts, T tokens (B*L),
k experts per token, A assignments (T*k), C expert capacity per sequence.

Three interchangeable dispatches (`model.moe_dispatch`), identical in output when nothing
is dropped:
  dropless  sort assignments by expert, one `jax.lax.ragged_dot` per weight; nothing dropped.
  capacity  scatter each sequence's assignments into an [E, C, D] buffer (C from
            capacity_factor), einsum, gather back; assignments past capacity are dropped and
            their fraction is reported.
  dense     every expert on every token, weighted by the (mostly zero) routing weights;
            costs E/k times more, kept as a simple reference.

Under a mesh whose batch axes are split (data parallel, FSDP), routing and dispatch run per
device on its own tokens (`shard_map` over those axes): left to the compiler, the global
top-k and sort would gather every token onto every device and repeat the expert work there.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from flax.core.spmd import get_logical_axis_rules
from jax.sharding import PartitionSpec as P

from minids_jax.config import ModelConfig
from minids_jax.layers import linear


class MoEStats(NamedTuple):
    aux_loss: jax.Array  # scalar, Switch balancing loss, 1.0 at perfectly uniform routing
    load_E: jax.Array  # fraction of assignments routed to each expert (sums to 1)
    dropped_fraction: jax.Array  # scalar, assignments dropped for lack of capacity


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

    def as_tuple(axes):
        return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))

    expert_axes = set(as_tuple(rules.get("expert")))
    return mesh, tuple(a for a in as_tuple(rules["batch"])
                       if a not in expert_axes and mesh.shape.get(a, 1) > 1)


class MoE(nnx.Module):

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, e = cfg.d_model, cfg.hidden_dim, cfg.n_experts
        # The router stays float32: routing decisions are sensitive to rounding.
        self.gate = linear(d, e, ("embed", None), rngs=rngs, dtype="float32",
                           param_dtype=cfg.param_dtype)
        init = nnx.initializers.lecun_normal(in_axis=-2, out_axis=-1, batch_axis=(0,))
        param_dtype = jnp.dtype(cfg.param_dtype)
        self.w1 = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                            out_sharding=("expert", "embed", "mlp"))
        self.w2 = nnx.Param(init(rngs.params(), (e, d, f), param_dtype),
                            out_sharding=("expert", "embed", "mlp"))
        self.w3 = nnx.Param(init(rngs.params(), (e, f, d), param_dtype),
                            out_sharding=("expert", "mlp", "embed"))

    def route(self, x_TxD: jax.Array, gate_DxE: jax.Array | None = None):
        """Top-k experts per token and their weights (the softmax probabilities themselves).

        With k=1 the weight is p_e itself, never renormalized to 1, so the router gets a
        gradient through the expert output. With k>1 the k weights are renormalized to sum to
        1 (Mixtral style); their ratios still carry the gradient.
        """
        x_TxD = x_TxD.astype(jnp.float32)
        logits_TxE = self.gate(x_TxD) if gate_DxE is None else x_TxD @ gate_DxE
        probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
        weight_TxK, expert_TxK = jax.lax.top_k(probs_TxE, self.cfg.top_k)
        if self.cfg.top_k > 1:
            weight_TxK = weight_TxK / jnp.sum(weight_TxK, axis=-1, keepdims=True)
        return probs_TxE, weight_TxK, expert_TxK

    def weights(self):
        dtype = jnp.dtype(self.cfg.dtype)
        return tuple(w[...].astype(dtype) for w in (self.w1, self.w2, self.w3))

    def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, MoEStats]:
        gate_DxE = self.gate.kernel[...].astype(jnp.float32)
        mesh, axes = local_batch_axes()
        if not axes:
            return self._forward(x_BxLxD, gate_DxE, self.weights())
        # Each device routes and dispatches its own tokens; weights enter whole over `axes`
        # (under FSDP that is the usual all-gather, and the gradient's reduce-scatter).
        tokens, replicated = P(axes), P()
        return jax.shard_map(
            functools.partial(self._forward, axis_names=axes), mesh=mesh,
            in_specs=(tokens, replicated, replicated),
            out_specs=(tokens, MoEStats(replicated, replicated, replicated)),
            axis_names=set(axes), check_vma=False)(x_BxLxD, gate_DxE, self.weights())

    def _forward(self, x_BxLxD, gate_DxE, weights, axis_names: tuple[str, ...] = ()):
        batch, length, d = x_BxLxD.shape
        x_TxD = x_BxLxD.reshape(batch * length, d)
        probs_TxE, weight_TxK, expert_TxK = self.route(x_TxD, gate_DxE)
        aux_loss, load_E = switch_balancing_loss(probs_TxE, expert_TxK, self.cfg.n_experts,
                                                 axis_names)
        dropped = jnp.zeros((), jnp.float32)
        if self.cfg.moe_dispatch == "dropless":
            y_TxKxD = self._dropless(x_TxD, expert_TxK, weights)
        elif self.cfg.moe_dispatch == "capacity":
            y_TxKxD, dropped = self._capacity(x_BxLxD, expert_TxK.reshape(batch, length, -1),
                                              weights)
            if axis_names:
                dropped = jax.lax.pmean(dropped, axis_names)
        else:
            y_TxKxD = self._dense(x_TxD, expert_TxK, weights)
        y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD, weight_TxK.astype(y_TxKxD.dtype))
        return y_TxD.reshape(batch, length, d), MoEStats(aux_loss, load_E, dropped)

    def _dropless(self, x_TxD, expert_TxK, weights):
        w1, w2, w3 = weights
        tokens, k = expert_TxK.shape
        expert_A = expert_TxK.reshape(-1)
        order_A = jnp.argsort(expert_A, stable=True)
        group_sizes_E = jnp.bincount(expert_A, length=self.cfg.n_experts).astype(jnp.int32)
        x_AxD = x_TxD.astype(w1.dtype)[order_A // k]
        hidden_AxF = (jax.nn.silu(jax.lax.ragged_dot(x_AxD, w1, group_sizes_E))
                      * jax.lax.ragged_dot(x_AxD, w2, group_sizes_E))
        y_sorted_AxD = jax.lax.ragged_dot(hidden_AxF, w3, group_sizes_E)
        y_AxD = jnp.zeros_like(y_sorted_AxD).at[order_A].set(y_sorted_AxD)
        return y_AxD.reshape(tokens, k, -1)

    def capacity(self, length: int) -> int:
        cfg = self.cfg
        return max(1, math.ceil(cfg.capacity_factor * length * cfg.top_k / cfg.n_experts))

    def _capacity(self, x_BxLxD, expert_BxLxK, weights):
        """Per-sequence capacity dispatch; first choices take precedence over second ones."""
        w1, w2, w3 = weights
        batch, length, k = expert_BxLxK.shape
        cap = self.capacity(length)
        expert_BxA = jnp.swapaxes(expert_BxLxK, 1, 2).reshape(batch, k * length)  # k-major
        onehot_BxAxE = jax.nn.one_hot(expert_BxA, self.cfg.n_experts, dtype=jnp.int32)
        slot_BxA = jnp.sum((jnp.cumsum(onehot_BxAxE, axis=1) - 1) * onehot_BxAxE, axis=-1)
        kept_BxA = slot_BxA < cap
        token_A = jnp.tile(jnp.arange(length), k)
        batch_Bx1 = jnp.arange(batch)[:, None]
        x_BxAxD = x_BxLxD.astype(w1.dtype)[:, token_A]
        buffer_BxExCxD = jnp.zeros((batch, self.cfg.n_experts, cap, x_BxLxD.shape[-1]), w1.dtype)
        buffer_BxExCxD = buffer_BxExCxD.at[batch_Bx1, expert_BxA, slot_BxA].set(x_BxAxD, mode="drop")
        hidden_BxExCxF = (jax.nn.silu(jnp.einsum("becd,edf->becf", buffer_BxExCxD, w1))
                          * jnp.einsum("becd,edf->becf", buffer_BxExCxD, w2))
        out_BxExCxD = jnp.einsum("becf,efd->becd", hidden_BxExCxF, w3)
        y_BxAxD = out_BxExCxD[batch_Bx1, expert_BxA, jnp.minimum(slot_BxA, cap - 1)]
        y_BxAxD = jnp.where(kept_BxA[..., None], y_BxAxD, 0)
        y_BxLxKxD = jnp.swapaxes(y_BxAxD.reshape(batch, k, length, -1), 1, 2)
        dropped = 1.0 - jnp.mean(kept_BxA.astype(jnp.float32))
        return y_BxLxKxD.reshape(batch * length, k, -1), dropped

    def _dense(self, x_TxD, expert_TxK, weights):
        w1, w2, w3 = weights
        x_TxD = x_TxD.astype(w1.dtype)
        hidden_TxExF = (jax.nn.silu(jnp.einsum("td,edf->tef", x_TxD, w1))
                        * jnp.einsum("td,edf->tef", x_TxD, w2))
        y_TxExD = jnp.einsum("tef,efd->ted", hidden_TxExF, w3)
        return jnp.take_along_axis(y_TxExD, expert_TxK[..., None], axis=1)
