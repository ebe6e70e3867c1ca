"""The checkpointer of one run: resume, start from another run's parameters, save.

Batches are a pure function of (train.seed, step) and the model holds no RNG stream after
initialization, so a checkpoint's items (checkpoint/store.py) are everything a run needs to continue
exactly. Saves are asynchronous: `save` returns once the arrays are copied off the
accelerator. Use it as a context manager, so pending saves finish on every way out.

A LoRA run started from a base saves only what trains, with a reference to the base
(checkpoint/base.py); resuming restores the base from there first, then the rest.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from typing import Callable

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from minids_jax.checkpoint import store as ckpt
from minids_jax.checkpoint.base import base_reference, locate_base
from minids_jax.checkpoint.loading import restore_base
from minids_jax.checkpoint.store import CheckpointError, UnreadableCheckpointError
from minids_jax.config import NOTED, Config, ConfigError, compat
from minids_jax.errors import UserError
from minids_jax.model import lora
from minids_jax.training.steps import TrainState
from minids_jax.workdir import CONFIG_FILE, complete_steps, write_atomic


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class SaveFailedError(UserError):
    """A checkpoint could not be written (a full disk, a quota, a lost mount)."""


class Checkpointer:
    """With `workdir=None` nothing is saved or restored. Orbax's manager is made on first use
    (after the trainer holds the workdir's lock: it deletes the temporary directories of
    killed saves) and closed on leaving the `with` block, however it is left."""

    def __init__(self, config: Config, workdir, log: Callable[[str], None] = print):
        self.config, self.cfg, self.log = config, config.checkpoint, log
        self.workdir = None if workdir is None else ckpt.absolute_path(workdir)
        self.directory = None if workdir is None else ckpt.checkpoints_dir(self.workdir)
        self.last_saved_step: int | None = None  # the newest save started (or restored)
        self.verified_step: int | None = None  # restored, and matched its checksums
        self._pending: int | None = None  # the step an asynchronous save is writing
        self.base: dict | None = None  # what adapters-only saves refer to (base_reference)
        self._manager = None

    @property
    def manager(self) -> ocp.CheckpointManager | None:
        if self._manager is None and self.workdir is not None:
            self._manager = ocp.CheckpointManager(
                self.directory, item_names=ckpt.ITEMS, options=ocp.CheckpointManagerOptions(
                    preservation_policy=ocp.checkpoint_managers.LatestN(self.cfg.max_to_keep),
                    enable_async_checkpointing=self.cfg.async_save,
                    cleanup_tmp_directories=True,  # leftovers of a save that was killed midway
                    create=True))
        return self._manager

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                self.wait()
            else:  # already failing: finish what can be finished, report the first error
                try:
                    self.wait()
                except SaveFailedError as error:
                    self.log(f"error: {error}")
        finally:
            self.close()

    def close(self) -> None:
        """Closes orbax's manager (its threads); a later use makes a new one."""
        if self._manager is not None:
            manager, self._manager = self._manager, None
            try:
                manager.close()
            except Exception:  # a failed save was already reported by wait()
                pass

    def step_dir(self, step: int) -> epath.Path:
        return self.directory / str(step)

    def resumes(self) -> bool:
        """Whether the workdir holds a checkpoint of this run to continue from."""
        return bool(self.manager is not None and self.manager.all_steps())

    def restores(self) -> bool:
        """Whether restore_or_initialize reads anything: this run's checkpoint, or
        checkpoint.init_from's parameters."""
        return self.resumes() or bool(self.cfg.init_from)

    def saves(self, step: int) -> bool:
        """Whether save(step, ...) writes anything: with a workdir, once per step."""
        return self.manager is not None and step != self.last_saved_step

    def restore_or_initialize(self, state: TrainState) -> int:
        """Continues from the workdir's latest checkpoint if there is one, else starts from
        `checkpoint.init_from`'s parameters if set, else keeps the fresh state.

        Updates `state`'s arrays in place; returns the step to continue from. Then writes the
        run's config to `<workdir>/config.json` (only once the config fits the checkpoint).
        """
        step = 0
        if self.resumes():
            step = self._resume(state)
            if self.cfg.init_from:
                self.log(f"checkpoint.init_from={self.cfg.init_from} ignored: resuming this "
                         f"run's own checkpoint instead.")
        elif self.cfg.init_from:
            self._init_from(state)
        if self.workdir is not None and jax.process_index() == 0:
            write_atomic(self.workdir / CONFIG_FILE, self.config.to_json())
        return step

    def _saved(self, state: TrainState, base: dict | None, step: int | None = None) -> dict:
        """The pure-dict trees a checkpoint (of `step`) holds of `state`: with a base, of the
        model only what trains (lora.trainable); at step 0 written without optimizer state
        (`store.save_model`: an imported model), the model only."""
        model = (nnx.filter_state(state.model, lora.trainable(self.config.lora)) if base
                 else state.model)
        trees = {"model": nnx.to_pure_dict(model)}
        if step != 0 or (self.step_dir(step) / "optimizer").exists():
            trees["optimizer"] = nnx.to_pure_dict(state.optimizer)
        return trees

    def _resume(self, state: TrainState) -> int:
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self._check_config(step)  # before anything is restored
                base = ckpt.read_meta(self.directory, step, self.manager).get("base")
                targets = {name: ckpt.restore_target(tree)
                           for name, tree in self._saved(state, base, step).items()}
                restored = ckpt.restore_items(self.directory, step, self.manager, **targets)
                break
            except UnreadableCheckpointError as error:
                if not self.cfg.fallback:
                    raise
                self.log(f"WARNING: checkpoint {error.step_dir} {error.problem}; falling back "
                         f"to the previous checkpoint (checkpoint.fallback=True).")
                self._move_aside(step)
        else:
            raise CheckpointError(
                f"no checkpoint in {self.directory} verified; all were moved to "
                f"{self.workdir / ckpt.CORRUPT}. Run again to start from scratch in this "
                f"workdir.")
        total = self.config.optim.total_steps
        if step > total:
            raise ConfigError(
                f"the checkpoint {self.step_dir(step)} is at step {step}, past "
                f"optim.total_steps={total}; raise --config.optim.total_steps above {step} to "
                f"train further, or use a new --workdir to start again.")
        if base is not None:  # first the base, then what trains on it
            directory, base_step = locate_base(base, self.step_dir(step), self.cfg.init_from)
            self._restore_base(state, (directory, base_step))
            base_dir = directory / str(base_step)
            if str(base_dir) != base["step_dir"]:
                self.log(f"the base of these adapters is now {base_dir} (it was "
                         f"{base['step_dir']}); later checkpoints refer to it there")
            self.base = dict(base, step_dir=str(base_dir))
        for name, part in state._asdict().items():
            if name in restored:
                nnx.replace_by_pure_dict(part, restored[name])  # in place
            else:
                self.log(f"{self.step_dir(step)} holds no {name} state (an imported model): "
                         f"the {name} starts fresh, as at step 0")
        self.last_saved_step = step
        if restored["verified"]:
            self.verified_step = step
        else:
            self.log(f"note: {self.step_dir(step)} has no checksums (an older version saved "
                     f"it), so its arrays could not be verified.")
        self.log(f"resumed from {self.step_dir(step)} at step {step}")
        return step

    def _check_config(self, step: int) -> None:
        saved = ckpt.read_config(self.directory, step)
        ckpt.require_same_architecture(
            saved, self.config, f"the checkpoint {self.step_dir(step)}",
            f"Run with the checkpoint's values (see {self.workdir / CONFIG_FILE}), or use a "
            f"new --workdir for a new model.")
        if saved.optim.name != self.config.optim.name:  # its state is another optimizer's
            raise CheckpointError(
                f"the checkpoint {self.step_dir(step)} holds optim.name={saved.optim.name!r}'s "
                f"state, and this run asks for {self.config.optim.name!r}; resume with "
                f"--config.optim.name={saved.optim.name}, or start a new --workdir from its "
                f"parameters with --config.checkpoint.init_from={self.workdir}.")
        changes = compat.changes(saved, self.config, NOTED)
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
        # The base model must match; adapters (lora) are this run's own and start fresh.
        ckpt.require_same_architecture(saved, self.config,
                                       f"checkpoint.init_from={self.cfg.init_from}",
                                       "Set the model fields to the checkpoint's values.",
                                       groups=("model",))
        if saved.lora.rank:  # a LoRA run's model: its adapters merged into the base
            raise CheckpointError(
                f"checkpoint.init_from={self.cfg.init_from} is a LoRA run; export it merged "
                f"(python -m minids_jax.hf export) and import that, or resume it instead.")
        meta = self._restore_base(state, (directory, step))
        if self.config.lora.rank:
            self.base = base_reference(directory / str(step), meta)
        self.log(f"initialized the parameters from {directory / str(step)} (step {step}); "
                 f"the optimizer starts fresh at step 0"
                 f"{'; checkpoints hold the adapters only' if self.base else ''}")

    def _restore_base(self, state: TrainState, where: tuple[epath.Path, int]):
        """Restores the base model (all but the adapters) of checkpoint `where` into `state`,
        in place; returns its metadata."""
        base = lora.without_adapters(nnx.to_pure_dict(state.model))
        target = ckpt.restore_target(base)
        for array in jax.tree.leaves(base):  # (zeros, steps.create_train_state): room for it
            array.delete()
        restored = restore_base(*where, target)
        nnx.replace_by_pure_dict(state.model, restored["model"])
        return restored["meta"]

    def latest_description(self) -> str:
        """What the newest checkpoint is known to be, for messages about stopping."""
        step = self.last_saved_step
        if step is None:
            return "no checkpoint was written"
        if step == self.verified_step:
            return f"the latest checkpoint (step {step}) matched its checksums when restored"
        return (f"the latest checkpoint is step {step}, saved from finite values (its "
                f"checksums are verified when a run resumes from it)")

    def save(self, step: int, state: TrainState, loss: float | None = None) -> None:
        """Starts an asynchronous save of `state` as `step` (once per step). Raises
        SaveFailedError if this save, or the previous one, could not be written."""
        if not self.saves(step):
            return
        self.wait()  # orbax's save would wait for the previous one too; this names its step
        trees = self._saved(state, self.base)
        meta = ckpt.make_meta(self.config, step, loss, self.base, **trees)
        try:
            self.manager.save(step, force=True, args=ocp.args.Composite(
                model=ocp.args.StandardSave(trees["model"]),
                optimizer=ocp.args.StandardSave(trees["optimizer"]),
                config=ocp.args.JsonSave(json.loads(self.config.to_json())),
                meta=ocp.args.JsonSave(meta)))
        except Exception as error:  # orbax, tensorstore and the OS raise many kinds
            raise self._failed(step, error) from error
        self.last_saved_step = step
        self._pending = step if self.cfg.async_save else None

    def poll(self) -> None:
        """Raises SaveFailedError if a background save has failed since the last call; never
        waits for one still running (cheap enough to call every step)."""
        if self._pending is not None and not self.manager.is_saving_in_progress():
            self.wait()

    def wait(self) -> None:
        """Blocks until pending saves are on disk; raises SaveFailedError if one failed."""
        if self._manager is None:
            return
        step, self._pending = self._pending, None
        try:
            self._manager.wait_until_finished()
        except Exception as error:  # the background save's own error
            raise self._failed(step, error) from error

    def _failed(self, step: int | None, error: Exception) -> SaveFailedError:
        """The one line that reports a failed save: where, why, the free space, and what is
        left to resume from."""
        # tensorstore reports the OS error inside a long message: "... [os_error_code='28']"
        code = re.search(r"os_error_code='(\d+)'", str(error))
        if code or isinstance(error, OSError) and error.errno:
            reason = os.strerror(int(code.group(1)) if code else error.errno)
        else:
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        try:
            free = f"{shutil.disk_usage(self.directory).free / 2**20:,.1f} MiB free there"
        except OSError:
            free = "free space unknown"
        complete = sorted(s for s in complete_steps(self.directory) if s != step)
        self.last_saved_step = complete[-1] if complete else None
        kept = (f"the last complete checkpoint is {self.step_dir(complete[-1])}. Free some "
                f"space (or lower checkpoint.max_to_keep) and run the same command to resume "
                f"from it." if complete else "no checkpoint was completed. Free some space and "
                "run the same command again.")
        return SaveFailedError(
            f"saving the checkpoint of step {step} to {self.directory} failed ({reason}); "
            f"{free}. The run stopped; {kept}")
