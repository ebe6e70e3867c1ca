"""Typed, validated configuration.

The `configs/*.py` files build an `ml_collections.ConfigDict` (so any field can be overridden
from the command line); `from_config_dict` turns it into the frozen dataclasses below exactly
once. Modules receive dataclasses, never the ConfigDict. Every check lives here, and every
error says which field is wrong and how to fix it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

ATTENTION_KINDS = ("mha", "mhla")
ATTENTION_KERNELS = ("auto", "fused", "dot_product_attention")
MOE_DISPATCHES = ("dropless", "ragged", "blocked", "capacity", "dense")
DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 32000
    max_seq_len: int = 1024
    d_model: int = 1024
    n_layers: int = 6
    n_heads: int = 16
    latent_k: int = 64  # learned latents of the MHLA layers
    mlp_mult: int = 4  # expert hidden width = mlp_mult * d_model
    n_experts: int = 2
    top_k: int = 1  # experts per token
    attn_pattern: tuple[str, ...] = ("mha", "mhla")  # layer i uses attn_pattern[i % len]
    aux_loss_coef: float = 0.01  # Switch load-balancing loss weight
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    # auto (fused on CPU, dot_product_attention on GPU/TPU) | fused (minids_jax/fused.py) |
    # dot_product_attention (jax.nn.dot_product_attention: cuDNN's flash kernel on GPU)
    attention_kernel: str = "auto"
    # dropless (exact: ragged on GPU/TPU, blocked on CPU) | ragged | blocked | capacity | dense
    moe_dispatch: str = "dropless"
    capacity_factor: float = 1.25  # only for moe_dispatch="capacity"

    def __post_init__(self):
        object.__setattr__(self, "attn_pattern", tuple(self.attn_pattern))
        for name in ("vocab_size", "max_seq_len", "d_model", "n_layers", "n_heads", "latent_k",
                     "mlp_mult", "n_experts", "top_k"):
            value = getattr(self, name)
            _check(isinstance(value, int) and value > 0,
                   f"model.{name} must be a positive integer, got {value!r}.")
        _check(self.d_model % self.n_heads == 0,
               f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
               f"choose n_heads among the divisors of d_model.")
        _check(self.head_dim % 2 == 0,
               f"head dim d_model/n_heads = {self.head_dim} must be even for rotary embeddings; "
               f"change model.d_model or model.n_heads.")
        _check(self.top_k <= self.n_experts,
               f"model.top_k={self.top_k} exceeds model.n_experts={self.n_experts}; "
               f"set top_k <= n_experts.")
        _check(len(self.attn_pattern) > 0, "model.attn_pattern is empty; use e.g. ('mha', 'mhla').")
        for kind in self.attn_pattern:
            _check(kind in ATTENTION_KINDS,
                   f"model.attn_pattern has unknown attention kind {kind!r}; "
                   f"choose from {ATTENTION_KINDS}.")
        if "mhla" in self.attn_pattern:
            _check(self.max_seq_len % self.latent_k == 0,
                   f"model.max_seq_len={self.max_seq_len} is not divisible by "
                   f"model.latent_k={self.latent_k}: each latent summarizes an equal segment; "
                   f"choose latent_k among the divisors of max_seq_len.")
        _check(self.attention_kernel in ATTENTION_KERNELS,
               f"model.attention_kernel={self.attention_kernel!r} is unknown; "
               f"choose from {ATTENTION_KERNELS}.")
        _check(self.moe_dispatch in MOE_DISPATCHES,
               f"model.moe_dispatch={self.moe_dispatch!r} is unknown; choose from {MOE_DISPATCHES}.")
        _check(self.capacity_factor > 0,
               f"model.capacity_factor must be > 0, got {self.capacity_factor}.")
        for name in ("dtype", "param_dtype"):
            _check(getattr(self, name) in DTYPES,
                   f"model.{name}={getattr(self, name)!r} is unknown; choose from {DTYPES}.")
        _check(self.aux_loss_coef >= 0, f"model.aux_loss_coef must be >= 0, got {self.aux_loss_coef}.")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_dim(self) -> int:
        return self.mlp_mult * self.d_model

    def attention_kind(self, layer: int) -> str:
        return self.attn_pattern[layer % len(self.attn_pattern)]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    lr: float = 3e-4  # peak learning rate
    warmup_steps: int = 100
    total_steps: int = 1000  # also the length of the run
    weight_decay: float = 0.01  # AdamW, not applied to norms, biases, embeddings
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # global gradient-norm clipping; 0 disables

    def __post_init__(self):
        _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}.")
        _check(self.total_steps > 0, f"optim.total_steps must be > 0, got {self.total_steps}.")
        _check(0 <= self.warmup_steps < self.total_steps,
               f"optim.warmup_steps={self.warmup_steps} must be in [0, optim.total_steps="
               f"{self.total_steps}).")
        _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1, "optim.b1 and optim.b2 must be in [0, 1).")
        _check(self.clip_norm >= 0, f"optim.clip_norm must be >= 0, got {self.clip_norm}.")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 8  # global: sequences per step over all devices and processes
    seed: int = 42
    log_every: int = 50
    eval_every: int = 0  # 0: evaluate only at the end
    eval_batches: int = 4
    # Per-device peak FLOP/s that MFU is measured against; 0: the data sheet for known GPUs
    # computing in bf16/fp16, else a quick matmul measurement (see flops.py).
    peak_flops: float = 0.0
    wandb: bool = False  # also log to Weights & Biases (when the wandb package is installed)
    wandb_project: str = "minids_jax"

    def __post_init__(self):
        for name in ("batch_size", "log_every", "eval_batches"):
            _check(getattr(self, name) > 0, f"train.{name} must be > 0, got {getattr(self, name)}.")
        _check(self.eval_every >= 0, f"train.eval_every must be >= 0, got {self.eval_every}.")
        _check(self.peak_flops >= 0,
               f"train.peak_flops must be >= 0 (0: look up or measure), got {self.peak_flops}.")
        _check(isinstance(self.wandb, bool), f"train.wandb must be True or False, got "
               f"{self.wandb!r}.")


DATA_SOURCES = ("random", "builtin", "text", "jsonl", "json", "tokens")
TOKENIZERS = ("byte", "bpe")
_SOURCES_WITH_PATH = ("text", "jsonl", "json", "tokens")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    source: str = "random"  # random | builtin | text | jsonl | json | tokens
    path: str = ""  # text: file, dir or glob; jsonl/json: instruction file; tokens: .bin or dir
    tokenizer: str = "byte"  # byte | bpe (trained on the corpus, model.vocab_size tokens)
    val_fraction: float = 0.02  # held-out tail of a text/.bin corpus, or share of examples
    max_bytes: int = 0  # builtin/text: read at most this many bytes of the corpus (0: all)
    pack: bool = False  # jsonl/json: pack several examples per row instead of one padded
    overlong: str = "truncate"  # jsonl/json examples over max_seq_len+1 tokens: truncate | drop
    token_dtype: str = "auto"  # tokens: uint16 | uint32 | auto (meta.json, else uint16)
    bpe_train_bytes: int = 0  # bpe: train on at most this many characters of the corpus (0: all)
    cache_dir: str = "~/.cache/minids_jax"  # tokenized corpora, trained tokenizers; "" disables

    def __post_init__(self):
        _check(self.source in DATA_SOURCES,
               f"data.source={self.source!r} is unknown; choose from {DATA_SOURCES}.")
        _check(self.tokenizer in TOKENIZERS,
               f"data.tokenizer={self.tokenizer!r} is unknown; choose from {TOKENIZERS}.")
        if self.source in _SOURCES_WITH_PATH:
            _check(bool(self.path), f"data.source={self.source!r} reads data.path, which is empty; "
                                    f"set --config.data.path=... to your data.")
        else:
            _check(not self.path, f"data.path={self.path!r} is set but data.source={self.source!r} "
                                  f"does not read it; set data.source to 'text', 'jsonl', 'json' "
                                  f"or 'tokens', or clear data.path.")
        _check(not (self.source == "random" and self.tokenizer == "bpe"),
               "data.tokenizer='bpe' is trained on the corpus, and data.source='random' has none; "
               "use data.tokenizer='byte' or a text source.")
        _check(0 < self.val_fraction < 0.5,
               f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}.")
        _check(self.overlong in ("truncate", "drop"),
               f"data.overlong={self.overlong!r} is unknown; choose 'truncate' or 'drop'.")
        _check(self.token_dtype in ("auto", "uint16", "uint32"),
               f"data.token_dtype={self.token_dtype!r} is unknown; choose 'auto', 'uint16' or "
               f"'uint32'.")
        for name in ("max_bytes", "bpe_train_bytes"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 0,
                   f"data.{name} must be an integer >= 0, got {getattr(self, name)!r}.")


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
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    # Device mesh axis sizes; -1 takes the remaining devices. Product must equal device count.
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1
    axis_rules: tuple = DEFAULT_AXIS_RULES  # logical axis name -> mesh axis (or axes, or None)

    def __post_init__(self):
        rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                      for name, axes in self.axis_rules)
        object.__setattr__(self, "axis_rules", rules)
        sizes = self.axis_sizes()
        for name, size in sizes.items():
            _check(size == -1 or (isinstance(size, int) and size > 0),
                   f"mesh.{name}={size!r} must be a positive integer or -1 (the rest).")
        _check(list(sizes.values()).count(-1) <= 1,
               f"at most one mesh axis may be -1, got {sizes}.")

    def axis_sizes(self) -> dict[str, int]:
        return {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor, "expert": self.expert}


DISTRIBUTED_MODES = ("auto", "on", "off")


@dataclasses.dataclass(frozen=True)
class DevicesConfig:
    # GPUs this process drives: the N with the most free memory (pynvml); 0 = every visible
    # device. An explicit CUDA_VISIBLE_DEVICES in the environment wins over this choice.
    num_gpus: int = 0
    # jax.distributed start-up. auto: when the environment describes a multi-process job
    # (SLURM, Open MPI, Kubernetes, JAX_COORDINATOR_ADDRESS) or coordinator_address is set;
    # on: always (JAX auto-detects the cluster); off: never (single process).
    distributed: str = "auto"
    coordinator_address: str = ""  # "host:port" of process 0; "" = from the environment
    num_processes: int = 0  # 0 = from the environment
    process_id: int = -1  # -1 = from the environment
    init_timeout_s: int = 300  # how long processes wait for each other at start-up
    # Keep freed host memory for reuse (glibc malloc settings, devices.reuse_host_memory):
    # CPU steps stop page-faulting their working memory in again every step.
    reuse_host_memory: bool = True

    def __post_init__(self):
        _check(isinstance(self.num_gpus, int) and self.num_gpus >= 0,
               f"devices.num_gpus must be an integer >= 0 (0 = every visible device), "
               f"got {self.num_gpus!r}.")
        _check(self.distributed in DISTRIBUTED_MODES,
               f"devices.distributed={self.distributed!r} is unknown; choose from "
               f"{DISTRIBUTED_MODES}.")
        _check(not self.coordinator_address or ":" in self.coordinator_address,
               f"devices.coordinator_address={self.coordinator_address!r} needs a port, "
               f"e.g. '10.0.0.1:1234'.")
        _check(self.num_processes >= 0,
               f"devices.num_processes must be >= 0 (0 = from the environment), "
               f"got {self.num_processes}.")
        _check(self.process_id >= -1,
               f"devices.process_id must be >= 0, or -1 for the environment's, "
               f"got {self.process_id}.")
        if self.num_processes and self.process_id >= 0:
            _check(self.process_id < self.num_processes,
                   f"devices.process_id={self.process_id} must be < devices.num_processes="
                   f"{self.num_processes}.")
        _check(self.init_timeout_s > 0,
               f"devices.init_timeout_s must be > 0, got {self.init_timeout_s}.")
        _check(isinstance(self.reuse_host_memory, bool),
               f"devices.reuse_host_memory must be True or False, "
               f"got {self.reuse_host_memory!r}.")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # save every N steps (and always at the end); 0: only at the end
    max_to_keep: int = 3  # older checkpoints are deleted
    async_save: bool = True  # write files in the background while training continues
    init_from: str = ""  # a workdir or step directory: start from its parameters, fresh optimizer
    fallback: bool = False  # resume from the previous checkpoint if the latest is unreadable

    def __post_init__(self):
        _check(isinstance(self.every, int) and self.every >= 0,
               f"checkpoint.every must be an integer >= 0 (0 saves only at the end), "
               f"got {self.every!r}.")
        _check(isinstance(self.max_to_keep, int) and self.max_to_keep >= 1,
               f"checkpoint.max_to_keep must be an integer >= 1, got {self.max_to_keep!r}; "
               f"resuming needs at least the latest checkpoint.")
        _check(isinstance(self.init_from, str),
               f"checkpoint.init_from must be a path string ('' for none), got "
               f"{self.init_from!r}.")


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig
    optim: OptimConfig
    train: TrainConfig
    data: DataConfig
    mesh: MeshConfig
    checkpoint: CheckpointConfig
    devices: DevicesConfig = DevicesConfig()

    def __post_init__(self):
        # Tokenizers need their 256 byte symbols plus PAD, BOS and EOS (see tokenization.py).
        min_vocab = 259
        _check(self.data.source == "random" or self.model.vocab_size >= min_vocab,
               f"model.vocab_size={self.model.vocab_size} is smaller than the {min_vocab} tokens "
               f"the {self.data.tokenizer} tokenizer needs (256 bytes + PAD, BOS, EOS); set "
               f"model.vocab_size >= {min_vocab}.")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


_GROUPS = {
    "model": ModelConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "data": DataConfig,
    "mesh": MeshConfig,
    "checkpoint": CheckpointConfig,
    "devices": DevicesConfig,
}


def _build_group(group: str, cls: type, values: Mapping[str, Any]):
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    _check(not unknown,
           f"unknown field(s) {', '.join(f'{group}.{u}' for u in unknown)}; "
           f"known fields of {group!r}: {', '.join(sorted(known))}.")
    try:
        return cls(**values)
    except TypeError as error:  # e.g. a string where a number belongs
        raise ConfigError(f"bad value in config group {group!r}: {error}") from error


def from_config_dict(config: Mapping[str, Any]) -> Config:
    """Converts a (possibly nested) mapping such as a ConfigDict into a validated `Config`."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(as_dict) - set(_GROUPS))
    _check(not unknown, f"unknown config group(s) {unknown}; known groups: {sorted(_GROUPS)}.")
    groups = {name: _build_group(name, cls, as_dict.get(name, {})) for name, cls in _GROUPS.items()}
    return Config(**groups)


def from_json(text: str) -> Config:
    return from_config_dict(json.loads(text))
