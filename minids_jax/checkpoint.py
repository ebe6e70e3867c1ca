"""Checkpoints: orbax save and restore, exact resume, preemption, and loading in notebooks.

A run's checkpoints live in `<workdir>/checkpoints/<step>/`, one orbax item per part:

  model/      the model's NNX state (parameters and any other model variables), a nested dict
  optimizer/  the optimizer's NNX state: the update count `step` and the AdamW moments
  config/     the run's full config as JSON
  meta/       step, seed, loss, device count and mesh at save time, library versions (JSON)

Batches are a pure function of (train.seed, step), and the model holds no RNG stream after
initialization, so these items are everything a run needs to continue exactly. Orbax writes
each checkpoint into a temporary directory and renames it when complete, so a process killed
at any moment leaves only whole checkpoints behind; the temporary leftovers are ignored (and
cleaned up by the next run).

Restoring builds a target of `jax.ShapeDtypeStruct`s carrying the shardings of the CURRENT
mesh, so a checkpoint written under any mesh (say fsdp=8) restores onto any device count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shlex
import signal
import sys
import threading
import time
import typing
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath
from flax import nnx

from minids_jax import config as config_lib
from minids_jax import sharding
from minids_jax.config import Config, MeshConfig

CHECKPOINTS = "checkpoints"  # under the workdir
CORRUPT = "corrupt_checkpoints"  # unreadable checkpoints are moved here (with fallback=True)
ITEMS = ("model", "optimizer", "config", "meta")

# Model fields that change the parameters' shapes or the function they compute. Anything else
# (compute dtype, MoE dispatch, the balancing-loss weight) may change when resuming.
ARCHITECTURE_FIELDS = ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "latent_k",
                       "mlp_mult", "n_experts", "top_k", "attn_pattern", "rope_theta", "norm_eps",
                       "param_dtype")
# Fields whose change on resume is expected and keeps the run meaningful (more steps, other
# logging, another mesh, other checkpoint settings): changed silently.
QUIET_FIELDS = ("optim.total_steps", "train.log_every", "train.eval_every", "train.eval_batches",
                "data.cache_dir", "mesh.", "checkpoint.")


def _drop_orbax_info(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or f"{os.sep}orbax{os.sep}" not in record.pathname


# orbax logs dozens of INFO lines per save through absl, which train.py shows at INFO; keep its
# warnings and errors only.
absl_logging.get_absl_logger().addFilter(_drop_orbax_info)


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not fit this run; the message says which."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint's files are truncated or corrupted."""


class NonFiniteLossError(FloatingPointError):
    """The loss or gradient became NaN or infinite; the run stopped without saving that state."""


# ---------------------------------------------------------------------------------------------
# Finding checkpoints


def absolute_path(path: str | os.PathLike) -> epath.Path:
    """`path` made absolute (a local relative one from the working directory): orbax refuses
    relative checkpoint paths ("Checkpoint path should be absolute")."""
    path = epath.Path(path)
    return path if path.is_absolute() else path.resolve()


def checkpoints_dir(workdir: str | os.PathLike) -> epath.Path:
    return absolute_path(workdir) / CHECKPOINTS


def _read_only_manager(directory: epath.Path) -> ocp.CheckpointManager:
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
    steps = _read_only_manager(path).all_steps()
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


def read_config(path: str | os.PathLike, step: int | None = None) -> Config:
    """The full config saved with a checkpoint (see `resolve` for `path` and `step`)."""
    directory, step = resolve(path, step)
    try:
        restored = _read_only_manager(directory).restore(
            step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    except Exception as error:  # orbax and tensorstore raise many kinds
        raise _unreadable(directory / str(step), error) from error
    return config_lib.from_config_dict(_known_fields(restored["config"]))


def _known_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """Drops fields this version no longer has, so older checkpoints still open; fields added
    since take their defaults."""
    kept = {}
    for group, cls in typing.get_type_hints(Config).items():
        names = {field.name for field in dataclasses.fields(cls)}
        kept[group] = {k: v for k, v in saved.get(group, {}).items() if k in names}
        dropped = sorted(set(saved.get(group, {})) - names)
        if dropped:
            logging.warning("checkpoint config fields unknown to this version, ignored: %s",
                            ", ".join(f"{group}.{name}" for name in dropped))
    return kept


# ---------------------------------------------------------------------------------------------
# Loading in notebooks and tools


def load_params(path: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """The model's saved parameters as a nested dict of numpy arrays, without building a model.

    Keys follow the module tree, e.g. `params["blocks"]["0"]["moe"]["w1"]` ([E, D, F]).
    Works on any machine, whatever mesh the checkpoint was written under.
    """
    directory, step = resolve(path, step)
    manager = _read_only_manager(directory)
    try:
        metadata = ocp.PyTreeCheckpointHandler().metadata(directory / str(step) / "model").tree
        restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
        restored = manager.restore(step, args=ocp.args.Composite(
            model=ocp.args.PyTreeRestore(restore_args=restore_args)))
    except CheckpointError:
        raise
    except Exception as error:  # orbax and tensorstore raise many kinds
        raise _unreadable(directory / str(step), error) from error
    return restored["model"]


def load(path: str | os.PathLike, step: int | None = None, *,
         mesh: jax.sharding.Mesh | None = None):
    """Restores a saved model onto this machine's devices: returns (model, config).

    `path` is a workdir, its `checkpoints/` directory or one step's directory; without `step`
    the latest checkpoint is loaded. Parameters are replicated over all default devices (one
    CPU in a notebook) unless a `mesh` is given, in which case the run's logical-axis rules
    place them on it.
    """
    from minids_jax.model import MiniDeepSeek  # the model is only needed here

    directory, step = resolve(path, step)
    config = read_config(directory, step)
    if mesh is None:
        mesh = sharding.make_mesh(MeshConfig(data=-1, axis_rules=config.mesh.axis_rules))
    with nnx.logical_axis_rules(config.mesh.axis_rules):
        graphdef, abstract_state = nnx.get_abstract_model(
            lambda: MiniDeepSeek(config.model, rngs=nnx.Rngs(0)), mesh)
    restored = _restore_items(directory, step, model=nnx.to_pure_dict(abstract_state))
    nnx.replace_by_pure_dict(abstract_state, restored["model"])
    return nnx.merge(graphdef, abstract_state), config


# ---------------------------------------------------------------------------------------------
# Restoring


def _abstract(tree):
    """ShapeDtypeStructs with the shardings of `tree`'s arrays: a restore target for this mesh."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _unreadable(step_dir: epath.Path, error: Exception) -> UnreadableCheckpointError:
    message = str(error).strip().splitlines()[0][:300] if str(error).strip() else ""
    return UnreadableCheckpointError(
        f"checkpoint {step_dir} is unreadable ({type(error).__name__}: {message}). It may be "
        f"truncated or corrupted. Set --config.checkpoint.fallback=True to resume from the "
        f"previous complete checkpoint (the bad one is moved to "
        f"{step_dir.parent.parent / CORRUPT}), or delete {step_dir}.")


def _restore_items(directory: epath.Path, step: int, manager=None, **targets) -> dict[str, Any]:
    """Restores the named items (pure-dict targets of ShapeDtypeStructs) plus config and meta."""
    manager = manager or _read_only_manager(directory)
    args = {name: ocp.args.StandardRestore(target) for name, target in targets.items()}
    try:
        restored = manager.restore(step, args=ocp.args.Composite(
            **args, config=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
        if restored["meta"]["step"] != step:
            raise ValueError(f"its metadata says step {restored['meta']['step']}")
    except Exception as error:  # orbax and tensorstore raise many kinds
        raise _unreadable(directory / str(step), error) from error
    return restored


def architecture_diff(saved: Config, current: Config) -> list[str]:
    """'model.<field>: checkpoint X, this run Y' for every architecture field that differs."""
    return [f"model.{name}: checkpoint {getattr(saved.model, name)!r}, this run "
            f"{getattr(current.model, name)!r}"
            for name in ARCHITECTURE_FIELDS
            if getattr(saved.model, name) != getattr(current.model, name)]


def _require_same_architecture(saved: Config, current: Config, what: str, fix: str) -> None:
    differences = architecture_diff(saved, current)
    if differences:
        raise CheckpointError(f"{what} has a different model architecture than this run: "
                              f"{'; '.join(differences)}. {fix}")


def _flat(config: Config) -> dict[str, Any]:
    flat = {}
    for group, values in dataclasses.asdict(config).items():
        for name, value in values.items():
            flat[f"{group}.{name}"] = value
    return flat


def other_changes(saved: Config, current: Config) -> list[str]:
    """Non-architecture fields that differ and may change the run's course (for a warning)."""
    old, new = _flat(saved), _flat(current)
    return [f"{key}: {old[key]!r} -> {new[key]!r}" for key in sorted(new)
            if old.get(key) != new[key] and not key.startswith(QUIET_FIELDS)
            and key[len("model."):] not in ARCHITECTURE_FIELDS]


# ---------------------------------------------------------------------------------------------
# The checkpointer the training loop uses


def _write_atomically(path: epath.Path, text: str) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, path)


def _library_versions() -> dict[str, str]:
    import flax
    import optax

    return {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
            "orbax_checkpoint": ocp.__version__}


class Checkpointer:
    """Saving, resuming and stopping cleanly for one run. The loop calls, in order:

        with checkpointer.guard():                  # signals; waits for saves on the way out
            checkpointer.restore_or_initialize(train_state)
            for each step: ...; if checkpointer.after_step(step, train_state, metrics): break
            checkpointer.finish(train_state)

    With `workdir=None` nothing is saved or restored, but NaN losses still stop the run.
    """

    def __init__(self, config: Config, workdir: str | os.PathLike | None,
                 log: Callable[[str], None] = print):
        self.config, self.cfg, self.log = config, config.checkpoint, log
        self.workdir = None if workdir is None else absolute_path(workdir)
        self.stop_signal: int | None = None  # set by SIGTERM / SIGINT
        self.last_saved_step: int | None = None
        self._unchecked: tuple[int, Any] | None = None  # (step, metrics) not yet checked
        self._previous_handlers: dict[int, Any] = {}
        self.manager = None
        if self.workdir is None:
            return
        self.directory = checkpoints_dir(self.workdir)
        self.manager = self._open_manager()

    def _open_manager(self) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocp.checkpoint_managers.LatestN(self.cfg.max_to_keep),
            enable_async_checkpointing=self.cfg.async_save,
            cleanup_tmp_directories=True,  # leftovers of a save that was killed midway
            create=True)
        return ocp.CheckpointManager(self.directory, item_names=ITEMS, options=options)

    # -- restoring -----------------------------------------------------------------------------

    def restore_or_initialize(self, train_state) -> int:
        """Continues from the latest checkpoint in the workdir if there is one, else starts
        from `checkpoint.init_from`'s parameters if set, else keeps the fresh state.

        Updates `train_state.state` in place; returns the step to continue from. Then writes
        the run's config to `<workdir>/config.json` (only once the config fits the checkpoint).
        """
        step = 0
        if self.manager is not None and self.manager.all_steps():
            step = self._resume(train_state)
            if self.cfg.init_from:
                self.log(f"checkpoint.init_from={self.cfg.init_from} ignored: resuming this "
                         f"run's own checkpoint instead.")
        elif self.cfg.init_from:
            self._init_from(train_state)
        if self.workdir is not None and jax.process_index() == 0:
            _write_atomically(self.workdir / "config.json", self.config.to_json())
        return step

    def _resume(self, train_state) -> int:
        targets = None
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                self._check_config(self.directory, step)
                if targets is None:  # only once the config fits
                    model_state, optimizer_state = train_state.state[0], train_state.state[1]
                    targets = dict(model=_abstract(nnx.to_pure_dict(model_state)),
                                   optimizer=_abstract(nnx.to_pure_dict(optimizer_state)))
                restored = _restore_items(self.directory, step, self.manager, **targets)
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
                f"{self.workdir / CORRUPT}. Run again to start from scratch in this workdir.")
        nnx.replace_by_pure_dict(model_state, restored["model"])  # in place
        nnx.replace_by_pure_dict(optimizer_state, restored["optimizer"])
        self.last_saved_step = step
        self.log(f"resumed from {self.directory / str(step)} at step {step}")
        return step

    def _check_config(self, directory: epath.Path, step: int) -> None:
        saved = read_config(directory, step)
        _require_same_architecture(
            saved, self.config, f"the checkpoint {directory / str(step)}",
            f"Run with the checkpoint's values (see {directory.parent / 'config.json'}), or use "
            f"a new --workdir for a new model.")
        changes = other_changes(saved, self.config)
        if changes:
            self.log(f"note: resuming with changed settings (the run will not match an "
                     f"uninterrupted one): {'; '.join(changes)}")

    def _move_aside(self, step: int) -> None:
        if jax.process_index() == 0:
            corrupt = self.workdir / CORRUPT
            corrupt.mkdir(parents=True, exist_ok=True)
            os.replace(self.directory / str(step), corrupt / f"{step}-{int(time.time())}")
        _sync("minids_move_aside")
        self.manager.reload()

    def _init_from(self, train_state) -> None:
        directory, step = resolve(self.cfg.init_from)
        saved = read_config(directory, step)
        _require_same_architecture(saved, self.config, f"checkpoint.init_from={self.cfg.init_from}",
                                   "Set the model fields to the checkpoint's values.")
        model_state = train_state.state[0]
        target = _abstract(nnx.to_pure_dict(model_state))
        restored = _restore_items(directory, step, model=target)
        nnx.replace_by_pure_dict(model_state, restored["model"])  # in place
        self.log(f"initialized the parameters from {directory / str(step)} (step {step}); "
                 f"the optimizer starts fresh at step 0")

    # -- during the loop -----------------------------------------------------------------------

    def after_step(self, step: int, train_state, metrics: dict[str, Any]) -> bool:
        """Call after each train step (`step` counts finished steps). Checks the loss, saves
        when due, and returns True when the run must stop (a signal arrived; already saved).

        The loss of a step is checked one step later, so that waiting for it never leaves the
        accelerator idle; a save first checks the step it saves.
        """
        previous, self._unchecked = self._unchecked, (step, metrics)
        if previous is not None:
            _check_finite(*previous, self.last_saved_step)
        stop = self._stop_requested()
        every = self.cfg.every
        if stop or (every and step % every == 0):
            self.save(step, train_state)
        if stop:
            self._report_stop(step)
        return stop

    def finish(self, train_state) -> None:
        """Checks the last step and saves the final state (call after the loop)."""
        self.save(int(train_state.state[1]["step"][...]), train_state)

    def save(self, step: int, train_state) -> None:
        """Starts an asynchronous save of `train_state` as `step` (after checking its loss).

        Returns once the arrays are copied off the accelerator; the files are written in the
        background while training goes on.
        """
        loss = None
        if self._unchecked is not None:
            loss = _check_finite(*self._unchecked, self.last_saved_step)
            self._unchecked = None
        if self.manager is None or step == self.last_saved_step:
            return
        state = train_state.state
        mesh = jax.tree.leaves(state)[0].sharding.mesh
        meta = dict(step=step, seed=self.config.train.seed, loss=loss,
                    process_count=jax.process_count(), device_count=jax.device_count(),
                    mesh={name: int(size) for name, size in mesh.shape.items()},
                    versions=_library_versions(), time=time.time())
        self.manager.save(step, force=True, args=ocp.args.Composite(
            model=ocp.args.StandardSave(nnx.to_pure_dict(state[0])),
            optimizer=ocp.args.StandardSave(nnx.to_pure_dict(state[1])),
            config=ocp.args.JsonSave(json.loads(self.config.to_json())),
            meta=ocp.args.JsonSave(meta)))
        self.last_saved_step = step

    def wait(self) -> None:
        """Blocks until pending saves are on disk."""
        if self.manager is not None:
            self.manager.wait_until_finished()

    # -- signals -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def guard(self):
        """SIGTERM/SIGINT finish the current step and save instead of killing the run (a second
        one exits at once); pending saves complete before leaving, even on errors."""
        self._previous_handlers = {}
        if threading.current_thread() is threading.main_thread():  # else Python forbids it
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)
        try:
            yield self
        finally:
            for signum, handler in self._previous_handlers.items():
                signal.signal(signum, handler)
            self.wait()

    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is not None:  # asked twice: give up on saving, act as before
            previous = self._previous_handlers.get(signum)
            if callable(previous):  # e.g. Python's SIGINT handler: KeyboardInterrupt
                previous(signum, frame)
                return
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)
            return
        self.stop_signal = signum
        print(f"{name} received: finishing the current step and saving a checkpoint "
              f"(send it again to stop at once, without saving).", file=sys.stderr, flush=True)

    def _stop_requested(self) -> bool:
        stop = self.stop_signal is not None
        if jax.process_count() > 1:  # every process must stop (and save) at the same step
            from jax.experimental import multihost_utils
            stop = bool(np.any(multihost_utils.process_allgather(np.int32(stop))))
            if stop and self.stop_signal is None:
                self.stop_signal = signal.SIGTERM
        return stop

    def _report_stop(self, step: int) -> None:
        self.wait()
        name = signal.Signals(self.stop_signal).name
        where = (f"saved step {step} to {self.directory / str(step)}" if self.manager
                 else "no --workdir was given, so nothing was saved")
        how = "run the same command again with the same --workdir"
        if sys.argv and sys.argv[0].endswith(".py") and "ipykernel" not in sys.argv[0]:
            how += ":\n  " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        self.log(f"stopped by {name} after step {step}: {where}. To resume, {how}")


def _check_finite(step: int, metrics: dict[str, Any], last_saved: int | None) -> float:
    """Returns the step's loss; raises NonFiniteLossError if it or the gradient norm is not
    finite (a finite loss with an infinite gradient already broke the parameters)."""
    loss = float(np.asarray(jax.device_get(metrics["loss"])))
    grad_norm = float(np.asarray(jax.device_get(metrics.get("grad_norm", 0.0))))
    if np.isfinite(loss) and np.isfinite(grad_norm):
        return loss
    kept = (f"the latest checkpoint (step {last_saved}) is intact" if last_saved is not None
            else "no checkpoint was written")
    raise NonFiniteLossError(
        f"the loss became {loss} (gradient norm {grad_norm}) at step {step}; the run stopped "
        f"without saving this state, and {kept}. Lower optim.lr, raise optim.warmup_steps or "
        f"set optim.clip_norm, then resume from the checkpoint.")


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)
