"""Typed, validated configuration: the one source of every field's default, doc and resume policy.

The `configs/*.py` files build an `ml_collections.ConfigDict` from these defaults (so any field
can be overridden from the command line); `from_config_dict` turns it into the frozen
dataclasses below exactly once, and modules receive dataclasses, never the ConfigDict. Each
field declares, in its metadata, a one-line doc, its checks and what a change on resume means:
  architecture  the parameters' shapes or the function they compute: must match the checkpoint
  noted         changes the run's course (it will not match an uninterrupted one): logged
  quiet         bookkeeping (logging, mesh, more steps): changed silently
`python -m minids_jax.config` prints the reference (docs/configuration.md). The field machinery
is config_schema.py's, the `model` and `lora` groups model_config.py's, `compute`, `optim`
and `train` train_config.py's (all re-exported here).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from typing import Any, Mapping

from minids_jax import config_schema
from minids_jax.config_schema import (  # noqa: F401  (re-exported: config.check, ...)
    ARCHITECTURE, NOTED, QUIET, ConfigError, Group, check, option)
from minids_jax.model_config import (  # noqa: F401
    ATTENTION_KINDS, DTYPES, ROUTER_SCORINGS, LoRAConfig, ModelConfig)
from minids_jax.train_config import (  # noqa: F401
    ATTENTION_KERNELS, MOE_DISPATCHES, OPTIMIZERS, SCHEDULES, ComputeConfig, OptimConfig,
    TrainConfig)

DATA_SOURCES = ("random", "builtin", "text", "jsonl", "json", "tokens")
SOURCES_WITH_PATH = ("text", "jsonl", "json", "tokens")
MIN_TEXT_VOCAB = 259  # the tokenizers' 256 byte symbols plus PAD, BOS and EOS
# Fields an older version kept elsewhere: read from old checkpoints, named in errors.
MOVED = {"model.dtype": "compute.dtype", "model.attention_kernel": "compute.attention_kernel",
         "model.moe_dispatch": "compute.moe_dispatch",
         "model.capacity_factor": "compute.capacity_factor",
         "model.aux_loss_coef": "train.aux_loss_coef"}


@dataclasses.dataclass(frozen=True)
class DataConfig(Group):
    """Where tokens come from and how text becomes tokens (see data.py)."""

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
    reuse_host_memory: bool = option(True, "keep freed host memory mapped, so CPU steps do "
                                     "not page-fault their memory in again", QUIET)

    def validate(self):
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


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    lora: LoRAConfig = dataclasses.field(default_factory=LoRAConfig)
    compute: ComputeConfig = dataclasses.field(default_factory=ComputeConfig)
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)
    devices: DevicesConfig = dataclasses.field(default_factory=DevicesConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)

    def __post_init__(self):
        text = self.data.source != "random" and self.data.tokenizer != "hf"  # hf: its own
        check(not text or self.model.vocab_size >= MIN_TEXT_VOCAB,
              f"model.vocab_size={self.model.vocab_size} is smaller than the {MIN_TEXT_VOCAB} "
              f"tokens the {self.data.tokenizer} tokenizer needs (256 bytes + PAD, BOS, EOS); "
              f"set model.vocab_size >= {MIN_TEXT_VOCAB}.")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)


GROUPS = {field.name: field.default_factory for field in dataclasses.fields(Config)}


def default_config_dict():
    """Every default as an ml_collections ConfigDict: what `configs/*.py` start from."""
    import ml_collections

    return ml_collections.ConfigDict(dataclasses.asdict(Config()))


def _build_group(group: str, values: Mapping[str, Any]):
    cls = GROUPS[group]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    moved = [f"{group}.{u} is now {MOVED[f'{group}.{u}']}" for u in unknown
             if f"{group}.{u}" in MOVED]
    check(not unknown, f"unknown field(s) {', '.join(f'{group}.{u}' for u in unknown)}"
                       f"{' (' + '; '.join(moved) + ')' if moved else ''}; known fields of "
                       f"{group!r}: {', '.join(sorted(known))}.")
    return cls(**values)


def from_config_dict(config: Mapping[str, Any]) -> Config:
    """Converts a (possibly nested) mapping such as a ConfigDict into a validated `Config`."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    unknown = sorted(set(as_dict) - set(GROUPS))
    check(not unknown, f"unknown config group(s) {unknown}; known groups: {sorted(GROUPS)}.")
    return Config(**{name: _build_group(name, as_dict.get(name, {})) for name in GROUPS})


def from_json(text: str) -> Config:
    return from_config_dict(json.loads(text))


# ---------------------------------------------------------------------------------------------
# Compatibility of a saved config (a checkpoint's) with this version and with this run


def upgrade(saved: Mapping[str, Any]) -> Config:
    """A config saved by any version: moved fields read from where they were, fields this
    version no longer has dropped (logged), fields added since take their defaults."""
    groups = {group: dict(saved.get(group, {})) for group in GROUPS}
    for old, new in MOVED.items():
        (old_group, old_name), (new_group, new_name) = old.split("."), new.split(".")
        if old_name in groups[old_group]:
            groups[new_group].setdefault(new_name, groups[old_group].pop(old_name))
    for group, values in groups.items():
        names = {field.name for field in dataclasses.fields(GROUPS[group])}
        dropped = sorted(set(values) - names)
        if dropped:
            logging.getLogger(__name__).warning(
                "checkpoint config fields unknown to this version, ignored: %s",
                ", ".join(f"{group}.{name}" for name in dropped))
        groups[group] = {k: v for k, v in values.items() if k in names}
    return from_config_dict(groups)


def fields_of(config: Config, policy: str):
    """(group.field, value) of every field of `policy`, in declaration order."""
    for group in GROUPS:
        values = getattr(config, group)
        for field in dataclasses.fields(values):
            if field.metadata["policy"] == policy:
                yield f"{group}.{field.name}", getattr(values, field.name)


def changes(saved: Config, current: Config, policy: str) -> list[str]:
    """'group.field: checkpoint X, this run Y' for each field of `policy` that differs."""
    return [f"{name}: checkpoint {old!r}, this run {new!r}"
            for (name, old), (_, new) in zip(fields_of(saved, policy), fields_of(current, policy))
            if old != new]


def reference_markdown() -> str:
    """The field reference, one table per group (docs/configuration.md)."""
    return config_schema.reference_markdown(GROUPS)


if __name__ == "__main__":
    sys.stdout.write(reference_markdown())
