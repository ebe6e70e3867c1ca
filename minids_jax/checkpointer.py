"""The checkpointer of one run: resume, start from another run's parameters, save.

Batches are a pure function of (train.seed, step) and the model holds no RNG stream after
initialization, so a checkpoint's items (checkpoint.py) are everything a run needs to continue
exactly. Saves are asynchronous: `save` returns once the arrays are copied off the
accelerator. Use it as a context manager, so pending saves finish on every way out.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from minids_jax import checkpoint as ckpt
from minids_jax import config as config_lib
from minids_jax.checkpoint import CheckpointError, UnreadableCheckpointError
from minids_jax.config import Config
from minids_jax.steps import TrainState


def _write_atomically(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def _library_versions() -> dict[str, str]:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax_checkpoint": ocp.__version__}


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class Checkpointer:
    """With `workdir=None` nothing is saved or restored."""

    def __init__(self, config: Config, workdir, log: Callable[[str], None] = print):
        self.config, self.cfg, self.log = config, config.checkpoint, log
        self.workdir = None if workdir is None else ckpt.absolute_path(workdir)
        self.last_saved_step: int | None = None
        self.manager = None
        if self.workdir is not None:
            self.directory = ckpt.checkpoints_dir(self.workdir)
            self.manager = ocp.CheckpointManager(
                self.directory, item_names=ckpt.ITEMS, options=ocp.CheckpointManagerOptions(
                    preservation_policy=ocp.checkpoint_managers.LatestN(self.cfg.max_to_keep),
                    enable_async_checkpointing=self.cfg.async_save,
                    cleanup_tmp_directories=True,  # leftovers of a save that was killed midway
                    create=True))

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.wait()

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def restore_or_initialize(self, state: TrainState) -> int:
        """Continues from the workdir's latest checkpoint if there is one, else starts from
        `checkpoint.init_from`'s parameters if set, else keeps the fresh state.

        Updates `state`'s arrays in place; returns the step to continue from. Then writes the
        run's config to `<workdir>/config.json` (only once the config fits the checkpoint).
        """
        step = 0
        if self.manager is not None and self.manager.all_steps():
            step = self._resume(state)
            if self.cfg.init_from:
                self.log(f"checkpoint.init_from={self.cfg.init_from} ignored: resuming this "
                         f"run's own checkpoint instead.")
        elif self.cfg.init_from:
            self._init_from(state)
        if self.workdir is not None and jax.process_index() == 0:
            _write_atomically(self.workdir / "config.json", self.config.to_json())
        return step

    def _resume(self, state: TrainState) -> int:
        targets = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self._check_config(step)
                if targets is None:  # only once the config fits
                    targets = {name: ckpt.restore_target(nnx.to_pure_dict(part))
                               for name, part in state._asdict().items()}
                restored = ckpt.restore_items(self.directory, step, self.manager, **targets)
                break
            except UnreadableCheckpointError as error:
                if not self.cfg.fallback:
                    raise
                self.log(f"WARNING: {error.args[0].split(' It may')[0]}; falling back to the "
                         f"previous checkpoint (checkpoint.fallback=True).")
                self._move_aside(step)
        else:
            raise CheckpointError(
                f"no checkpoint in {self.directory} was readable; all were moved to "
                f"{self.workdir / ckpt.CORRUPT}. Run again to start from scratch in this "
                f"workdir.")
        for name, part in state._asdict().items():
            nnx.replace_by_pure_dict(part, restored[name])  # in place
        self.last_saved_step = step
        self.log(f"resumed from {self.step_dir(step)} at step {step}")
        return step

    def _check_config(self, step: int) -> None:
        saved = ckpt.read_config(self.directory, step)
        ckpt.require_same_architecture(
            saved, self.config, f"the checkpoint {self.step_dir(step)}",
            f"Run with the checkpoint's values (see {self.workdir / 'config.json'}), or use a "
            f"new --workdir for a new model.")
        changes = config_lib.changes(saved, self.config, config_lib.NOTED)
        if changes:
            self.log(f"note: resuming with changed settings (the run will not match an "
                     f"uninterrupted one): {'; '.join(changes)}")

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            corrupt = self.workdir / ckpt.CORRUPT
            corrupt.mkdir(parents=True, exist_ok=True)
            os.replace(self.step_dir(step), corrupt / f"{step}-{int(time.time())}")
        _sync("minids_move_aside")
        self.manager.reload()

    def _init_from(self, state: TrainState) -> None:
        directory, step = ckpt.resolve(self.cfg.init_from)
        saved = ckpt.read_config(directory, step)
        ckpt.require_same_architecture(saved, self.config,
                                       f"checkpoint.init_from={self.cfg.init_from}",
                                       "Set the model fields to the checkpoint's values.")
        target = ckpt.restore_target(nnx.to_pure_dict(state.model))
        restored = ckpt.restore_items(directory, step, model=target)
        nnx.replace_by_pure_dict(state.model, restored["model"])  # in place
        self.log(f"initialized the parameters from {directory / str(step)} (step {step}); "
                 f"the optimizer starts fresh at step 0")

    def save(self, step: int, state: TrainState, loss: float | None = None) -> None:
        """Starts an asynchronous save of `state` as `step` (once per step)."""
        if self.manager is None or step == self.last_saved_step:
            return
        mesh = jax.tree.leaves(state)[0].sharding.mesh
        meta = dict(step=step, seed=self.config.train.seed, loss=loss,
                    process_count=jax.process_count(), device_count=jax.device_count(),
                    mesh={name: int(size) for name, size in mesh.shape.items()},
                    versions=_library_versions(), time=time.time())
        self.manager.save(step, force=True, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.to_pure_dict(state.model)),
            optimizer=ocp.args.StandardSave(nnx.to_pure_dict(state.optimizer)),
            config=ocp.args.JsonSave(json.loads(self.config.to_json())),
            meta=ocp.args.JsonSave(meta)))
        self.last_saved_step = step

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        if self.manager is not None:
            self.manager.wait_until_finished()
