"""Loading a saved model in notebooks and tools: onto this machine's devices (`load`), as
numpy arrays without building a model (`load_params`), or one array at a time
(`SavedParams`, for exports of models larger than host memory).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from minids_jax import sharding
from minids_jax.checkpoint.base import locate_base
from minids_jax.checkpoint.store import (
    UnreadableCheckpointError,
    read_config,
    read_meta,
    read_only_manager,
    resolve,
    restore_items,
    unreadable,
    verify,
)
from minids_jax.checkpoint import integrity
from minids_jax.config import LoRAConfig, MeshConfig
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


class SavedParams(Mapping):
    """A checkpoint's parameters as {key path (str, ...): numpy array}, each read from disk,
    and checked against its saved checksum, when it is looked up: an export holds one tensor
    at a time instead of the model. A LoRA run's adapters (small) are read at the start; with
    `merge` (its LoRAConfig) they are added into their weights as those are read, and the
    mapping has the base's keys only, as `lora.merged_params(load_params(...))` has."""

    def __init__(self, path: str | os.PathLike, step: int | None = None, *,
                 merge: LoRAConfig | None = None):
        directory, step = resolve(path, step)
        step_dir = directory / str(step)
        self._merge = merge
        # path: (step dir, saved checksums, orbax's metadata of the array)
        self._sources: dict[tuple[str, ...], tuple[Any, dict | None, Any]] = {}
        meta = read_meta(directory, step)
        base = meta.get("base")
        if base is not None:  # adapters only: the other arrays are the base's
            base_dir, base_step = locate_base(base, step_dir)
            self._add_source(base_dir / str(base_step), read_meta(base_dir, base_step))
        self._add_source(step_dir, meta)
        self._adapters: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        if merge is not None:
            for a_path in [p for p in self._sources if p[-1].endswith("lora_a")]:
                weight, b_path = lora.adapted_weight(a_path)
                self._adapters[weight] = (self._read(a_path), self._read(b_path))
                del self._sources[a_path], self._sources[b_path]

    def _add_source(self, step_dir, meta: dict) -> None:
        try:
            tree = ocp.PyTreeCheckpointHandler().metadata(step_dir / "model").tree
        except Exception as error:  # orbax and tensorstore raise many kinds
            raise unreadable(step_dir, error) from error
        sums = meta.get("checksums", {}).get("model")
        for path, array_metadata in flatten_dict(tree).items():
            self._sources[tuple(map(str, path))] = (step_dir, sums, array_metadata)

    def _read(self, path: tuple[str, ...]) -> np.ndarray:
        step_dir, sums, array_metadata = self._sources[path]
        try:
            restored = ocp.PyTreeCheckpointHandler().restore(
                step_dir / "model", args=ocp.args.PyTreeRestore(
                    item=unflatten_dict({path: array_metadata}),
                    restore_args=unflatten_dict({path: ocp.RestoreArgs(
                        restore_type=np.ndarray)}), partial_restore=True))
        except Exception as error:  # orbax and tensorstore raise many kinds
            raise unreadable(step_dir, error) from error
        key = "/".join(path)
        if sums is not None and integrity.mismatches(restored, {key: sums.get(key)}):
            raise UnreadableCheckpointError(
                step_dir, f"is damaged: model array {key} differs from the checksum saved "
                          f"with it")
        return flatten_dict(restored)[path]

    def __getitem__(self, path: tuple[str, ...]) -> np.ndarray:
        array = self._read(path)
        if path in self._adapters:
            array = lora.merged_weight(array, *self._adapters[path], self._merge)
        return array

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        """The array's shape, from the checkpoint's metadata (nothing read)."""
        return tuple(self._sources[path][2].shape)

    def __contains__(self, path) -> bool:  # (Mapping's would read the array)
        return path in self._sources

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return iter(self._sources)

    def __len__(self) -> int:
        return len(self._sources)
