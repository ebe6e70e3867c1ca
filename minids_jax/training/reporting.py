"""Run reports: console progress, metrics.jsonl, TensorBoard events, optional W&B, loss plot.

The training loop calls `Reporter.train(step, metrics)` at each logged step and
`Reporter.eval(step, metrics)` after each evaluation, and `close()` at the end. On an
interactive terminal a tqdm bar shows rate and ETA under the log lines; elsewhere (CI, SLURM,
a pipe) plain lines carry the ETA. Only process 0 writes anything.

Files under the workdir:
  metrics.jsonl   one JSON object per record: {"step", "split": "train"|"eval", "time", ...}
  tensorboard/    event files (tensorBoardX): `tensorboard --logdir <workdir>`
  loss.png        train and eval loss, rewritten at the end (and by `python -m minids_jax.plot`)
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import sys
import time
import warnings
from typing import Any

import jax
import numpy as np

from minids_jax.plot import METRICS_FILE, plot_losses

TENSORBOARD_DIR = "tensorboard"


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


def expert_load_text(load_NxE) -> str:
    """Share of tokens per expert, averaged over layers (min/max when there are many)."""
    load_E = np.asarray(load_NxE).mean(axis=0)
    if len(load_E) <= 8:
        return "/".join(f"{x:.2f}" for x in load_E)
    return f"min {load_E.min():.2f} max {load_E.max():.2f}"


def format_train_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    line = (f"step {step}/{total} | loss {metrics['loss']:.4f} | lr {metrics['lr']:.2e} | "
            f"grad_norm {metrics['grad_norm']:.3f}")
    if np.size(metrics["expert_load"]):  # a model with MoE layers
        line += (f" | balance {metrics['aux_loss']:.3f} | "
                 f"load {expert_load_text(metrics['expert_load'])}")
    if metrics.get("dropped_fraction", 0) > 0:
        line += f" | dropped {metrics['dropped_fraction']:.3f}"
    if "tokens_per_sec" in metrics:
        line += f" | tok/s {metrics['tokens_per_sec']:,.0f}"
        if "tokens_per_sec_per_device" in metrics:
            line += f" ({metrics['tokens_per_sec_per_device']:,.0f}/device)"
        line += f" | {metrics['step_time'] * 1e3:.1f} ms/step"
    if "mfu" in metrics:
        line += f" | mfu {metrics['mfu']:.1%}"
    return line


def scalars(metrics: dict[str, Any]) -> dict[str, float]:
    """Every scalar metric, plus per-expert token shares (averaged over layers) and the
    busiest/idlest expert share of any layer."""
    out = {}
    for name, value in metrics.items():
        value = np.asarray(value)
        if name == "expert_load" and value.size:
            load_E = value.mean(axis=0)
            out.update({f"expert_load/{e}": float(x) for e, x in enumerate(load_E[:64])})
            out["expert_load/max"], out["expert_load/min"] = float(value.max()), float(value.min())
            # Each layer's busiest over its idlest expert: 1 is perfect balance.
            imbalance_N = value.max(axis=-1) / np.maximum(value.min(axis=-1), 1e-9)
            out.update({f"expert_load/imbalance_layer{n}": float(x)
                        for n, x in enumerate(imbalance_N)})
        elif name != "expert_load" and value.size == 1 and np.issubdtype(value.dtype, np.number) and name != "step":
            out[name] = float(value)
    return out


def _jsonable(value):
    value = np.asarray(value)
    return value.item() if value.size == 1 else value.tolist()


def _is_tty(stream) -> bool:
    return hasattr(stream, "isatty") and stream.isatty() and os.environ.get("TERM") != "dumb"


class StepTimer:
    """Tokens/s and time per step over the steps since the last report. Timing starts when the
    first (compiling) step has finished."""

    def __init__(self, tokens_per_step: int, devices: int):
        self.tokens_per_step, self.devices = tokens_per_step, devices
        self.start, self.steps = None, 0

    def tick(self, metrics) -> None:
        if self.start is None:
            jax.block_until_ready(metrics)
            self.start, self.steps = time.perf_counter(), 0
        else:
            self.steps += 1

    def rates(self) -> dict[str, float]:
        """The window's rates (none before a step was timed); starts the next window."""
        if not self.steps:
            return {}
        elapsed = time.perf_counter() - self.start
        tokens_per_sec = self.steps * self.tokens_per_step / elapsed
        rates = {"tokens_per_sec": tokens_per_sec,
                 "tokens_per_sec_per_device": tokens_per_sec / self.devices,
                 "step_time": elapsed / self.steps}
        self.start, self.steps = time.perf_counter(), 0
        return rates


class Reporter:
    """Console, files and trackers for one run; see the module docstring."""

    def __init__(self, workdir: str | None, total_steps: int, start_step: int = 0, *,
                 is_main: bool = True, config_dict: dict | None = None,
                 flops_per_token: float = 0.0, peak_flops: float = 0.0,
                 wandb: bool = False, wandb_project: str = "minids_jax",
                 progress: bool | None = None, stream=None):
        """`flops_per_token * tokens_per_sec / peak_flops` (all devices) gives MFU; 0 skips it.
        `progress`: a tqdm bar (None: only when `stream` is a terminal)."""
        self.total, self.is_main = total_steps, is_main
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.stream = stream or sys.stdout
        self.workdir = pathlib.Path(workdir) if workdir and is_main else None
        self.start_step, self.start_time = start_step, time.perf_counter()
        self.bar = self.tensorboard = self.wandb = self.metrics_file = None
        if not is_main:
            return
        if self.workdir:
            self.workdir.mkdir(parents=True, exist_ok=True)
            self.metrics_file = open(self.workdir / METRICS_FILE, "a", encoding="utf-8")
            from tensorboardX import SummaryWriter
            self.tensorboard = SummaryWriter(str(self.workdir / TENSORBOARD_DIR))
        if wandb:
            self.wandb = _start_wandb(wandb_project, self.workdir, config_dict, self.message)
        if _is_tty(self.stream) if progress is None else progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", file=self.stream,
                            dynamic_ncols=True, smoothing=0.1)

    def message(self, text: str) -> None:
        if not self.is_main:
            return
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        else:
            print(text, file=self.stream, flush=True)

    def eta(self, step: int) -> float:
        done = step - self.start_step
        elapsed = time.perf_counter() - self.start_time
        return elapsed / done * (self.total - step) if done > 0 else float("nan")

    def train(self, step: int, metrics: dict[str, Any]) -> dict[str, Any]:
        """Reports the metrics of a logged step; returns them with `mfu` added."""
        metrics = dict(metrics)
        if self.flops_per_token and self.peak_flops and "tokens_per_sec" in metrics:
            metrics["mfu"] = metrics["tokens_per_sec"] * self.flops_per_token / self.peak_flops
        if not self.is_main:
            return metrics
        line = format_train_line(step, self.total, metrics)
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(f"loss {metrics['loss']:.4f}", refresh=False)
        else:
            line += f" | eta {format_duration(self.eta(step))}"
        self.message(line)
        self._record(step, "train", metrics)
        return metrics

    def eval(self, step: int, metrics: dict[str, Any]) -> None:
        """Reports held-out metrics, e.g. {"eval_loss": ..., "eval_ppl": ...}."""
        if not self.is_main:
            return
        self.message(f"step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        self._record(step, "eval", metrics)

    def _record(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        # Tags "train/loss" and "eval/loss" (not "eval/eval_loss") for the trackers.
        values = {name.removeprefix(f"{split}_"): value for name, value in scalars(metrics).items()}
        if self.metrics_file is not None:
            record = {"step": step, "split": split, "time": time.time(),
                      **{k: _jsonable(v) for k, v in metrics.items() if k != "step"}}
            self.metrics_file.write(json.dumps(record) + "\n")
            self.metrics_file.flush()  # a crash or kill keeps every line written so far
        if self.tensorboard is not None:
            for name, value in values.items():
                self.tensorboard.add_scalar(f"{split}/{name}", value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log({f"{split}/{k}": v for k, v in values.items()}, step=step)

    def close(self, plot: bool = True) -> pathlib.Path | None:
        """Closes the bar and writers; writes the loss plot. Returns its path, if written."""
        path = None
        if self.bar is not None:
            self.bar.close()
        if self.metrics_file is not None:
            self.metrics_file.close()
            if plot:
                try:
                    path = plot_losses(self.workdir)
                    self.message(f"loss plot: {path}")
                except ValueError:  # nothing logged yet (stopped early): no plot to draw
                    pass
                except OSError as error:  # a full disk: say so, without hiding why the run ended
                    self.message(f"WARNING: the loss plot could not be written ({error.strerror})")
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()
        self.bar = self.tensorboard = self.wandb = self.metrics_file = None
        return path


def _start_wandb(project: str, workdir: pathlib.Path | None, config_dict, message):
    try:
        import wandb
    except ImportError:
        warnings.warn("train.wandb=True but the wandb package is not installed; logging to "
                      "metrics.jsonl and TensorBoard only. `pip install wandb` to enable it.")
        return None
    # The run id follows the workdir, so a resumed run continues the same W&B run.
    run_id = None if workdir is None else "".join(
        c if c.isalnum() else "-" for c in str(workdir.resolve()))[-64:].strip("-")
    run = wandb.init(project=project, config=config_dict, id=run_id, resume="allow",
                     dir=str(workdir) if workdir else None,
                     name=workdir.name if workdir else None)
    message(f"wandb: {run.url}")
    return run
