"""Mixture of SwiGLU experts with a learned top-k router and Switch load balancing.

Shapes: B batch, L length, D model width, F expert hidden width, E experts, T tokens (B*L),
k experts per token, A assignments (T*k), C expert capacity per sequence.

Interchangeable dispatches (`model.moe_dispatch`), identical in output when nothing is
dropped:
  dropless  exact, nothing dropped: `ragged` on GPU and TPU, `blocked` on CPU (the platform
            of the mesh's devices, else JAX's default backend).
  ragged    sort assignments by expert, one `jax.lax.ragged_dot` per weight. GPU and TPU run
            each group against its own expert only; XLA's CPU lowering runs every expert on
            every row (masked), so there it costs n_experts/top_k times the useful work.
  blocked   sort assignments by expert, pad each expert's group to a multiple of 64 rows
            and tile it with windows of rows that each belong to one expert: as many of the
            largest size (up to 512 rows) as fit, then one each of the halves the rest
            needs. One loop per window size runs the whole SwiGLU of a window against its
            expert's weights, with a hand-written backward in the same loops. Cost is the
            useful work plus under 64 rows of padding per expert. Under expert parallelism
            the loops index experts by data, so the compiler gathers the expert weights
            (correct, but no memory saving there: use `ragged` on GPU and TPU).
  capacity  scatter each sequence's assignments into an [E, C, D] buffer (C from
            capacity_factor), einsum, gather back; assignments past capacity are dropped and
            their fraction is reported.
  dense     every expert on every token, weighted by the (mostly zero) routing weights;
            costs E/k times more, kept as a simple reference.

Measured on a 2-core CPU (benchmarks/moe_dispatch.py: forward+backward of one layer, 2048
tokens, d 256, hidden 1024, top-1, relative to one plain SwiGLU of the same size):
  experts      1      2      8
  ragged     0.96x  1.92x  7.20x
  blocked    1.09x  1.17x  1.72x   (windows of 512..64, 512..64, 256..64 rows; with fixed
                                    256-row blocks instead: 1.00x, 1.40x, 2.07x)
  capacity   1.76x  1.84x  1.67x
  dense      1.48x  2.88x  12.3x

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
from minids_jax.layers import linear, mesh_platform


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


def resolve_dispatch(dispatch: str, mesh: jax.sharding.AbstractMesh) -> str:
    """`dropless` as the kernel for the platform the layer runs on; other names unchanged."""
    if dispatch != "dropless":
        return dispatch
    return "blocked" if mesh_platform(mesh) == "cpu" else "ragged"


# Windows of the `blocked` dispatch, in rows. Each expert's group of assignments is padded to
# a multiple of the smallest window and tiled with windows, largest first: as many of the
# largest as fit, then at most one of each smaller size (the binary digits of the rest). The
# largest is the power of two at or below an expert's even share of the assignments, within
# these bounds. The padding stays under one smallest window per expert (fixed 256-row blocks
# padded 12% at 2 experts, 25-37% at 4); windows past 512 rows gained nothing, as their
# [rows, F] intermediates leave the cache. Chosen with `benchmarks/moe_dispatch.py
# --window_rows` on a 2-core CPU; see the table above.
LARGEST_WINDOW_ROWS, SMALLEST_WINDOW_ROWS, MIN_WINDOW_ROWS = 512, 64, 8


def window_rows(assignments: int, n_experts: int) -> tuple[int, ...]:
    """The window sizes, largest first, each half the one before."""
    share = max(1, assignments // n_experts)
    largest = min(LARGEST_WINDOW_ROWS, max(MIN_WINDOW_ROWS, 1 << (share.bit_length() - 1)))
    return halving_sizes(largest, min(largest, SMALLEST_WINDOW_ROWS))


def halving_sizes(largest: int, smallest: int) -> tuple[int, ...]:
    """largest, largest/2, ... down to smallest (powers of two)."""
    return tuple(largest >> i for i in range((largest // smallest).bit_length()))


class WindowLayout(NamedTuple):
    """Assignments sorted by expert, each expert's group padded to whole smallest windows.

    R rows, a static upper bound: the groups take at most A + E' * (unit - 1) rows, E' =
    min(E, A), rounded up to a whole unit (the smallest window). For each window size, the
    windows in use come first, in expert order; the rest are skipped.
    """
    assignment_R: jax.Array  # int32, the assignment in each row; A in padding rows
    row_A: jax.Array  # int32, the row of each assignment
    first_rows: tuple[jax.Array, ...]  # per window size: int32 [max windows], first row of each
    experts: tuple[jax.Array, ...]  # per window size: int32 [max windows], expert of each
    windows_used: tuple[jax.Array, ...]  # per window size: int32 scalar


def window_layout(expert_A: jax.Array, n_experts: int, sizes: tuple[int, ...]) -> WindowLayout:
    unit, assignments = sizes[-1], expert_A.shape[0]
    if any(size != unit << (len(sizes) - 1 - i) for i, size in enumerate(sizes)):
        raise ValueError(f"window sizes {sizes} must halve from one to the next")
    n_rows = -(-(assignments + min(n_experts, assignments) * (unit - 1)) // unit) * unit
    order_A = jnp.argsort(expert_A, stable=True)  # sorted position -> assignment
    expert_sorted_A = expert_A[order_A]
    size_E = jnp.bincount(expert_A, length=n_experts).astype(jnp.int32)
    padded_E = -(-size_E // unit) * unit
    group_start_E = jnp.cumsum(padded_E) - padded_E
    rank_A = (jnp.arange(assignments, dtype=jnp.int32)
              - (jnp.cumsum(size_E) - size_E)[expert_sorted_A])
    row_sorted_A = group_start_E[expert_sorted_A] + rank_A
    row_A = jnp.zeros(assignments, jnp.int32).at[order_A].set(row_sorted_A)
    assignment_R = jnp.full(n_rows, assignments, jnp.int32).at[row_sorted_A].set(
        order_A.astype(jnp.int32))

    # The largest windows: expert e takes padded_E[e] // largest of them, from its group start.
    largest = sizes[0]
    count_E = padded_E // largest
    end_E = jnp.cumsum(count_E)
    window_W = jnp.arange(n_rows // largest, dtype=jnp.int32)
    expert_W = jnp.minimum(jnp.searchsorted(end_E, window_W, side="right"), n_experts - 1)
    expert_W = expert_W.astype(jnp.int32)
    first_rows = [group_start_E[expert_W] + (window_W - end_E[expert_W] + count_E[expert_W])
                  * largest]
    experts, windows_used = [expert_W], [end_E[-1]]
    # Then one window of each smaller size that the rest of the group has as a binary digit.
    next_row_E = group_start_E + count_E * largest
    rest_units_E = (padded_E - count_E * largest) // unit
    for size in sizes[1:]:
        has_E = (rest_units_E & (size // unit)) != 0
        with_first_E = jnp.argsort(~has_E, stable=True).astype(jnp.int32)
        first_rows.append(next_row_E[with_first_E])
        experts.append(with_first_E)
        windows_used.append(jnp.sum(has_E, dtype=jnp.int32))
        next_row_E = next_row_E + jnp.where(has_E, size, 0)
    return WindowLayout(assignment_R, row_A, tuple(first_rows), tuple(experts),
                        tuple(windows_used))


def _swiglu_act(h1, h2):
    return jax.nn.silu(h1) * h2


def _window_loops(sizes, first_rows, experts, windows_used, body, carry):
    """body(size, first_row, expert, carry) over every window in use, one loop per size."""
    for size, first_row_W, expert_W, used in zip(sizes, first_rows, experts, windows_used):
        carry = jax.lax.fori_loop(
            0, used, lambda w, c, size=size, first_row_W=first_row_W, expert_W=expert_W:
            body(size, first_row_W[w], expert_W[w], c), carry)
    return carry


def _windowed_swiglu_forward(x_RxD, w1_ExDxF, w2_ExDxF, w3_ExFxD, layout, sizes,
                             keep_hidden: bool):
    rows = x_RxD.shape[0]

    def window(size, row, e, carry):
        y, h1, h2 = carry
        x_SxD = jax.lax.dynamic_slice_in_dim(x_RxD, row, size)
        h1_SxF, h2_SxF = x_SxD @ w1_ExDxF[e], x_SxD @ w2_ExDxF[e]
        y = jax.lax.dynamic_update_slice_in_dim(y, _swiglu_act(h1_SxF, h2_SxF) @ w3_ExFxD[e],
                                                row, 0)
        if keep_hidden:
            h1 = jax.lax.dynamic_update_slice_in_dim(h1, h1_SxF, row, 0)
            h2 = jax.lax.dynamic_update_slice_in_dim(h2, h2_SxF, row, 0)
        return y, h1, h2

    empty = jnp.zeros((rows, w1_ExDxF.shape[-1]) if keep_hidden else (0,), x_RxD.dtype)
    y = jnp.zeros((rows, w3_ExFxD.shape[-1]), x_RxD.dtype)
    return _window_loops(sizes, *layout, window, (y, empty, empty))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def windowed_swiglu(x_RxD, w1_ExDxF, w2_ExDxF, w3_ExFxD, layout, sizes):
    """The rows of each window through its expert's SwiGLU; rows in no window stay zero.

    `layout` is (first_rows, experts, windows_used) of a WindowLayout; one loop per window
    size, forward and backward.
    """
    return _windowed_swiglu_forward(x_RxD, w1_ExDxF, w2_ExDxF, w3_ExFxD, layout, sizes,
                                    keep_hidden=False)[0]


def _windowed_swiglu_fwd(x_RxD, w1_ExDxF, w2_ExDxF, w3_ExFxD, layout, sizes):
    y, h1, h2 = _windowed_swiglu_forward(x_RxD, w1_ExDxF, w2_ExDxF, w3_ExFxD, layout, sizes,
                                         keep_hidden=True)
    return y, (x_RxD, w1_ExDxF, w2_ExDxF, w3_ExFxD, layout, h1, h2)


def _windowed_swiglu_bwd(sizes, residuals, dy_RxD):
    x_RxD, w1_ExDxF, w2_ExDxF, w3_ExFxD, layout, h1, h2 = residuals
    f32 = jnp.float32

    def window(size, row, e, carry):
        dx, dw1, dw2, dw3 = carry
        rows_of = lambda a: jax.lax.dynamic_slice_in_dim(a, row, size)  # noqa: E731
        x_SxD, dy_SxD = rows_of(x_RxD), rows_of(dy_RxD)
        act_SxF, act_vjp = jax.vjp(_swiglu_act, rows_of(h1), rows_of(h2))
        dh1_SxF, dh2_SxF = act_vjp(dy_SxD @ w3_ExFxD[e].T)
        dx = jax.lax.dynamic_update_slice_in_dim(
            dx, dh1_SxF @ w1_ExDxF[e].T + dh2_SxF @ w2_ExDxF[e].T, row, 0)
        # Weight gradients summed over windows in float32, whatever the compute dtype.
        dw1 = dw1.at[e].add(jnp.matmul(x_SxD.T, dh1_SxF, preferred_element_type=f32))
        dw2 = dw2.at[e].add(jnp.matmul(x_SxD.T, dh2_SxF, preferred_element_type=f32))
        dw3 = dw3.at[e].add(jnp.matmul(act_SxF.T, dy_SxD, preferred_element_type=f32))
        return dx, dw1, dw2, dw3

    zeros = [jnp.zeros(w.shape, f32) for w in (w1_ExDxF, w2_ExDxF, w3_ExFxD)]
    dx, *dws = _window_loops(sizes, *layout, window, (jnp.zeros_like(x_RxD), *zeros))
    dw1, dw2, dw3 = (dw.astype(w.dtype) for dw, w in zip(dws, (w1_ExDxF, w2_ExDxF, w3_ExFxD)))
    return dx, dw1, dw2, dw3, jax.tree.map(lambda _: None, layout)


windowed_swiglu.defvjp(_windowed_swiglu_fwd, _windowed_swiglu_bwd)


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
        dispatch = resolve_dispatch(self.cfg.moe_dispatch, mesh)
        if not axes:
            return self._forward(x_BxLxD, gate_DxE, self.weights(), dispatch)
        # Each device routes and dispatches its own tokens; weights enter whole over `axes`
        # (under FSDP that is the usual all-gather, and the gradient's reduce-scatter).
        tokens, replicated = P(axes), P()
        return jax.shard_map(
            functools.partial(self._forward, dispatch=dispatch, axis_names=axes), mesh=mesh,
            in_specs=(tokens, replicated, replicated),
            out_specs=(tokens, MoEStats(replicated, replicated, replicated)),
            axis_names=set(axes), check_vma=False)(x_BxLxD, gate_DxE, self.weights())

    def _forward(self, x_BxLxD, gate_DxE, weights, dispatch: str,
                 axis_names: tuple[str, ...] = ()):
        batch, length, d = x_BxLxD.shape
        x_TxD = x_BxLxD.reshape(batch * length, d)
        probs_TxE, weight_TxK, expert_TxK = self.route(x_TxD, gate_DxE)
        aux_loss, load_E = switch_balancing_loss(probs_TxE, expert_TxK, self.cfg.n_experts,
                                                 axis_names)
        dropped = jnp.zeros((), jnp.float32)
        if dispatch == "ragged":
            y_TxKxD = self._ragged(x_TxD, expert_TxK, weights)
        elif dispatch == "blocked":
            y_TxKxD = self._blocked(x_TxD, expert_TxK, weights)
        elif dispatch == "capacity":
            y_TxKxD, dropped = self._capacity(x_BxLxD, expert_TxK.reshape(batch, length, -1),
                                              weights)
            if axis_names:
                dropped = jax.lax.pmean(dropped, axis_names)
        else:
            y_TxKxD = self._dense(x_TxD, expert_TxK, weights)
        y_TxD = jnp.einsum("tkd,tk->td", y_TxKxD, weight_TxK.astype(y_TxKxD.dtype))
        return y_TxD.reshape(batch, length, d), MoEStats(aux_loss, load_E, dropped)

    def _ragged(self, x_TxD, expert_TxK, weights):
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

    def _blocked(self, x_TxD, expert_TxK, weights, sizes: tuple[int, ...] | None = None):
        w1, w2, w3 = weights
        tokens, k = expert_TxK.shape
        expert_A = expert_TxK.reshape(-1)
        sizes = sizes or window_rows(expert_A.shape[0], self.cfg.n_experts)
        layout = window_layout(expert_A, self.cfg.n_experts, sizes)
        # Padding rows name assignment A, i.e. token T: out of range, read as zeros.
        x_RxD = x_TxD.astype(w1.dtype).at[layout.assignment_R // k].get(mode="fill",
                                                                       fill_value=0)
        y_RxD = windowed_swiglu(
            x_RxD, w1, w2, w3, (layout.first_rows, layout.experts, layout.windows_used), sizes)
        return y_RxD[layout.row_A].reshape(tokens, k, -1)

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
