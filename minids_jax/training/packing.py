"""The train state as the step keeps it: each scanned run's layers stacked, one array per weight.

A scanned run (model/scan.py) reads its layers' weights stacked on a leading axis. Kept one
array per layer between steps, the step would take the gradient of each layer's weights
apart again, and update each with its own copy of the optimizer's arithmetic: XLA compiles
that once per layer and weight (at 61 layers of configs/v3_tiny.py, ~55 of the 76 s the step
took to compile; docs/scale.md). Kept stacked, the step splits them for the model, which the
scan stacks again (XLA folds the pair away), and updates each stacked weight once, whatever
the depth. Checkpoints, `Trainer.state` and everything outside the step see one array per
layer (`Packing.train_state`, a copy: a save holds one of what it saves until orbax has it).

Stacking changes nothing for an optimizer that treats each number on its own or each matrix
on its own (AdamW, Lion, Muon: its matrices are the last two axes), so they keep runs stacked;
Adafactor factors and clips a whole array at a time, so with it every layer stays its own.
An array-less placeholder (optax.masked's, in Muon's state) is the same for every layer: kept
once.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from minids_jax.model import scan as layer_scan

STACKED_OPTIMIZERS = ("adamw", "lion", "muon")


class StepState(NamedTuple):
    """What the jitted train step transforms: the model's arrays (a pure nnx.State, each
    scanned run's layers stacked under the number of its first), optax's state of the part
    that trains, and the updates applied so far."""

    model: Any
    opt_state: Any
    step: jax.Array


def _is_state(x) -> bool:
    return isinstance(x, nnx.State)


def _split(stacked: jax.Array, parts: int) -> list[jax.Array]:
    # split and reshape, not indexing: the scan's stacking of the parts then folds away.
    return [part.reshape(stacked.shape[1:]) for part in jnp.split(stacked, parts)]


def _stack(layers: list[jax.Array]) -> jax.Array:
    # Host arrays, or outside a jit on a CPU, the host's own copy: jnp.stack compiles a
    # program for each group's shapes (a second at 61 layers).
    on_the_host = all(isinstance(x, np.ndarray) for x in layers) or (
        not any(isinstance(x, jax.core.Tracer) for x in layers)
        and all(getattr(x, "is_fully_addressable", False)
                and all(device.platform == "cpu" for device in x.devices()) for x in layers))
    if on_the_host:
        return np.stack([np.asarray(x) for x in layers])
    return jnp.stack(layers)


@jax.jit
def _layer(stacked: jax.Array, r: jax.Array) -> jax.Array:
    return jax.lax.dynamic_index_in_dim(stacked, r, keepdims=False)


def _split_eagerly(stacked: jax.Array, parts: int) -> list[jax.Array]:
    # Outside a jit, op by op: one program per shape, whichever layer it takes (jnp.split
    # would compile one per shape, each with an output per layer: seconds at 61 layers).
    return [_layer(stacked, np.int32(r)) for r in range(parts)]


def _stacked_sharding(shardings: list[NamedSharding]) -> NamedSharding:
    return NamedSharding(shardings[0].mesh, PartitionSpec(None, *shardings[0].spec))


class Packing:
    """Which layers the step keeps stacked, and the conversions between its state and the
    checkpoint's TrainState (one array per layer)."""

    def __init__(self, runs: list[tuple[int, int, int]], graphdefs, abstract_optimizer):
        self.graphdefs = graphdefs  # steps.TrainState of the model's and optimizer's
        self.abstract_optimizer = abstract_optimizer  # the optimizer's state, shapes only
        # The first layer of each stacked group -> the group's layers, in the scan's order.
        self.groups: dict[int, list[int]] = {}
        for first, repeats, length in runs:
            for j in range(length if repeats > 1 else 0):
                self.groups[first + j] = [first + r * length + j for r in range(repeats)]
        self.place = {layer: (first, r) for first, layers in self.groups.items()
                      for r, layer in enumerate(layers)}

    @classmethod
    def of(cls, graphdefs, state, optimizer_name: str, model=None) -> Packing:
        """The packing of a trainer's TrainState: its model's scanned runs (as the forward
        scans them), none with an optimizer that stacking would change. `model`: the state's
        model if already merged (a merge walks every layer)."""
        model = nnx.merge(graphdefs.model, state.model) if model is None else model
        min_repeats = model.compute.scan_min_repeats if model.compute.scan_layers else None
        runs = ([] if optimizer_name not in STACKED_OPTIMIZERS else
                layer_scan.runs(model.blocks, len(model.cfg.attn_pattern), min_repeats))
        return cls(runs, graphdefs, jax.tree.map(  # (optax.masked's MaskedNode: no array)
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype) if hasattr(x, "dtype") else x,
            state.optimizer))

    def _group_of(self, path: tuple) -> tuple[tuple, int] | None:
        """(the stacked path, this layer's place in it) of a path under a stacked layer."""
        k = _layer_key(path, self.place)
        if k is None:
            return None
        first, r = self.place[path[k]]
        return path[:k] + (first,) + path[k + 1:], r

    def pack(self, state, stack: Callable = _stack):
        """`state` (an nnx.State, or a tree holding some: optax's) with each group's layers
        stacked by `stack(list of leaves)`."""
        if not isinstance(state, nnx.State):
            return jax.tree.map(lambda x: self.pack(x, stack) if _is_state(x) else x, state,
                                is_leaf=_is_state)
        if not self.groups:
            return state
        kept, groups = [], {}
        for path, leaf in nnx.to_flat_state(state):
            found = self._group_of(path)
            if found is None:
                kept.append((path, leaf))
            else:
                groups.setdefault(found[0], {})[found[1]] = leaf
        stacked = [(path, members[0] if isinstance(members[0], optax.MaskedNode)
                     else stack([members[r] for r in range(len(members))]))
                   for path, members in groups.items()]
        return nnx.from_flat_state(kept + stacked)

    def unpack(self, state, split: Callable = _split):
        """The inverse of `pack`: each stacked array split into its layers'."""
        if not isinstance(state, nnx.State):
            return jax.tree.map(lambda x: self.unpack(x, split) if _is_state(x) else x, state,
                                is_leaf=_is_state)
        if not self.groups:
            return state
        flat = []
        for path, leaf in nnx.to_flat_state(state):
            k = _layer_key(path, self.groups)
            if k is None:
                flat.append((path, leaf))
                continue
            layers = self.groups[path[k]]
            parts = ([leaf] * len(layers) if isinstance(leaf, optax.MaskedNode)
                     else split(leaf, len(layers)))
            flat += [(path[:k] + (layer,) + path[k + 1:], part)
                     for layer, part in zip(layers, parts)]
        return nnx.from_flat_state(flat)

    def step_state(self, state, stack: Callable = _stack) -> StepState:
        """The step's state of a TrainState (or of its shardings, with `stack` theirs)."""
        optimizer = nnx.merge(self.graphdefs.optimizer, state.optimizer)
        return StepState(self.pack(nnx.as_pure(state.model), stack),
                         self.pack(nnx.as_pure(optimizer.opt_state), stack),
                         nnx.as_pure(nnx.state(optimizer))["step"])

    def step_shardings(self, shardings) -> StepState:
        return self.step_state(shardings, _stacked_sharding)

    def train_state(self, step_state: StepState) -> tuple:
        """(model, optimizer): a steps.TrainState's nnx.States, one array per layer as
        checkpoints hold them, of the step's state."""
        model = nnx.merge(self.graphdefs.model, self.unpack(step_state.model, _split_eagerly))
        optimizer = nnx.merge(self.graphdefs.optimizer, self.abstract_optimizer)
        nnx.update(optimizer.opt_state,
                   nnx.state(self.unpack(step_state.opt_state, _split_eagerly)))
        optimizer.step.set_value(step_state.step)
        return nnx.state(model), nnx.state(optimizer)


def _layer_key(path: tuple, layers) -> int | None:
    """Where in `path` (a key path of the model's, or of optax's trees of its parameters) a
    layer number of `layers` is: the key after "blocks"."""
    return next((k + 1 for k in range(len(path) - 1)
                 if path[k] == "blocks" and path[k + 1] in layers), None)


def part_like(state, like):
    """The arrays of the nnx.State `state` at the paths of `like` (its gradients, say)."""
    values = dict(nnx.to_flat_state(state))
    return nnx.from_flat_state([(path, values[path]) for path, _ in nnx.to_flat_state(like)])


def with_part(state, part):
    """`state` with the arrays of `part` (some of its paths) replaced."""
    return nnx.from_flat_state(list({**dict(nnx.to_flat_state(state)),
                                     **dict(nnx.to_flat_state(part))}.items()))
