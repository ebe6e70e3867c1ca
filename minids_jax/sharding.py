"""The device mesh, logical-axis rules, sharded state creation and batch placement."""

from __future__ import annotations

import functools
import math
import os
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from minids_jax.config import Config, ConfigError, MeshConfig
from minids_jax.config.run import as_axes

MESH_AXES = ("data", "fsdp", "tensor", "expert")


def resolve_axis_sizes(cfg: MeshConfig, n_devices: int) -> dict[str, int]:
    """Fills the -1 axis and checks the product against the device count."""
    sizes = cfg.axis_sizes()
    fixed = math.prod(size for size in sizes.values() if size != -1)
    if -1 in sizes.values():
        if n_devices % fixed:
            raise ConfigError(
                f"mesh {sizes}: the fixed axes multiply to {fixed}, which does not divide the "
                f"{n_devices} devices; choose sizes whose product divides {n_devices}.")
        sizes = {name: (n_devices // fixed if size == -1 else size) for name, size in sizes.items()}
    if math.prod(sizes.values()) != n_devices:
        raise ConfigError(
            f"mesh {sizes} has {math.prod(sizes.values())} devices but {n_devices} are "
            f"available; make the product of mesh.data/fsdp/tensor/expert equal {n_devices} "
            f"(or set one of them to -1).")
    return sizes


def mesh_platform(mesh: jax.sharding.Mesh | None = None) -> str:
    """The platform of the mesh's devices (cpu, gpu, tpu), else JAX's default backend."""
    return mesh.devices.flat[0].platform if mesh is not None else jax.default_backend()


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = resolve_axis_sizes(cfg, len(devices))
    # Auto axes: plain NNX layers do not carry explicit-sharding types.
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_spec(rules) -> PartitionSpec:
    return PartitionSpec(dict(rules).get("batch"))


def mesh_axes_of(rules, logical: str) -> tuple[str, ...]:
    """The mesh axes a logical axis name maps to (empty when it is replicated)."""
    return as_axes(dict(rules).get(logical))


def ways(mesh: jax.sharding.Mesh, axes: tuple[str, ...]) -> int:
    return math.prod(mesh.shape[a] for a in axes)


def _describe(mesh, axes) -> str:
    return " x ".join(f"mesh.{a}={mesh.shape[a]}" for a in axes) or "no mesh axis"


def check_layout(config: Config, mesh: jax.sharding.Mesh) -> None:
    """Fails early, with the fix, on a batch, head or expert count the mesh cannot split."""
    rules = config.mesh.axis_rules
    unknown = sorted({a for name, _ in rules for a in mesh_axes_of(rules, name)} - set(MESH_AXES))
    if unknown:
        raise ConfigError(f"mesh.axis_rules name unknown mesh axes {unknown}; use {MESH_AXES}.")
    checks = (
        ("batch", config.train.batch_size, "train.batch_size", "sequences"),
        ("heads", config.model.n_heads, "model.n_heads", "attention heads"),
        ("expert", config.model.n_experts, "model.n_experts", "experts"),
    )
    accum = max(config.train.grad_accum_steps, 1)  # 0: chosen later, 1 at least
    for logical, count, field, what in checks:
        axes = mesh_axes_of(rules, logical)
        n = ways(mesh, axes)
        if logical == "batch" and accum > 1 and count % (n * accum):
            raise ConfigError(
                f"train.batch_size={count} does not split into train.grad_accum_steps={accum} "
                f"microbatches over {_describe(mesh, axes)}: make it a multiple of "
                f"{n * accum} ({accum} x {n}), or change train.grad_accum_steps.")
        if count % n:
            raise ConfigError(
                f"{field}={count} is not divisible by {n}: the {what} are split over "
                f"{_describe(mesh, axes)} (logical axis {logical!r}); make {field} a multiple "
                f"of {n} or change those mesh sizes.")


def check_divisible(abstract_state, shardings) -> None:
    """Every parameter dimension must split evenly over the mesh axes its rule gives it."""
    problems = []
    flat_shapes = jax.tree_util.tree_leaves_with_path(abstract_state)
    flat_shardings = jax.tree.leaves(shardings)
    for (path, leaf), leaf_sharding in zip(flat_shapes, flat_shardings):
        mesh = leaf_sharding.mesh
        for dim, (size, axes) in enumerate(zip(leaf.shape, leaf_sharding.spec)):
            axes = as_axes(axes)
            if size % ways(mesh, axes):
                name = jax.tree_util.keystr(path).replace(".value", "")
                problems.append(f"{name} dimension {dim} (size {size}) over "
                                f"{_describe(mesh, axes)}")
    if problems:
        raise ConfigError(
            "these arrays cannot be split evenly over the mesh: " + "; ".join(problems[:5])
            + ". Change the model sizes to multiples of those mesh sizes, the mesh sizes, or "
              "map the logical axis to None in mesh.axis_rules.")


def under_mesh(mesh: jax.sharding.Mesh, rules):
    """Decorator: traces the function with `mesh` and the logical rules in context, so layers
    can place work by mesh axis (the MoE keeps each device's tokens local)."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nnx.logical_axis_rules(rules):
                return fn(*args, **kwargs)

        return wrapped

    return decorate


def create_sharded(init_fn: Callable[[], tuple[nnx.Module, ...]], mesh, rules,
                   restored: Callable[[int, str], bool] | None = None,
                   size_bytes: float | None = None, place: bool = True):
    """Builds the modules `init_fn()` returns directly in their sharded layout (never whole on
    one device). Returns (graphdefs, states, shardings), one tuple entry per module.

    `restored(i, name)` marks arrays of the i-th module (by their key path's name, e.g.
    "['blocks'][0]['attn']['q']['kernel']") that a restore will overwrite: they start as
    zeros, and no random numbers are drawn for them. Initializing all of a model's arrays in
    one program holds their random bits at once (measured on a CPU: 1.5 times the arrays' own
    size besides them), which a fine-tune from a checkpoint has no use for.

    `size_bytes`, the arrays' bytes if known beforehand (an estimate: footprint.py's), lets a
    model small enough to be made on the host skip tracing its construction for the shapes
    (1.8 s at 61 layers of configs/v3_tiny.py). With `place=False`, such a model comes back
    as host (numpy) arrays in a single-process job, for a caller that places them itself
    after changing their layout (the trainer stacks its scanned runs): one copy fewer."""
    def split_each(modules):
        return tuple(zip(*(nnx.split(module) for module in modules)))

    def init():
        states = split_each(init_fn())[1]
        if restored is None:
            return states
        return tuple(jax.tree_util.tree_map_with_path(
            lambda path, x, i=i: jnp.zeros_like(x) if restored(i, jax.tree_util.keystr(path))
            else x, state) for i, state in enumerate(states))

    def shardings_of(states):
        shardings = tuple(nnx.get_named_sharding(state, mesh) for state in states)
        for state, state_shardings in zip(states, shardings):
            check_divisible(state, state_shardings)
        return shardings

    def on_the_host():
        # Op by op on the host, each array then placed: every initializer's program is
        # compiled once per shape and dtype and reused by each layer that has it, where one
        # program drawing every array compiles longer the more arrays it draws (16 layers
        # of configs/tiny.py: 15.7 s against 2.1 s for 2 layers; docs/scale.md).
        with jax.default_device(jax.local_devices(backend="cpu")[0]):
            graphdefs, states = split_each(init_fn())
        return graphdefs, jax.device_get(states)

    def placed(host_states, shardings):
        return jax.tree.map(lambda value, where: jax.make_array_from_callback(
            value.shape, where, lambda index, value=value: value[index]), host_states, shardings)

    platform = mesh_platform(mesh)
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
        if restored is None and size_bytes is not None and _made_on_the_host(size_bytes,
                                                                               platform):
            graphdefs, host_states = on_the_host()
            shardings = shardings_of(host_states)
            if not place and jax.process_count() == 1:
                return graphdefs, host_states, shardings
            return graphdefs, placed(host_states, shardings), shardings
        graphdefs, abstract_states = split_each(nnx.eval_shape(init_fn))
        shardings = shardings_of(abstract_states)
        size = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(abstract_states))
        if restored is None and _made_on_the_host(size, platform):
            states = placed(on_the_host()[1], shardings)
        else:
            states = jax.jit(init, out_shardings=shardings)()
    return graphdefs, states, shardings


HOST_SHARE = 0.25  # of this machine's RAM, at most, for a model made on the host
ACCELERATOR_HOST_BYTES = 2e9  # above, drawing on the host would take longer than compiling


def _made_on_the_host(size: float, platform: str) -> bool:
    """Whether to make a fresh model's arrays (`size` bytes) on the host: at most HOST_SHARE
    of this machine's memory, and for GPUs and TPUs (which draw random numbers far faster
    than the host) at most ACCELERATOR_HOST_BYTES."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return size <= HOST_SHARE * ram and (platform == "cpu" or size <= ACCELERATOR_HOST_BYTES)


def process_rows(sharding: NamedSharding, global_batch: int) -> slice:
    """The contiguous rows of the global batch that this process's devices hold."""
    indices = sharding.addressable_devices_indices_map((global_batch, 1)).values()
    starts = [idx[0].start or 0 for idx in indices]
    stops = [global_batch if idx[0].stop is None else idx[0].stop for idx in indices]
    return slice(min(starts), max(stops))


def place_batch(local_batch: dict[str, np.ndarray], sharding: NamedSharding,
                global_batch: int) -> dict[str, jax.Array]:
    """Assembles the global batch from each process's rows (see `process_rows`)."""
    return {
        name: jax.make_array_from_process_local_data(sharding, rows, (global_batch, *rows.shape[1:]))
        for name, rows in local_batch.items()
    }
