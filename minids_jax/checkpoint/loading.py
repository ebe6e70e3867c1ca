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
    CheckpointError,
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
from minids_jax.model import build, lora, quant


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
        restored = restore_base(*locate_base(base, directory / str(step)),
                                lora.without_adapters(target))
        target = nnx.to_pure_dict(nnx.filter_state(abstract_state, lora.trainable(config.lora)))
        nnx.replace_by_pure_dict(abstract_state, restored["model"])
    restored = restore_items(directory, step, model=target)
    nnx.replace_by_pure_dict(abstract_state, restored["model"])
    return nnx.merge(graphdef, abstract_state), config


def restore_base(directory, step: int, target: dict) -> dict[str, Any]:
    """`restore_items(directory, step, model=target)` for a base model's state `target` (a
    pure dict of ShapeDtypeStructs with shardings) that may hold weights quantized
    (lora.base_quant) where the checkpoint holds them at full precision: those are read one
    at a time, checked against their checksums, and quantized on their devices, so neither
    the host nor a device ever holds the whole full-precision model."""
    step_dir = directory / str(step)
    flat = flatten_dict(target)
    saved = SavedParams(directory, step)
    to_quantize: dict[tuple, dict[str, Any]] = {}  # the weight's path: its stored arrays
    for path, leaf in flat.items():
        if not saved.holds(tuple(map(str, path))) and saved.holds(tuple(map(str, path[:-1]))):
            to_quantize.setdefault(path[:-1], {})[path[-1]] = leaf
    quantized_there = set(saved.dequantized)
    if any(not saved.holds(key) and (key in quantized_there or key[:-1] in quantized_there)
           for key in (tuple(map(str, path)) for path in flat)):
        saved_quant = read_config(directory, step).lora.base_quant
        raise CheckpointError(
            f"{step_dir} holds its base quantized as {saved_quant}, and this run asks for "
            f"another form; run with --config.lora.base_quant={saved_quant}, or start from the "
            f"full-precision checkpoint it was made from.")
    if not to_quantize:
        return restore_items(directory, step, model=target)
    model = {}
    for path, leaf in flat.items():
        key = tuple(map(str, path))
        if path[:-1] in to_quantize or not saved.holds(key):
            continue
        model[path] = _placed(saved[key].astype(leaf.dtype), leaf.sharding)
    for path, leaves in to_quantize.items():
        kind = "nf4" if "codes" in leaves else "int8"
        weight = saved[tuple(map(str, path))]
        placed = _placed(weight, leaves["codes" if kind == "nf4" else "values"].sharding)
        shardings = {name: leaf.sharding for name, leaf in leaves.items()}
        arrays = jax.jit(lambda w: quant.quantize(w, kind), out_shardings=shardings)(placed)
        model.update({path + (name,): array for name, array in arrays.items()})
        del placed
    missing = set(flat) - set(model)
    if missing:
        raise unreadable(step_dir, ValueError(f"it holds no {'/'.join(map(str, min(missing)))}"))
    meta = read_meta(directory, step)
    return {"model": unflatten_dict(model), "meta": meta, "verified": bool(meta.get("checksums"))}


def _placed(array: np.ndarray, sharding) -> jax.Array:
    """A host array as a global array of `sharding` (each device takes its part)."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


class SavedParams(Mapping):
    """A checkpoint's parameters as {key path (str, ...): numpy array}, each read from disk,
    and checked against its saved checksum, when it is looked up: an export holds one tensor
    at a time instead of the model. A LoRA run's adapters (small) are read at the start; with
    `merge` (its LoRAConfig) they are added into their weights as those are read, and the
    mapping has the base's keys only, as `lora.merged_params(load_params(...))` has. A weight
    saved quantized (lora.base_quant) is one key, read dequantized to float32 (`dequantized`
    lists them)."""

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
        self._quantized: dict[tuple[str, ...], list[tuple[str, ...]]] = {}
        for path in [p for p in self._sources if p[-1] in quant.STORED_NAMES]:
            self._quantized.setdefault(path[:-1], []).append(path)
        self.dequantized = sorted(self._quantized)
        self._adapters: dict[tuple[str, ...], tuple[np.ndarray, np.ndarray]] = {}
        if merge is not None:
            for a_path in [p for p in self._sources if p[-1].endswith("lora_a")]:
                weight, b_path = lora.adapted_weight(a_path)
                self._adapters[weight] = (self._read(a_path), self._read(b_path))
                del self._sources[a_path], self._sources[b_path]
        stored = {part for parts in self._quantized.values() for part in parts}
        self._keys = [p for p in self._sources if p not in stored] + list(self._quantized)

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
        if path in self._quantized:
            stored = {part[-1]: self._read(part) for part in self._quantized[path]}
            array = np.asarray(quant.dequantize(stored, np.float32))
        else:
            array = self._read(path)
        if path in self._adapters:
            array = lora.merged_weight(array, *self._adapters[path], self._merge)
        return array

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        """The array's shape, from the checkpoint's metadata (nothing read)."""
        if path in self._quantized:
            stored = {part[-1]: self._sources[part][2].shape for part in self._quantized[path]}
            return quant.full_shape(stored)
        return tuple(self._sources[path][2].shape)

    def quantization_note(self, base_quant: str) -> str | None:
        """What an export of these parameters should say of a quantized base (lora.base_quant)."""
        if self.dequantized:
            return (f"note: {len(self.dequantized)} weights were saved quantized "
                    f"(lora.base_quant={base_quant}); they are written dequantized, their "
                    f"quantization error included")
        if base_quant != "none":
            return (f"note: the adapters were trained on the base quantized as {base_quant}; "
                    f"they are merged into its full-precision weights, as QLoRA's merge does")
        return None

    def holds(self, path: tuple[str, ...]) -> bool:
        """Whether the checkpoint holds an array at exactly `path` (a quantized weight's
        stored parts, not the weight)."""
        return path in self._sources

    def __contains__(self, path) -> bool:  # (Mapping's would read the array)
        return path in self._quantized or path in self._sources and \
            path[:-1] not in self._quantized

    def __iter__(self) -> Iterator[tuple[str, ...]]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)
