"""The blocked MoE kernel: each expert's rows in windows, the SwiGLU with a hand-written backward.

Assignments are sorted by expert and each expert's group is padded to a multiple of the
smallest window, then tiled with windows, largest first: as many of the largest as fit, then
at most one of each smaller size (the binary digits of the rest), so the padding stays under
one smallest window per expert. One loop per window size runs the whole SwiGLU of a window
against its expert's weights, forward and backward; weight gradients are summed in float32.

Shapes: D model width, F expert hidden width, E experts, A assignments, R padded rows.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

# Window sizes in rows. The largest is the power of two at or below an expert's even share of
# the assignments, within these bounds; chosen by measurement (benchmarks/moe_dispatch.py
# --window_rows; docs/performance.md).
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


# Moving rows between tokens and windows: each way is a gather, and so is its transpose. Every
# assignment has one row and every row at most one assignment, so autodiff's scatter-adds
# (slow on XLA's CPU backend) are gathers through the other index map.


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def rows_of_tokens(x_TxD, assignment_R, row_A, top_k: int):
    """[R, D]: each row's token (assignment // top_k); zeros in padding rows (assignment A)."""
    return x_TxD.at[assignment_R // top_k].get(mode="fill", fill_value=0)


def _rows_of_tokens_fwd(x_TxD, assignment_R, row_A, top_k):
    return rows_of_tokens(x_TxD, assignment_R, row_A, top_k), row_A


def _rows_of_tokens_bwd(top_k, row_A, dx_RxD):
    # A token's gradient: the sum over its top_k assignments' rows, in assignment order.
    dx_TxKxD = dx_RxD[row_A].reshape(-1, top_k, dx_RxD.shape[-1])
    return jnp.sum(dx_TxKxD, axis=1), None, None


rows_of_tokens.defvjp(_rows_of_tokens_fwd, _rows_of_tokens_bwd)


@jax.custom_vjp
def assignments_of_rows(y_RxD, assignment_R, row_A):
    """[A, D]: each assignment's row."""
    return y_RxD[row_A]


def _assignments_of_rows_fwd(y_RxD, assignment_R, row_A):
    return y_RxD[row_A], assignment_R


def _assignments_of_rows_bwd(assignment_R, dy_AxD):
    # Padding rows (assignment A, out of range) get zeros.
    return dy_AxD.at[assignment_R].get(mode="fill", fill_value=0), None, None


assignments_of_rows.defvjp(_assignments_of_rows_fwd, _assignments_of_rows_bwd)


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
