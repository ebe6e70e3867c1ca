"""The train and eval steps, and the plain training loop.

Shapes: B batch, L length, V vocab, N layers, E experts.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from flax.core.spmd import get_logical_axis_rules

from minids_jax import checkpoint
from minids_jax import data as data_lib
from minids_jax import flops, fused, optim, reporting, sharding
from minids_jax.config import Config
from minids_jax.layers import mesh_platform
from minids_jax.model import MiniDeepSeek, count_params


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array):
    """Mean float32 cross-entropy over the weighted positions; logits at t score targets[t].

    `targets` are already the next tokens (see data.py), so no further shift happens here.
    The reference for `model_loss`, which never builds the logits.
    """
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL)
    return jnp.sum(losses_BxL * weights_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0)


def loss_chunk(batch: int, length: int, vocab: int) -> int:
    """Positions per chunk of the fused head + loss. On a CPU, a device's chunk (its share of
    the batch x chunk positions) of at least 256 rows and about 2M logits stays in cache
    (2-core CPU, batch 8, vocab 8192, forward+backward: 117 ms at 256 rows, 127 at 512, 132 at
    128, 156 at 2048); accelerators take the sequence whole."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:  # tracing under the trainer's mesh: the batch is split over devices
        batch = max(1, batch // sharding.ways(mesh, sharding.mesh_axes_of(
            get_logical_axis_rules(), "batch")))
    rows = max(256, (1 << 21) // vocab) if mesh_platform() == "cpu" else 1 << 16
    return max(1, min(length, rows // batch))


def model_loss(model: MiniDeepSeek, batch: dict[str, jax.Array]):
    """`cross_entropy(model(inputs), targets, weights)` and aux, the head fused into the loss."""
    hidden_BxLxD, aux = model.hidden(batch["inputs"])
    weights_BxL = batch["weights"].astype(jnp.float32)
    kernel_DxV = model.head.kernel[...].astype(hidden_BxLxD.dtype)
    loss_sum = fused.head_cross_entropy(hidden_BxLxD, kernel_DxV, batch["targets"],
                                        weights_BxL, loss_chunk(*batch["targets"].shape,
                                                                kernel_DxV.shape[-1]))
    return loss_sum / jnp.maximum(jnp.sum(weights_BxL), 1.0), aux


def loss_and_aux(model: MiniDeepSeek, batch: dict[str, jax.Array]):
    ce, aux = model_loss(model, batch)
    return ce + model.cfg.aux_loss_coef * aux["aux_loss"], (ce, aux)


@dataclasses.dataclass
class TrainState:
    """Everything the step transforms: the model and optimizer, as one split NNX state."""

    graphdef: Any
    state: Any  # nnx.State of (model, optimizer), sharded
    shardings: Any

    def merge(self) -> tuple[MiniDeepSeek, nnx.Optimizer]:
        return nnx.merge(self.graphdef, self.state)


def build_model_and_optimizer(config: Config):
    model = MiniDeepSeek(config.model, rngs=nnx.Rngs(config.train.seed))
    return model, nnx.Optimizer(model, optim.adamw(config.optim), wrt=nnx.Param)


def create_train_state(config: Config, mesh) -> TrainState:
    graphdef, state, shardings = sharding.create_sharded(
        lambda: build_model_and_optimizer(config), mesh, config.mesh.axis_rules)
    return TrainState(graphdef, state, shardings)


def make_train_step(train_state: TrainState, config: Config, batch_sharding):
    graphdef, lr_schedule = train_state.graphdef, optim.schedule(config.optim)

    @sharding.under_mesh(batch_sharding.mesh, config.mesh.axis_rules)
    def train_step(state, batch):
        model, optimizer = nnx.merge(graphdef, state)
        lr = lr_schedule(optimizer.step[...])
        grad_fn = nnx.value_and_grad(loss_and_aux, has_aux=True)
        (loss, (ce, aux)), grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        metrics = {
            "loss": ce, "total_loss": loss, "aux_loss": aux["aux_loss"], "lr": lr,
            "grad_norm": optax.tree.norm(grads),
            "expert_load": aux["expert_load_NxE"], "dropped_fraction": aux["dropped_fraction"],
        }
        # Return the state of everything mutated: model AND optimizer.
        return nnx.state((model, optimizer)), metrics

    return jax.jit(train_step, in_shardings=(train_state.shardings, batch_sharding),
                   out_shardings=(train_state.shardings, None), donate_argnums=0)


def make_eval_step(train_state: TrainState, batch_sharding, axis_rules=None):
    graphdef = train_state.graphdef

    @sharding.under_mesh(batch_sharding.mesh, axis_rules or ())
    def eval_step(state, batch):
        model, _ = nnx.merge(graphdef, state)
        return model_loss(model, batch)[0]

    return jax.jit(eval_step, in_shardings=(train_state.shardings, batch_sharding))


class Trainer:
    """Owns the mesh, data, state and steps of one run."""

    def __init__(self, config: Config, workdir: str | None = None, devices=None):
        self.config, self.workdir = config, workdir
        self.stopped_by: int | None = None  # the signal that stopped training early, if any
        self.mesh = sharding.make_mesh(config.mesh, devices)
        sharding.check_layout(config, self.mesh)
        batch_size = config.train.batch_size
        self.batch_sharding = jax.sharding.NamedSharding(
            self.mesh, sharding.batch_spec(config.mesh.axis_rules))
        self.rows = sharding.process_rows(self.batch_sharding, batch_size)
        self.source = data_lib.make_source(config, workdir)
        self.train_state = create_train_state(config, self.mesh)
        self.train_step = make_train_step(self.train_state, config, self.batch_sharding)
        self.eval_step = make_eval_step(self.train_state, self.batch_sharding,
                                        config.mesh.axis_rules)
        self.is_main = jax.process_index() == 0
        self.reporter: reporting.Reporter | None = None  # made by train()
        self.checkpointer = checkpoint.Checkpointer(config, workdir, log=self.log)

    def log(self, message: str) -> None:
        if self.reporter is not None:  # keeps lines above the progress bar
            self.reporter.message(message)
        elif self.is_main:
            print(message, flush=True)

    def batch(self, step: int, split: str = "train") -> dict[str, jax.Array]:
        local = self.source.batch(step, self.config.train.batch_size, self.rows, split)
        return sharding.place_batch(local, self.batch_sharding, self.config.train.batch_size)

    @property
    def step(self) -> int:
        return int(self.train_state.state[1]["step"][...])

    def evaluate(self) -> float:
        losses = [self.eval_step(self.train_state.state, self.batch(i, "val"))
                  for i in range(self.config.train.eval_batches)]
        return float(np.mean(jax.device_get(losses)))

    def train(self) -> list[dict[str, Any]]:
        """Runs to optim.total_steps, resuming from the workdir's latest checkpoint; returns the
        logged metrics. On SIGTERM/SIGINT it saves and returns early (`self.stopped_by`)."""
        with self.checkpointer.guard():  # pending saves finish even if the loop raises
            self.checkpointer.restore_or_initialize(self.train_state)
            self.reporter = self.make_reporter()  # after the restore: the bar starts there
            try:
                return self._train_loop()
            finally:
                self.reporter.close()

    def _train_loop(self) -> list[dict[str, Any]]:
        cfg = self.config
        total, log_every = cfg.optim.total_steps, cfg.train.log_every
        tokens_per_step = cfg.train.batch_size * cfg.model.max_seq_len
        model, _ = self.train_state.merge()
        self.log(f"model: {count_params(model):,} parameters | devices: {self.mesh.devices.size} "
                 f"in {jax.process_count()} process(es) | mesh: {dict(self.mesh.shape)}")
        history: list[dict[str, Any]] = []
        window_start, window_steps = None, 0
        for step in range(self.step, total):
            self.train_state.state, metrics = self.train_step(self.train_state.state, self.batch(step))
            done = step + 1
            if window_start is None:  # the first step compiles; time from its end
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            else:
                window_steps += 1
            if done % log_every == 0 or done == total:
                metrics = jax.device_get(metrics)
                if window_steps:
                    elapsed = time.perf_counter() - window_start
                    metrics["tokens_per_sec"] = window_steps * tokens_per_step / elapsed
                    metrics["tokens_per_sec_per_device"] = (metrics["tokens_per_sec"]
                                                            / self.mesh.devices.size)
                    metrics["step_time"] = elapsed / window_steps
                    window_start, window_steps = time.perf_counter(), 0
                history.append({"step": done, **self.reporter.train(done, metrics)})
            if cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != total:
                self._log_eval(done, history)
            if self.checkpointer.after_step(done, self.train_state, metrics):
                self.stopped_by = self.checkpointer.stop_signal
                return history
        self.checkpointer.finish(self.train_state)
        self._log_eval(total, history)
        return history

    def _log_eval(self, step: int, history: list[dict[str, Any]]) -> None:
        eval_loss = self.evaluate()
        metrics = {"eval_loss": eval_loss, "eval_ppl": float(np.exp(eval_loss))}
        history.append({"step": step, **metrics})
        self.reporter.eval(step, metrics)

    def make_reporter(self) -> reporting.Reporter:
        """Console, metrics.jsonl, TensorBoard and W&B for this run, with MFU against the
        peak FLOP/s of all devices (train.peak_flops per device, or see flops.py)."""
        cfg = self.config
        peak, source = flops.peak_flops_per_device(cfg.model.dtype, cfg.train.peak_flops,
                                                   self.mesh.devices.flat[0])
        reporter = reporting.Reporter(
            self.workdir, cfg.optim.total_steps, self.step, is_main=self.is_main,
            config_dict=dataclasses.asdict(cfg),
            flops_per_token=flops.train_flops_per_token(cfg.model),
            peak_flops=peak * self.mesh.devices.size, wandb=cfg.train.wandb,
            wandb_project=cfg.train.wandb_project)
        reporter.message(f"mfu against {peak / 1e12:.3g} TFLOP/s per device ({source}); "
                         f"{flops.train_flops_per_token(cfg.model) / 1e6:.1f} MFLOPs per token")
        return reporter


def run(config: Config, workdir: str | None = None) -> list[dict[str, Any]]:
    trainer = Trainer(config, workdir)
    history = trainer.train()
    if trainer.stopped_by is not None:  # saved after SIGTERM/SIGINT: exit as the signal would
        raise SystemExit(128 + trainer.stopped_by)
    return history
