"""The groups of a run, all but the architecture's: `compute` (kernels, precision, memory),
`optim`, `train`, `data`, `mesh`, `devices` and `checkpoint`.
"""

from __future__ import annotations

import dataclasses
import logging
import re

from minids_jax.config.fields import QUIET, Group, check, option
from minids_jax.config.model import DTYPES

ATTENTION_KERNELS = ("auto", "fused", "dot_product_attention", "cudnn")
MOE_DISPATCHES = ("dropless", "ragged", "blocked", "capacity", "dense")
OPTIMIZERS = ("adamw", "adafactor", "lion", "muon")
SCHEDULES = ("linear", "cosine", "wsd")
REMAT_POLICIES = ("none", "full", "save_dots")
AUTO = "auto"  # compute.remat, devices.memory: chosen by the memory plan (training/memory.py)


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
    scan_min_repeats: int = option(0, "scan a run of identical units only if it repeats this "
                                   "often: shorter runs compile fast anyway, and step faster "
                                   "as a loop; 0: 8 on a CPU, 4 elsewhere (docs/scale.md)",
                                   QUIET, low=0)
    remat: str = option("none", "recompute activations in the backward pass, per block: none "
                        "| full | save_dots (keep matmul outputs, recompute the rest) | auto "
                        "(none if the memory plan fits devices.memory, else full, or "
                        "scan_layers off, as fits)", QUIET,
                        choices=(*REMAT_POLICIES, AUTO))


@dataclasses.dataclass(frozen=True)
class OptimConfig(Group):
    """The optimizer, its learning-rate schedule, clipping and weight decay (training/optim.py)."""

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
                                   "their gradients summed before one update (less memory); "
                                   "0: the fewest with which the memory plan fits "
                                   "devices.memory", QUIET, low=0)
    aux_loss_coef: float = option(0.01, "weight of each MoE layer's Switch load-balancing loss "
                                  "(the layers' losses are summed, as DeepSeek's code does)",
                                  low=0)
    sequence_aux_loss_coef: float = option(0.0, "weight of each MoE layer's DeepSeek-V3 "
                                           "sequence-wise balance loss, summed over the layers "
                                           "(the paper's alpha: 1e-4)", low=0)
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


DATA_SOURCES = ("random", "builtin", "text", "jsonl", "json", "tokens")
SOURCES_WITH_PATH = ("text", "jsonl", "json", "tokens")
MIN_TEXT_VOCAB = 259  # the tokenizers' 256 byte symbols plus PAD, BOS and EOS

@dataclasses.dataclass(frozen=True)
class DataConfig(Group):
    """Where tokens come from and how text becomes tokens (see data/pipeline.py)."""

    NAME = "data"
    source: str = option("random", "random | builtin | text | jsonl | json | tokens",
                         choices=DATA_SOURCES)
    path: str = option("", "text: file, dir or glob; jsonl/json: instruction file; tokens: "
                       ".bin file or dir")
    tokenizer: str = option("byte", "byte | bpe (trained on the corpus) | hf (an imported "
                            "model's: the workdir's or init_from's)", choices=("byte", "bpe", "hf"))
    val_fraction: float = option(0.02, "held-out tail of a corpus, or share of examples",
                                 above=0, below=0.5)
    max_bytes: int = option(0, "builtin/text: read at most this many bytes (0: all)", low=0)
    pack: bool = option(False, "jsonl/json: pack several examples per row instead of one padded")
    doc_mask: bool = option(False, "attention and multi-token prediction stay inside each "
                            "document (text: EOS-separated; packed jsonl/json: each example) "
                            "of a window, positions restarting per document")
    overlong: str = option("truncate", "jsonl/json examples over max_seq_len+1 tokens: "
                           "truncate | drop", choices=("truncate", "drop"))
    token_dtype: str = option("auto", "tokens: uint16 | uint32 | auto (meta.json, else uint16)",
                              choices=("auto", "uint16", "uint32"))
    bpe_train_bytes: int = option(0, "bpe: train on at most this many characters (0: all)",
                                  low=0)
    cache_dir: str = option("~/.cache/minids_jax", "tokenized corpora and trained tokenizers; "
                            "'' disables", QUIET)

    def validate(self):
        if self.source in SOURCES_WITH_PATH:
            check(bool(self.path), f"data.source={self.source!r} reads data.path, which is "
                                   f"empty; set --config.data.path=... to your data.")
        else:
            check(not self.path, f"data.path={self.path!r} is set but data.source="
                                 f"{self.source!r} does not read it; set data.source to 'text', "
                                 f"'jsonl', 'json' or 'tokens', or clear data.path.")
        check(not (self.source == "random" and self.tokenizer == "bpe"),
              "data.tokenizer='bpe' is trained on the corpus, and data.source='random' has "
              "none; use data.tokenizer='byte' or a text source.")
        check(not (self.doc_mask and self.source == "random"),
              "data.doc_mask=True needs documents, and data.source='random' has none; use a "
              "text, tokens or packed jsonl/json source, or leave data.doc_mask off.")


# Logical parameter/activation axis -> mesh axes. Data parallel, FSDP, tensor and expert
# parallelism are then only a matter of the mesh sizes.
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp", "expert")),  # the global batch is split over all but `tensor`
    ("embed", "fsdp"),  # FSDP (ZeRO-3): weights and their optimizer moments split on D
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("expert", "expert"),
    ("norm", None),
    ("lora", "fsdp"),  # MLA's latent rank, the input side of its up-projections
)


def parse_size(text: str, name: str) -> float:
    """'24GB', '80GiB', '512MB', '1.5e9' -> bytes; a ConfigError naming `name` otherwise."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    check(match is not None and match.group(1).count(".") <= 1,
          f"{name}={text!r} is not a size; write it like 24GB or 80GiB.")
    unit = (match.group(2) or "B").upper().rstrip("B")
    power = " KMGT".index(unit[0]) if unit else 0
    return float(match.group(1)) * (1024 if unit.endswith("I") else 1000) ** power


def as_axes(axes) -> tuple[str, ...]:
    """The mesh axes of an axis rule's target or a PartitionSpec entry (None, one mesh axis or
    several) as a tuple."""
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


@dataclasses.dataclass(frozen=True)
class MeshConfig(Group):
    """Device mesh axis sizes; -1 takes the remaining devices. Product: the device count."""

    NAME = "mesh"
    data: int = option(-1, "data parallel", QUIET, low=-1)
    fsdp: int = option(1, "parameters and optimizer state split (ZeRO-3)", QUIET, low=-1)
    tensor: int = option(1, "heads, hidden and vocab split", QUIET, low=-1)
    expert: int = option(1, "experts split", QUIET, low=-1)
    axis_rules: tuple = option(DEFAULT_AXIS_RULES, "logical axis -> mesh axis (or axes, or "
                               "None)", QUIET)

    def validate(self):
        object.__setattr__(self, "axis_rules", tuple(
            (name, tuple(axes) if isinstance(axes, list) else axes)
            for name, axes in self.axis_rules))
        sizes = self.axis_sizes()
        for name, size in sizes.items():
            check(size != 0, f"mesh.{name}=0 must be a positive integer or -1 (the rest).")
        check(list(sizes.values()).count(-1) <= 1,
              f"at most one mesh axis may be -1, got {sizes}.")

    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "expert": self.expert}


@dataclasses.dataclass(frozen=True)
class DevicesConfig(Group):
    """Process start-up (startup.py), before JAX starts a backend."""

    NAME = "devices"
    num_gpus: int = option(0, "the N GPUs with the most free memory; 0: every visible one "
                           "(an explicit CUDA_VISIBLE_DEVICES wins)", QUIET, low=0)
    distributed: str = option("auto", "jax.distributed: auto (a SLURM/MPI/K8s job or a "
                              "coordinator_address) | on | off", QUIET,
                              choices=("auto", "on", "off"))
    coordinator_address: str = option("", "'host:port' of process 0; '': from the environment",
                                      QUIET)
    num_processes: int = option(0, "0: from the environment", QUIET, low=0)
    process_id: int = option(-1, "-1: from the environment", QUIET, low=-1)
    init_timeout_s: int = option(300, "seconds the processes wait for each other at start-up",
                                 QUIET, low=1)
    host_huge_pages: bool = option(True, "back large host allocations with transparent huge "
                                   "pages (glibc's malloc tunable, train.py re-executing itself "
                                   "once to set it), so CPU steps fault their memory in 512 "
                                   "times fewer pages", QUIET)
    compile_cache: str = option(AUTO, "directory that keeps XLA's compiled programs for later "
                                "runs of the same ones (a resumed run, a rerun): auto "
                                "(JAX_COMPILATION_CACHE_DIR if set, else $XDG_CACHE_HOME or "
                                "~/.cache, then minids_jax/xla), off, or a path", QUIET)
    memory: str = option(AUTO, "each device's memory, which a run's memory plan must fit "
                         "before it compiles (training/memory.py): a size (24GB, 80GiB), auto "
                         "(a GPU's own; on a CPU this machine's RAM, and only for compute.remat"
                         "=auto or train.grad_accum_steps=0) or off", QUIET)

    def validate(self):
        if self.memory not in (AUTO, "off"):
            parse_size(self.memory, "devices.memory")
        check(not self.coordinator_address or ":" in self.coordinator_address,
              f"devices.coordinator_address={self.coordinator_address!r} needs a port, "
              f"e.g. '10.0.0.1:1234'.")
        check(not (self.num_processes and self.process_id >= self.num_processes),
              f"devices.process_id={self.process_id} must be < devices.num_processes="
              f"{self.num_processes}.")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig(Group):
    """Saving, resuming and starting from another run's parameters."""

    NAME = "checkpoint"
    every: int = option(100, "save every N steps (and always at the end); 0: only at the end",
                        QUIET, low=0)
    max_to_keep: int = option(3, "older checkpoints are deleted; resuming needs the latest",
                              QUIET, low=1)
    async_save: bool = option(True, "write files in the background while training goes on",
                              QUIET)
    init_from: str = option("", "a workdir or step directory: start from its parameters with "
                            "a fresh optimizer", QUIET)
    fallback: bool = option(False, "resume from the previous checkpoint if the latest is "
                            "unreadable", QUIET)
