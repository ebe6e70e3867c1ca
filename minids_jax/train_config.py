"""The groups of how a model is trained: `compute` (kernels, precision, memory), `optim` and
`train`. config.py re-exports them with the other groups; the field machinery is
config_schema.py's.
"""

from __future__ import annotations

import dataclasses
import logging

from minids_jax.config_schema import QUIET, Group, check, option
from minids_jax.model_config import DTYPES

ATTENTION_KERNELS = ("auto", "fused", "dot_product_attention", "cudnn")
MOE_DISPATCHES = ("dropless", "ragged", "blocked", "capacity", "dense")
OPTIMIZERS = ("adamw", "adafactor", "lion", "muon")
SCHEDULES = ("linear", "cosine", "wsd")
REMAT_POLICIES = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ComputeConfig(Group):
    """How the model is computed, never what: kernels and precision."""

    NAME = "compute"
    dtype: str = option("float32", "compute dtype; bfloat16 on GPUs", choices=DTYPES)
    attention_kernel: str = option(
        "auto", "auto (fused on CPU; cudnn on GPU in bfloat16/float16; else "
        "dot_product_attention) | fused | dot_product_attention (XLA's) | cudnn (cuDNN's "
        "flash kernel, GPU only)", QUIET, choices=ATTENTION_KERNELS)
    moe_dispatch: str = option(
        "dropless", "dropless (exact: blocked on CPU, ragged elsewhere) | ragged | blocked | "
        "capacity (drops overflow) | dense", choices=MOE_DISPATCHES)
    capacity_factor: float = option(1.25, "expert capacity per sequence, as a multiple of an "
                                    "even share (capacity dispatch only)", above=0)
    scan_layers: bool = option(True, "run each repeating unit of the layers as one lax.scan "
                               "step, so compile time does not grow with depth", QUIET)
    scan_min_repeats: int = option(4, "scan a run of identical units only if it repeats this "
                                   "often: shorter runs compile fast anyway, and step faster "
                                   "as a loop (docs/scale.md)", QUIET, low=2)
    remat: str = option("none", "recompute activations in the backward pass, per block: none "
                        "| full | save_dots (keep matmul outputs, recompute the rest)", QUIET,
                        choices=REMAT_POLICIES)


@dataclasses.dataclass(frozen=True)
class OptimConfig(Group):
    """The optimizer, its learning-rate schedule, clipping and weight decay (optim.py)."""

    NAME = "optim"
    name: str = option("adamw", "adamw | adafactor | lion | muon (matrices; the rest AdamW), "
                       "optax's", choices=OPTIMIZERS)
    lr: float = option(3e-4, "peak learning rate", above=0)
    schedule: str = option("linear", "after the warm-up: linear (the original's) | cosine | "
                           "wsd (warmup-stable-decay: constant, then a linear decay)",
                           choices=SCHEDULES)
    warmup_steps: int = option(100, "linear warm-up steps; clamped to fit a shorter run", low=0)
    total_steps: int = option(1000, "length of the run (the schedule ends there)", QUIET, low=1)
    min_lr_ratio: float = option(0.0, "the schedule ends at lr * min_lr_ratio", low=0, below=1)
    decay_fraction: float = option(0.2, "wsd: the share of the steps after the warm-up that "
                                   "decay", above=0)
    weight_decay: float = option(0.01, "decay of every parameter but norm gains, embeddings, "
                                 "MHLA latents and biases (every optimizer)", low=0)
    b1: float = option(0.9, "first-moment decay (AdamW, Lion); Muon's momentum", low=0,
                       below=1)
    b2: float = option(0.999, "second-moment decay (AdamW, Lion: 0.99 is its usual value)",
                       low=0, below=1)
    eps: float = option(1e-8, "AdamW and Muon epsilon", above=0)
    clip_norm: float = option(1.0, "global gradient-norm clipping; 0 disables", low=0)

    def validate(self):
        check(self.decay_fraction <= 1, f"optim.decay_fraction={self.decay_fraction} must be "
                                        f"<= 1 (the whole run after the warm-up).")
        if self.warmup_steps >= self.total_steps:
            fitted = self.total_steps - 1
            logging.getLogger(__name__).warning(
                "optim.warmup_steps=%d does not fit a run of optim.total_steps=%d: warming up "
                "for %d steps instead.", self.warmup_steps, self.total_steps, fitted)
            object.__setattr__(self, "warmup_steps", fitted)


@dataclasses.dataclass(frozen=True)
class TrainConfig(Group):
    """The batch, the loss's balancing term, logging and evaluation."""

    NAME = "train"
    batch_size: int = option(8, "global: sequences per step over all devices and processes",
                             low=1)
    seed: int = option(42, "initialization and batch order")
    grad_accum_steps: int = option(1, "microbatches per step: the batch is split in this many, "
                                   "their gradients summed before one update (less memory)",
                                   QUIET, low=1)
    aux_loss_coef: float = option(0.01, "weight of the Switch load-balancing loss", low=0)
    sequence_aux_loss_coef: float = option(0.0, "weight of DeepSeek-V3's sequence-wise "
                                           "balance loss (the paper: 1e-4)", low=0)
    mtp_loss_coef: float = option(0.3, "weight of the mean multi-token-prediction loss "
                                  "(with model.mtp_depth > 0)", low=0)
    router_bias_rate: float = option(0.001, "aux-loss-free balancing of sigmoid routers: "
                                     "each step every bias moves this much toward balance; "
                                     "0 freezes them", low=0)
    epochs: float = option(0.0, "jsonl/json: passes over the data; sets optim.total_steps", low=0)
    log_every: int = option(50, "steps between logged lines", QUIET, low=1)
    eval_every: int = option(0, "steps between evaluations; 0: only at the end", QUIET, low=0)
    eval_batches: int = option(4, "held-out batches per evaluation", QUIET, low=1)
    peak_flops: float = option(0.0, "per-device peak FLOP/s for MFU; 0: the data sheet for "
                               "known GPUs in bf16/fp16, else a matmul measurement", QUIET, low=0)
    wandb: bool = option(False, "also log to Weights & Biases (if installed)", QUIET)
    wandb_project: str = option("minids_jax", "W&B project name", QUIET)
