"""The device mesh, logical-axis rules, sharded state creation and batch placement."""

from __future__ import annotations

import math
from typing import Callable

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from minids_jax.config import ConfigError, MeshConfig

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


def make_mesh(cfg: MeshConfig, devices=None) -> jax.sharding.Mesh:
    devices = jax.devices() if devices is None else devices
    sizes = resolve_axis_sizes(cfg, len(devices))
    # Auto axes: plain NNX layers do not carry explicit-sharding types.
    return jax.make_mesh(tuple(sizes[a] for a in MESH_AXES), MESH_AXES, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def batch_spec(rules) -> PartitionSpec:
    return PartitionSpec(dict(rules).get("batch"))


def create_sharded(init_fn: Callable[[], nnx.Module], mesh, rules):
    """Builds `init_fn()`'s state directly in its sharded layout (never whole on one device).

    Returns (graphdef, state, state_shardings).
    """
    with jax.set_mesh(mesh), nnx.logical_axis_rules(rules), nnx.use_eager_sharding(False):
        graphdef, abstract_state = nnx.split(nnx.eval_shape(init_fn))
        shardings = nnx.get_named_sharding(abstract_state, mesh)
        state = jax.jit(lambda: nnx.split(init_fn())[1], out_shardings=shardings)()
    return graphdef, state, shardings


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
