"""The training loop: plain code over the jitted step, with checkpoints, signals and a NaN guard.

The loss of a step is checked one step later, so that waiting for it never leaves the
accelerator idle; a save first checks the step it saves, so no checkpoint holds a state whose
loss or gradient was not finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import shlex
import sys
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx

from minids_jax import sharding
from minids_jax import workdir as workdir_lib
from minids_jax.checkpoint import store as ckpt
from minids_jax.config import Config, ConfigError
from minids_jax.data import pipeline as data_lib
from minids_jax.errors import UserError
from minids_jax.model import MiniDeepSeek, count_params
from minids_jax.training import flops, memory, reporting, steps
from minids_jax.training.checkpointer import Checkpointer
from minids_jax.training.loss import loss_chunk
from minids_jax.training.packing import Packing
from minids_jax.training.preemption import StopGuard
from minids_jax.workdir import WorkdirLock


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss or gradient became NaN or infinite; the run stopped without saving that state."""


def check_finite(step: int, metrics: dict[str, Any], kept: str) -> float:
    """Returns the step's loss; raises NonFiniteLossError if it or the gradient norm is not
    finite (a finite loss with an infinite gradient already broke the parameters). `kept`
    says what the latest checkpoint is known to be."""
    loss = float(np.asarray(jax.device_get(metrics["loss"])))
    grad_norm = float(np.asarray(jax.device_get(metrics.get("grad_norm", 0.0))))
    if np.isfinite(loss) and np.isfinite(grad_norm):
        return loss
    raise NonFiniteLossError(
        f"the loss became {loss} (gradient norm {grad_norm}) at step {step}; the run stopped "
        f"without saving this state, and {kept}. Lower optim.lr, raise optim.warmup_steps or "
        f"set optim.clip_norm, then {'run again' if kept.startswith('no ') else 'resume'}.")


FEW_STEPS = 20  # fewer steps than this rarely move a fine-tune's loss


def steps_for_epochs(config: Config, source, log) -> Config:
    """`config` with optim.total_steps = train.epochs passes over the training rows (examples,
    or packed rows), rounded up to whole steps; says what that makes, and warns when it is too
    short for the loss to move or for its warm-up."""
    rows = getattr(source, "rows", {}).get("train")
    if rows is None:
        raise ConfigError(f"train.epochs={config.train.epochs} counts passes over instruction "
                          f"examples, but data.source={config.data.source!r} has none; set "
                          f"optim.total_steps instead, or use data.source='jsonl' or 'json'.")
    train, optim = config.train, config.optim
    steps = max(1, math.ceil(train.epochs * len(rows) / train.batch_size))
    examples = {split: len(split_examples) for split, split_examples in source.splits.items()}
    log(f"data: {examples['train']} examples to train on ({examples['val']} held out) in "
        f"{len(rows)} rows; train.epochs={train.epochs:g} in batches of {train.batch_size} make "
        f"{steps} steps (optim.total_steps)")
    if steps < FEW_STEPS:
        log(f"warning: {steps} steps are too few for the loss to move much; add examples, raise "
            f"train.epochs or lower train.batch_size")
    warmup = optim.warmup_steps
    if 2 * warmup > steps:
        warmup = min(warmup, steps - 1)
        log(f"warning: the learning-rate warm-up (optim.warmup_steps={optim.warmup_steps}) "
            f"takes {'all' if warmup == steps - 1 else 'most'} of this {steps}-step run"
            f"{f', so it warms up for {warmup} steps' if warmup < optim.warmup_steps else ''} "
            f"and the {optim.schedule} schedule has little room; lower optim.warmup_steps or "
            f"train for more steps")
    return dataclasses.replace(config, optim=dataclasses.replace(
        optim, total_steps=steps, warmup_steps=warmup))


class Trainer:
    """Owns the mesh, data, state and steps of one run."""

    def __init__(self, config: Config, workdir: str | None = None, devices=None):
        self.config, self.workdir = config, workdir
        self.stopped_by: int | None = None  # the signal that stopped training early, if any
        self.lock = hold_workdir(workdir)  # first: refused or unwritable before any compile
        if config.checkpoint.init_from:
            ckpt.resolve(config.checkpoint.init_from)  # a wrong path fails now, not later
        self.mesh = sharding.make_mesh(config.mesh, devices)
        sharding.check_layout(config, self.mesh)
        self.platform = sharding.mesh_platform(self.mesh)  # whose kernels model.build picks
        self.batch_sharding = jax.sharding.NamedSharding(
            self.mesh, sharding.batch_spec(config.mesh.axis_rules))
        self.rows = sharding.process_rows(self.batch_sharding, config.train.batch_size)
        self.source = data_lib.make_source(config, workdir)
        records = getattr(self.source, "records", None)
        if workdir and records and jax.process_index() == 0:
            workdir_lib.write_atomic(pathlib.Path(workdir) / workdir_lib.RECORDS_FILE,
                                     json.dumps(records) + "\n")
        if config.data.source == "random" and jax.process_index() == 0:
            print("data: random tokens (data.source='random', the original's benchmark data): "
                  "the run measures speed, and the model learns nothing; to learn from text or "
                  "instructions, set data.source and data.path (docs/data.md)", flush=True)
        if config.train.epochs:
            config = self.config = steps_for_epochs(
                config, self.source, lambda line: jax.process_index() or print(line, flush=True))
        config = self.config = memory.settle(
            config, self.mesh, lambda line: jax.process_index() or print(line, flush=True))
        # (host arrays where made on the host: placed once, stacked for the step, below)
        self.graphdefs, state, self.shardings = steps.create_train_state(config, self.mesh,
                                                                         place=False)
        model = nnx.merge(self.graphdefs.model, state.model)
        self.parameters = count_params(model)
        self.packing = Packing.of(self.graphdefs, state, config.optim.name, model)
        del model
        shardings = self.step_shardings = self.packing.step_shardings(self.shardings)
        self.state = state
        batch_ways = sharding.ways(self.mesh, sharding.mesh_axes_of(config.mesh.axis_rules,
                                                                    "batch"))
        device_rows = config.train.batch_size // (batch_ways * config.train.grad_accum_steps)
        chunk = loss_chunk(device_rows, config.model.max_seq_len,
                           config.model.vocab_size, self.platform)
        self.train_step = steps.make_train_step(self.graphdefs, self.packing, shardings,
                                                config, self.batch_sharding, chunk)
        self.eval_step = steps.make_eval_step(self.graphdefs, self.packing, shardings,
                                              self.batch_sharding, config.mesh.axis_rules,
                                              chunk)
        self.is_main = jax.process_index() == 0
        self.reporter: reporting.Reporter | None = None  # made by train()
        self.checkpointer = Checkpointer(config, workdir, log=self.log)

    def __enter__(self) -> Trainer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Lets go of the workdir (a later Trainer in this process may take it anyway)."""
        if self.lock is not None:
            self.lock.release()

    def log(self, message: str) -> None:
        if self.reporter is not None:  # keeps lines above the progress bar
            self.reporter.message(message)
        elif self.is_main:
            print(message, flush=True)

    @property
    def state(self) -> steps.TrainState:
        """The model's and optimizer's states, one array per layer, as checkpoints hold them
        (the step keeps scanned layers stacked: `step_state`, training/packing.py)."""
        return steps.TrainState(*self.packing.train_state(self.step_state))

    @state.setter
    def state(self, state: steps.TrainState) -> None:
        self.step_state = jax.device_put(self.packing.step_state(state), self.step_shardings)

    def restore_or_initialize(self) -> int:
        """Restores the workdir's latest checkpoint, or checkpoint.init_from's parameters,
        if any (Checkpointer.restore_or_initialize); returns the step to continue from."""
        if not self.checkpointer.restores():  # no state to read into
            return self.checkpointer.restore_or_initialize(None)
        state = self.state
        step = self.checkpointer.restore_or_initialize(state)  # in place
        # The state from before goes before the restored one is stacked: two copies at most.
        self.step_state = None
        self.state = state
        return step

    def model(self) -> MiniDeepSeek:
        """The model with the current parameters (sharded as in training)."""
        return nnx.merge(self.graphdefs.model, self.state.model)

    def batch(self, step: int, split: str = "train") -> dict[str, jax.Array]:
        local = self.source.batch(step, self.config.train.batch_size, self.rows, split)
        return sharding.place_batch(local, self.batch_sharding, self.config.train.batch_size)

    def evaluate(self) -> float:
        """The held-out cross-entropy per scored token over train.eval_batches batches."""
        sums, tokens = np.sum(jax.device_get(
            [self.eval_step(self.step_state.model, self.batch(i, "val"))
             for i in range(self.config.train.eval_batches)]), axis=0)
        return float(sums / max(tokens, 1.0))

    def train(self, on_second_interrupt: Callable[[], None] | None = None
              ) -> list[dict[str, Any]]:
        """Runs to optim.total_steps, resuming from the workdir's latest checkpoint; returns the
        logged metrics. On SIGTERM/SIGINT it saves and returns early (`self.stopped_by`); a
        second SIGINT calls `on_second_interrupt` if given (preemption.StopGuard)."""
        with StopGuard(on_second_interrupt) as guard, self.checkpointer:  # pending saves finish on any way out
            step = self.restore_or_initialize()
            if step and step == self.config.optim.total_steps:
                self.log(f"the run in {self.workdir} is complete (step {step} = "
                         f"optim.total_steps); raise --config.optim.total_steps to train further.")
                return []
            self.reporter = make_reporter(self.config, self.workdir, self.mesh, step)
            try:
                return self._loop(guard)
            finally:
                self.reporter.close()

    def _loop(self, guard: StopGuard) -> list[dict[str, Any]]:
        cfg, checkpointer = self.config, self.checkpointer
        total, log_every = cfg.optim.total_steps, cfg.train.log_every
        self.log(f"model: {self.parameters:,} parameters | devices: "
                 f"{self.mesh.devices.size} in {jax.process_count()} process(es) | mesh: "
                 f"{dict(self.mesh.shape)}")
        history: list[dict[str, Any]] = []
        timer = reporting.StepTimer(cfg.train.batch_size * cfg.model.max_seq_len,
                                    self.mesh.devices.size)
        unchecked = None  # (step, metrics) whose loss is not checked yet
        for step in range(int(self.step_state.step), total):
            self.step_state, metrics = self.train_step(self.step_state, self.batch(step))
            done = step + 1
            timer.tick(metrics)
            if done % log_every == 0 or done == total:
                metrics = {**jax.device_get(metrics), **timer.rates()}
                history.append({"step": done, **self.reporter.train(done, metrics)})
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total:
                self._log_eval(done, history)
            if unchecked is not None:
                check_finite(*unchecked, checkpointer.latest_description())
            checkpointer.poll()  # a failed background save stops the run here
            unchecked = (done, metrics)
            stop = guard.requested()
            if stop or done == total or (cfg.checkpoint.every and done % cfg.checkpoint.every == 0):
                loss = check_finite(*unchecked, checkpointer.latest_description())
                unchecked = None
                if checkpointer.saves(done):  # (the state per layer is a copy)
                    checkpointer.save(done, self.state, loss)
            if stop:
                self.stopped_by = guard.signal
                self._report_stop(guard.name, done)
                return history
        self._log_eval(total, history)
        return history

    def _log_eval(self, step: int, history: list[dict[str, Any]]) -> None:
        eval_loss = self.evaluate()
        metrics = {"eval_loss": eval_loss, "eval_ppl": float(np.exp(eval_loss))}
        history.append({"step": step, **metrics})
        self.reporter.eval(step, metrics)

    def _report_stop(self, signal_name: str, step: int) -> None:
        self.checkpointer.wait()
        where = (f"saved step {step} to {self.checkpointer.step_dir(step)}"
                 if self.checkpointer.manager else "no --workdir was given, so nothing was saved")
        how = "run the same command again with the same --workdir"
        if sys.argv and sys.argv[0].endswith(".py") and "ipykernel" not in sys.argv[0]:
            how += ":\n  " + " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
        self.log(f"stopped by {signal_name} after step {step}: {where}. To resume, {how}")


def make_reporter(cfg: Config, workdir, mesh, start_step: int) -> reporting.Reporter:
    """Console, metrics.jsonl, TensorBoard and W&B for a run, with MFU against the peak
    FLOP/s of all devices (train.peak_flops per device, or see flops.py)."""
    peak, source = flops.peak_flops_per_device(cfg.compute.dtype, cfg.train.peak_flops,
                                               mesh.devices.flat[0])
    flops_per_token = flops.train_flops_per_token(cfg.model, frozen_base=cfg.lora.rank > 0)
    reporter = reporting.Reporter(
        workdir, cfg.optim.total_steps, start_step, is_main=jax.process_index() == 0,
        config_dict=dataclasses.asdict(cfg), flops_per_token=flops_per_token,
        peak_flops=peak * mesh.devices.size, wandb=cfg.train.wandb,
        wandb_project=cfg.train.wandb_project)
    reporter.message(f"mfu against {peak / 1e12:.3g} TFLOP/s per device ({source}); "
                     f"{flops_per_token / 1e6:.1f} MFLOPs per token")
    return reporter


def hold_workdir(workdir) -> WorkdirLock | None:
    """Checks that `workdir` is a writable directory and locks it for this run (process 0
    locks for the whole job; every process fails if it cannot)."""
    if workdir is None or workdir_lib.is_remote(workdir):
        return None
    lock, error = None, None
    if jax.process_index() == 0:
        try:
            lock = WorkdirLock(workdir_lib.writable_directory(workdir))
            lock.acquire()
        except UserError as caught:
            error = caught
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        failed = multihost_utils.broadcast_one_to_all(np.int32(error is not None))
        if failed and error is None:
            error = workdir_lib.WorkdirError(f"process 0 could not take the workdir {workdir}; "
                                             f"see its error.")
    if error is not None:
        raise error
    return lock


def run(config: Config, workdir: str | None = None,
        on_second_interrupt: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    with Trainer(config, workdir) as trainer:
        history = trainer.train(on_second_interrupt)
    if trainer.stopped_by is not None:  # saved after SIGTERM/SIGINT: exit as the signal would
        raise SystemExit(128 + trainer.stopped_by)
    return history
