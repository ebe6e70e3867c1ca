"""Loading a saved model in notebooks and tools: onto this machine's devices (`load`), or as
numpy arrays without building a model (`load_params`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from minids_jax import sharding
from minids_jax.checkpoint.base import locate_base
from minids_jax.checkpoint.store import (
    read_config,
    read_meta,
    read_only_manager,
    resolve,
    restore_items,
    unreadable,
    verify,
)
from minids_jax.config import MeshConfig
from minids_jax.model import build, lora


def load_params(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The model's saved parameters as a nested dict of numpy arrays, without building a model.

    Keys follow the module tree, e.g. `params["blocks"]["0"]["moe"]["w1"]` ([E, D, F]).
    Works on any machine, whatever mesh the checkpoint was written under.
    """
    directory, step = resolve(path, step)
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(directory / str(step) / "model").tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        with read_only_manager(directory) as manager:
            restored = manager.restore(step, args=ocp.args.Composite(
                model=ocp.args.PyTreeRestore(restore_args=restore_args),
                meta=ocp.args.JsonRestore()))
    except Exception as error:  # orbax and tensorstore raise many kinds
        raise unreadable(directory / str(step), error) from error
    verify(directory / str(step), restored["meta"], model=restored["model"])
    base = restored["meta"].get("base")
    if base is None:
        return restored["model"]
    flat = flatten_dict(load_params(*locate_base(base, directory / str(step))))
    return unflatten_dict({**flat, **flatten_dict(restored["model"])})  # adapters on the base


def load(path: str | os.PathLike, step: int | None = None, *,
         mesh: jax.sharding.Mesh | None = None):
    """Restores a saved model onto this machine's devices: returns (model, config).

    `path` is a workdir, its `checkpoints/` directory or one step's directory; without `step`
    the latest checkpoint is loaded. Parameters are replicated over all default devices (one
    CPU in a notebook) unless a `mesh` is given, in which case the run's logical-axis rules
    place them on it.
    """
    directory, step = resolve(path, step)
    config = read_config(directory, step)
    if mesh is None:
        mesh = sharding.make_mesh(MeshConfig(data=-1, axis_rules=config.mesh.axis_rules))
    platform = sharding.mesh_platform(mesh)
    with nnx.logical_axis_rules(config.mesh.axis_rules):  # with adapters: lora.merge_lora
        graphdef, abstract_state = nnx.get_abstract_model(
            lambda: build(config, platform, nnx.Rngs(0)), mesh)
    target = nnx.to_pure_dict(abstract_state)
    base = read_meta(directory, step).get("base")
    if base is not None:  # adapters only: the rest from the base
        restored = restore_items(*locate_base(base, directory / str(step)),
                                 model=lora.without_adapters(target))
        target = nnx.to_pure_dict(nnx.filter_state(abstract_state, lora.trainable(config.lora)))
        nnx.replace_by_pure_dict(abstract_state, restored["model"])
    restored = restore_items(directory, step, model=target)
    nnx.replace_by_pure_dict(abstract_state, restored["model"])
    return nnx.merge(graphdef, abstract_state), config
