"""Checkpoints on disk: finding them, reading their items, and loading a model in a notebook.

A run's checkpoints live in `<workdir>/checkpoints/<step>/`, one orbax item per part:

  model/      the model's NNX state (parameters and any other model variables), a nested dict
  optimizer/  the optimizer's NNX state: the update count `step` and the AdamW moments
  config/     the run's full config as JSON
  meta/       step, seed, loss, device count and mesh at save time, library versions, and
              a checksum of every array of model/ and optimizer/ (integrity.py) (JSON)

A LoRA run started from a base (`checkpoint.init_from`) saves in model/ only what trains (the
adapters, and the norm gains with lora.train_norms): meta/ then holds `base`, the base's
absolute step directory and a digest of its arrays' checksums, and every restore reads the
rest of the model from there (checkpoint/base.py).

Orbax writes each checkpoint into a temporary directory and renames it when complete, so only
whole checkpoints count; every restore and `load` also checks the arrays against their
checksums, so a damaged file is an error, not wrong weights. Restoring builds a target of
`jax.ShapeDtypeStruct`s carrying the shardings of the CURRENT mesh, so a checkpoint written
under any mesh restores onto any device count. Saving during a run is `checkpointer.py`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from minids_jax import config as config_lib
from minids_jax.checkpoint import integrity
from minids_jax.config import ARCHITECTURE, Config, compat
from minids_jax.errors import UserError
from minids_jax.workdir import CHECKPOINTS, CONFIG_FILE, write_atomic

CORRUPT = "corrupt_checkpoints"  # unreadable checkpoints are moved here (with fallback=True)
ITEMS = ("model", "optimizer", "config", "meta")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit this run; the message says which."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint's files are truncated, or its arrays fail their checksums."""

    def __init__(self, step_dir: epath.Path, problem: str):
        self.step_dir, self.problem = step_dir, problem
        super().__init__(
            f"checkpoint {step_dir} {problem}. Set --config.checkpoint.fallback=True to resume "
            f"from the newest checkpoint that verifies (the bad one is moved to "
            f"{step_dir.parent.parent / CORRUPT}), or delete {step_dir}.")


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def absolute_path(path: str | os.PathLike) -> epath.Path:
    """`path` made absolute (a local relative one from the working directory): orbax refuses
    relative checkpoint paths ("Checkpoint path should be absolute")."""
    path = epath.Path(path)
    return path if path.is_absolute() else path.resolve()


def checkpoints_dir(workdir: str | os.PathLike) -> epath.Path:
    return absolute_path(workdir) / CHECKPOINTS


def read_only_manager(directory: epath.Path) -> ocp.CheckpointManager:
    # Never saves. (orbax's read_only=True option would log warnings on every load.)
    options = ocp.CheckpointManagerOptions(create=False, save_interval_steps=0,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, item_names=ITEMS, options=options)


def resolve(path: str | os.PathLike, step: int | None = None) -> tuple[epath.Path, int]:
    """(checkpoints directory, step) for a workdir, its `checkpoints/` directory or a step's.

    Without `step`, the latest complete checkpoint is taken.
    """
    path = absolute_path(path)
    if not path.exists():
        raise CheckpointError(f"no such checkpoint or workdir: {path}.")
    if (path / CHECKPOINTS).is_dir():
        path = path / CHECKPOINTS
    elif path.name.isdigit() and (path / "model").exists():  # one step's directory
        if step is not None and step != int(path.name):
            raise CheckpointError(f"{path} is the checkpoint of step {path.name}, not of step "
                                  f"{step}; pass its parent directory to choose another step.")
        return path.parent, int(path.name)
    with read_only_manager(path) as manager:
        steps = manager.all_steps()
    if not steps:
        raise CheckpointError(
            f"no complete checkpoint under {path}; pass a workdir that a run with "
            f"--workdir has saved into, its '{CHECKPOINTS}' directory, or one step's directory.")
    if step is None:
        return path, max(steps)
    if step not in steps:
        raise CheckpointError(f"{path} has no checkpoint of step {step}; it has steps "
                              f"{sorted(steps)}.")
    return path, step


def _read_json(item: str, path, step: int | None = None, manager=None) -> dict:
    directory, step = resolve(path, step)
    try:
        with contextlib.ExitStack() as stack:
            if manager is None:
                manager = stack.enter_context(read_only_manager(directory))
            restored = manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.JsonRestore()}))
    except Exception as error:  # orbax and tensorstore raise many kinds
        raise unreadable(directory / str(step), error) from error
    return restored[item]


def read_config(path: str | os.PathLike, step: int | None = None) -> Config:
    """The full config saved with a checkpoint (see `resolve` for `path` and `step`)."""
    return config_lib.upgrade(_read_json("config", path, step))


def read_meta(path: str | os.PathLike, step: int | None = None, manager=None) -> dict:
    """A checkpoint's metadata: step, loss, checksums, `base` (adapters-only checkpoints)."""
    return _read_json("meta", path, step, manager)


def library_versions() -> dict[str, str]:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax_checkpoint": ocp.__version__}


def make_meta(config: Config, step: int, loss: float | None, base: dict | None = None,
              **items) -> dict:
    """A checkpoint's meta item: step, seed, loss, devices and mesh, library versions, time,
    the checksums of the arrays of `items` (pure-dict trees), and `base` if it has one."""
    mesh = getattr(jax.tree.leaves(items)[0].sharding, "mesh", None)
    return dict(step=step, seed=config.train.seed, loss=loss,
                process_count=jax.process_count(), device_count=jax.device_count(),
                mesh={name: int(size) for name, size in getattr(mesh, "shape", {}).items()},
                versions=library_versions(), time=time.time(),
                checksums={name: integrity.checksums(tree) for name, tree in items.items()},
                **({"base": base} if base else {}))


# ---------------------------------------------------------------------------------------------
# Restoring


def restore_target(tree):
    """ShapeDtypeStructs with the shardings of `tree`'s arrays: a restore target for this mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def unreadable(step_dir: epath.Path, error: Exception) -> UnreadableCheckpointError:
    for _ in range(10):  # orbax wraps tensorstore's error, which says what failed
        cause = error.__cause__ or error.__context__
        if cause is None:
            break
        error = cause
    message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return UnreadableCheckpointError(
        step_dir, f"is unreadable, its files truncated or corrupted ({message})")


def _saved_dtypes(item_dir: epath.Path) -> dict[str, Any]:
    """The dtypes an item's arrays were saved in ({} when orbax cannot say)."""
    try:
        return integrity.leaf_dtypes(ocp.PyTreeCheckpointHandler().metadata(item_dir).tree)
    except Exception:  # noqa: BLE001 (a JSON item, or an older layout: checked as restored)
        return {}


def verify(step_dir: epath.Path, meta: dict, **trees) -> bool:
    """Checks restored arrays against the checksums saved in `meta`: raises
    UnreadableCheckpointError naming the first ones that differ; False if the checkpoint has
    no checksums (an older version wrote it), True if every array matched."""
    saved = meta.get("checksums")
    if saved is None:
        return False
    for item, tree in trees.items():
        bad = integrity.mismatches(tree, saved.get(item, {}))
        # An array restored in another dtype than saved is compared as saved; orbax's
        # metadata says which, read only then (3 s at 61 layers of configs/v3_tiny.py).
        if bad:
            bad = integrity.mismatches(tree, saved.get(item, {}), _saved_dtypes(step_dir / item))
        if bad:
            more = f" and {len(bad) - 2} more" if len(bad) > 2 else ""
            raise UnreadableCheckpointError(
                step_dir, f"is damaged: {item} array(s) {', '.join(bad[:2])}{more} differ from "
                          f"the checksums saved with them")
    return True


def restore_items(directory: epath.Path, step: int, manager=None,
                  **targets) -> dict[str, Any]:
    """Restores the named items (pure-dict targets of ShapeDtypeStructs) plus config and meta,
    and verifies the arrays' checksums (`restored["verified"]`: False for a checkpoint saved
    without them)."""
    args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    try:
        with contextlib.ExitStack() as stack:
            if manager is None:
                manager = stack.enter_context(read_only_manager(directory))
            restored = dict(manager.restore(step, args=ocp.args.Composite(
                **args, config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())))
        if restored["meta"]["step"] != step:
            raise ValueError(f"its metadata says step {restored['meta']['step']}")
    except Exception as error:  # orbax and tensorstore raise many kinds
        raise unreadable(directory / str(step), error) from error
    restored["verified"] = verify(directory / str(step), restored["meta"],
                                  **{name: restored[name] for name in targets})
    return restored


def require_same_architecture(saved: Config, current: Config, what: str, fix: str,
                              groups: tuple[str, ...] | None = None) -> None:
    """Raises CheckpointError naming the architecture fields (of `groups`, default all) that
    differ."""
    differences = compat.changes(saved, current, ARCHITECTURE, groups)
    if differences:
        raise CheckpointError(f"{what} has a different model architecture than this run: "
                              f"{'; '.join(differences)}. {fix}")


def save_model(workdir, config: Config, model: dict, **meta) -> None:
    """Writes `workdir`'s checkpoint of step 0 holding the model's pure-dict state only, with
    `meta` added to its metadata: an imported model. A run resuming it creates the optimizer
    state fresh, which at step 0 is exactly what it would restore."""
    directory = checkpoints_dir(workdir)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, item_names=ITEMS, options=options) as manager:
        if manager.all_steps():
            raise CheckpointError(f"{directory} already holds checkpoints; import into a new "
                                  f"workdir.")
        meta = {**make_meta(config, 0, None, model=model), **meta}
        manager.save(0, args=ocp.args.Composite(
            model=ocp.args.StandardSave(model),
            config=ocp.args.JsonSave(json.loads(config.to_json())), meta=ocp.args.JsonSave(meta)))
        manager.wait_until_finished()
    if jax.process_index() == 0:
        write_atomic(absolute_path(workdir) / CONFIG_FILE, config.to_json())
