"""How the tokens of a MoE layer reach their experts: interchangeable dispatches, one signature.

Each `DISPATCHES[name](x_BxLxD, expert_BxLxK, experts, capacity_factor)` returns every
assignment's expert output, [B, L, k, D] (not yet weighted), and the fraction of assignments
dropped. All are identical in output when nothing is dropped:
  ragged    sort assignments by expert, one `jax.lax.ragged_dot` per weight. GPU and TPU run
            each group against its own expert only; XLA's CPU lowering runs every expert on
            every row (masked), so there it costs n_experts/top_k times the useful work.
  blocked   sort by expert, pad each group to whole windows, one SwiGLU per window
            (kernels/moe_windows.py): the useful work plus under 64 rows per expert. Under
            expert parallelism the loops index experts by data, so the compiler gathers the
            expert weights (correct, no memory saving: use `ragged` there).
  capacity  per sequence, scatter into an [E, C, D] buffer (C from capacity_factor), einsum,
            gather back; assignments past capacity are dropped (first choices first).
  dense     every expert on every token; costs E/k times more, kept as the simple reference.
`dropless` in the config is the exact one fastest on the platform (kernels.resolve).

Shapes: B batch, L length, D model width, F expert hidden width, E experts, k experts per token,
T tokens (B*L), A assignments (T*k), R padded rows, C capacity per sequence.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from minids_jax.kernels.moe_windows import (
    assignments_of_rows,
    rows_of_tokens,
    window_layout,
    window_rows,
    windowed_swiglu,
)


class Experts(NamedTuple):
    """The SwiGLU weights of every expert, expert axis first, in the compute dtype."""
    w1_ExDxF: jax.Array
    w2_ExDxF: jax.Array
    w3_ExFxD: jax.Array

    @property
    def count(self) -> int:
        return self.w1_ExDxF.shape[0]


def _flat(x_BxLxD, expert_BxLxK):
    return x_BxLxD.reshape(-1, x_BxLxD.shape[-1]), expert_BxLxK.reshape(-1, expert_BxLxK.shape[-1])


def _nothing_dropped():
    return jnp.zeros((), jnp.float32)


def ragged(x_BxLxD, expert_BxLxK, experts: Experts, capacity_factor: float = 0.0):
    x_TxD, expert_TxK = _flat(x_BxLxD, expert_BxLxK)
    k = expert_TxK.shape[1]
    expert_A = expert_TxK.reshape(-1)
    order_A = jnp.argsort(expert_A, stable=True)
    group_sizes_E = jnp.bincount(expert_A, length=experts.count).astype(jnp.int32)
    x_AxD = x_TxD.astype(experts.w1_ExDxF.dtype)[order_A // k]
    hidden_AxF = (jax.nn.silu(jax.lax.ragged_dot(x_AxD, experts.w1_ExDxF, group_sizes_E))
                  * jax.lax.ragged_dot(x_AxD, experts.w2_ExDxF, group_sizes_E))
    y_sorted_AxD = jax.lax.ragged_dot(hidden_AxF, experts.w3_ExFxD, group_sizes_E)
    y_AxD = jnp.zeros_like(y_sorted_AxD).at[order_A].set(y_sorted_AxD)
    return y_AxD.reshape(*expert_BxLxK.shape, -1), _nothing_dropped()


def blocked(x_BxLxD, expert_BxLxK, experts: Experts, capacity_factor: float = 0.0,
            window_sizes: tuple[int, ...] | None = None):
    """`window_sizes` (largest first, halving) overrides the sizes chosen from the shapes."""
    x_TxD, expert_TxK = _flat(x_BxLxD, expert_BxLxK)
    k = expert_TxK.shape[1]
    expert_A = expert_TxK.reshape(-1)
    sizes = window_sizes or window_rows(expert_A.shape[0], experts.count)
    layout = window_layout(expert_A, experts.count, sizes)
    x_RxD = rows_of_tokens(x_TxD.astype(experts.w1_ExDxF.dtype), layout.assignment_R,
                           layout.row_A, k)
    y_RxD = windowed_swiglu(x_RxD, *experts, (layout.first_rows, layout.experts,
                                              layout.windows_used), sizes)
    y_AxD = assignments_of_rows(y_RxD, layout.assignment_R, layout.row_A)
    return y_AxD.reshape(*expert_BxLxK.shape, -1), _nothing_dropped()


def capacity_per_sequence(length: int, top_k: int, n_experts: int, capacity_factor: float):
    return max(1, math.ceil(capacity_factor * length * top_k / n_experts))


def capacity(x_BxLxD, expert_BxLxK, experts: Experts, capacity_factor: float):
    w1, w2, w3 = experts
    batch, length, k = expert_BxLxK.shape
    cap = capacity_per_sequence(length, k, experts.count, capacity_factor)
    expert_BxA = jnp.swapaxes(expert_BxLxK, 1, 2).reshape(batch, k * length)  # k-major
    onehot_BxAxE = jax.nn.one_hot(expert_BxA, experts.count, dtype=jnp.int32)
    slot_BxA = jnp.sum((jnp.cumsum(onehot_BxAxE, axis=1) - 1) * onehot_BxAxE, axis=-1)
    kept_BxA = slot_BxA < cap
    token_A = jnp.tile(jnp.arange(length), k)
    batch_Bx1 = jnp.arange(batch)[:, None]
    x_BxAxD = x_BxLxD.astype(w1.dtype)[:, token_A]
    buffer_BxExCxD = jnp.zeros((batch, experts.count, cap, x_BxLxD.shape[-1]), w1.dtype)
    buffer_BxExCxD = buffer_BxExCxD.at[batch_Bx1, expert_BxA, slot_BxA].set(x_BxAxD, mode="drop")
    hidden_BxExCxF = (jax.nn.silu(jnp.einsum("becd,edf->becf", buffer_BxExCxD, w1))
                      * jnp.einsum("becd,edf->becf", buffer_BxExCxD, w2))
    out_BxExCxD = jnp.einsum("becf,efd->becd", hidden_BxExCxF, w3)
    y_BxAxD = out_BxExCxD[batch_Bx1, expert_BxA, jnp.minimum(slot_BxA, cap - 1)]
    y_BxAxD = jnp.where(kept_BxA[..., None], y_BxAxD, 0)
    y_BxLxKxD = jnp.swapaxes(y_BxAxD.reshape(batch, k, length, -1), 1, 2)
    return y_BxLxKxD, 1.0 - jnp.mean(kept_BxA.astype(jnp.float32))


def dense(x_BxLxD, expert_BxLxK, experts: Experts, capacity_factor: float = 0.0):
    w1, w2, w3 = experts
    x_BxLxD = x_BxLxD.astype(w1.dtype)
    hidden_BxLxExF = (jax.nn.silu(jnp.einsum("bld,edf->blef", x_BxLxD, w1))
                      * jnp.einsum("bld,edf->blef", x_BxLxD, w2))
    y_BxLxExD = jnp.einsum("blef,efd->bled", hidden_BxLxExF, w3)
    return (jnp.take_along_axis(y_BxLxExD, expert_BxLxK[..., None], axis=2),
            _nothing_dropped())


Dispatch = Callable[..., tuple[jax.Array, jax.Array]]
DISPATCHES: dict[str, Dispatch] = {"ragged": ragged, "blocked": blocked, "capacity": capacity,
                                   "dense": dense}
