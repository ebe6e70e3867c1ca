"""The blocks of a whole-sequence forward: scanned where they repeat, rematerialized per block.

Layer i's kind follows `attn_pattern[i % P]` and whether it is one of the `first_k_dense`, so
the stack repeats a unit of P blocks. `compute.scan_layers` runs each run of at least
`compute.scan_min_repeats` identical units as one `lax.scan` over their weights, stacked as
the scan reads them: XLA compiles the unit once, whatever the depth. The parameters stay one
module per layer, so checkpoints, LoRA targets and the Hugging Face names do not depend on
the choice. The trainer keeps a scanned run's arrays stacked between steps
(training/packing.py), so XLA folds the stacking here into its split there; the scan's own
buffers (the stacked gradients, the activations it keeps) cost memory while the step runs, and
on a CPU a slower step (docs/scale.md measures both). `compute.remat` recomputes each block's
activations in the backward pass instead of keeping them (jax.checkpoint with the chosen
policy).

Shapes: B batch, L length, D model width.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from minids_jax.model.layers import adapter_dropout_of_layer

REMAT_POLICIES = {
    "full": None,  # keep only each block's input
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep x @ W
}


def runs(blocks: Sequence[nnx.Module], period: int,
         min_repeats: int | None) -> list[tuple[int, int, int]]:
    """(first layer, repeats, unit length) covering the blocks in order: runs of at least
    `min_repeats` identical units of `period` blocks, the rest one block at a time (all of
    them with None)."""
    scan = min_repeats is not None
    graphdefs = [nnx.graphdef(block) for block in blocks]
    found, i = [], 0
    while i < len(blocks):
        repeats = 1
        unit = graphdefs[i:i + period]
        while scan and len(unit) == period and \
                graphdefs[i + repeats * period:i + (repeats + 1) * period] == unit:
            repeats += 1
        if scan and repeats >= max(min_repeats, 2):
            found.append((i, repeats, period))
            i += repeats * period
        else:
            found.append((i, 1, 1))
            i += 1
    return found


def _split(block) -> tuple[Callable, list]:
    """(rebuild, leaves): the block's state as a list of arrays, and the function that makes
    the block again from such a list (a scan's slice of the stacked leaves)."""
    graphdef, state = nnx.split(block)
    leaves, treedef = jax.tree.flatten(state)
    return lambda new_leaves: nnx.merge(graphdef, jax.tree.unflatten(treedef, new_leaves)), leaves


def _block_fn(rebuild: Callable, remat: str, positions_BxL, moe_dispatch,
              segments_BxL, scored_BxL) -> Callable:
    """(x, the block's leaves, its layer number) -> (x, MoEStats or None), rematerialized
    if asked (the recomputation draws the same adapter-dropout masks: same keys)."""
    def apply(x_BxLxD, leaves, layer):
        with adapter_dropout_of_layer(layer):
            x_BxLxD, stats, _ = rebuild(leaves)(x_BxLxD, positions_BxL, None, moe_dispatch,
                                                segments_BxL, scored_BxL)
        return x_BxLxD, stats

    if remat not in REMAT_POLICIES:  # none, or auto left to a trainer to choose: no gradient
        return apply
    return lambda x_BxLxD, leaves, layer: rematerialized(
        lambda x, block_leaves: apply(x, block_leaves, layer), REMAT_POLICIES[remat],
        in_loop=not isinstance(layer, int))(x_BxLxD, leaves)


def rematerialized(fn: Callable, policy, in_loop: bool) -> Callable:
    """fn(x, leaves) as `jax.checkpoint(fn, policy=policy)`: what the policy does not keep
    is computed again in the backward pass.

    XLA's CPU compiler drops the optimization barriers that keep a recomputation apart from
    the forward computation it repeats, and merges the two again as common subexpressions:
    a block outside a loop (a scan's steps stay apart) then keeps every activation, as if not
    rematerialized. On a CPU, the backward pass therefore reads what the forward kept through
    a conditional on the incoming gradient that XLA cannot see through (always true), so the
    recomputation can neither merge with the forward nor run before the gradient arrives."""
    checkpointed = jax.checkpoint(fn, policy=policy)
    if in_loop or jax.default_backend() != "cpu":
        return checkpointed

    @jax.custom_vjp
    def run(x, leaves):
        return fn(x, leaves)

    def forward(x, leaves):
        return jax.vjp(checkpointed, x, leaves)

    def backward(vjp_fn, gradient):
        first = jax.tree.leaves(gradient)[0].reshape(-1)[0]
        return jax.lax.cond(jnp.isnan(first) | ~jnp.isnan(first), lambda kept: kept,
                            lambda kept: jax.tree.map(jnp.zeros_like, kept), vjp_fn)(gradient)

    run.defvjp(forward, backward)
    return run


def apply_blocks(blocks: Sequence[nnx.Module], x_BxLxD, positions_BxL, *, period: int,
                 scan_min_repeats: int | None, remat: str, moe_dispatch=None,
                 segments_BxL=None, scored_BxL=None):
    """x after every block, and the MoE layers' statistics (of the tokens `scored_BxL` marks)
    in layer order; runs of at least `scan_min_repeats` identical units scanned (none with
    None)."""
    all_stats = []
    for first, repeats, length in runs(blocks, period, scan_min_repeats):
        unit = [_split(block) for block in blocks[first:first + length]]
        fns = [_block_fn(rebuild, remat, positions_BxL, moe_dispatch, segments_BxL, scored_BxL)
               for rebuild, _ in unit]
        if repeats == 1:
            x_BxLxD, stats = fns[0](x_BxLxD, unit[0][1], first)
            all_stats += [stats] if stats is not None else []
            continue
        # Leaves of the unit's j-th block in every repeat, stacked on a leading axis.
        stacked = [[jnp.stack(leaves) for leaves in zip(*[
            _split(blocks[first + r * length + j])[1] for r in range(repeats)])]
            for j in range(length)]

        def unit_step(x_BxLxD, unit_leaves_and_repeat, first=first, length=length):
            unit_leaves, repeat = unit_leaves_and_repeat
            unit_stats = []
            for j, (fn, leaves) in enumerate(zip(fns, unit_leaves)):
                x_BxLxD, stats = fn(x_BxLxD, leaves, first + repeat * length + j)
                unit_stats.append(stats)
            return x_BxLxD, unit_stats

        x_BxLxD, stats_by_position = jax.lax.scan(unit_step, x_BxLxD,
                                                  (stacked, jnp.arange(repeats)))
        for r in range(repeats):
            for stats in stats_by_position:
                if stats is not None:
                    all_stats.append(jax.tree.map(lambda a, r=r: a[r], stats))
    return x_BxLxD, all_stats
