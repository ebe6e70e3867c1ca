"""Typed, validated configuration: the one source of every field's default, doc and resume policy.

The `configs/*.py` files build an `ml_collections.ConfigDict` from these defaults (so any field
can be overridden from the command line); `from_config_dict` turns it into the frozen
dataclasses below exactly once, and modules receive dataclasses, never the ConfigDict. Each
field declares, in its metadata, a one-line doc, its checks and what a change on resume means:
  architecture  the parameters' shapes or the function they compute: must match the checkpoint
  noted         changes the run's course (it will not match an uninterrupted one): logged
  quiet         bookkeeping (logging, mesh, more steps): changed silently
`python -m minids_jax.config` prints the reference (docs/configuration.md). The field machinery
is fields.py's, the `model` and `lora` groups model.py's, the others run.py's; a saved config
meets this version and this run in compat.py.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping

from minids_jax.config import compat
from minids_jax.config.fields import ARCHITECTURE, NOTED, QUIET, ConfigError, check
from minids_jax.config.fields import reference_markdown as _reference_markdown
from minids_jax.config.model import LoRAConfig, ModelConfig
from minids_jax.config.run import (
    MIN_TEXT_VOCAB,
    CheckpointConfig,
    ComputeConfig,
    DataConfig,
    DevicesConfig,
    MeshConfig,
    OptimConfig,
    TrainConfig,
)

__all__ = ["ARCHITECTURE", "NOTED", "QUIET", "CheckpointConfig", "ComputeConfig", "Config",
           "ConfigError", "DataConfig", "DevicesConfig", "GROUPS", "LoRAConfig", "MeshConfig",
           "ModelConfig", "OptimConfig", "TrainConfig", "default_config_dict",
           "from_config_dict", "from_json", "reference_markdown", "upgrade"]


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
    """Every default as an ml_collections ConfigDict: what `configs/*.py` start from. The
    declared defaults, before validation resolves any (model.head_dim 0 follows d_model and
    n_heads wherever a config file sets them)."""
    import ml_collections

    return ml_collections.ConfigDict({name: group.declared_defaults()
                                      for name, group in GROUPS.items()})


def _build_group(group: str, values: Mapping[str, Any]):
    cls = GROUPS[group]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    moved = [f"{group}.{u} is now {compat.MOVED[f'{group}.{u}']}" for u in unknown
             if f"{group}.{u}" in compat.MOVED]
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


def upgrade(saved: Mapping[str, Any]) -> Config:
    """A config saved by any version: moved fields read from where they were, fields this
    version no longer has dropped (logged), fields added since take their defaults."""
    return from_config_dict(compat.upgraded_groups(saved, GROUPS))


def reference_markdown() -> str:
    """The field reference, one table per group (docs/configuration.md)."""
    return _reference_markdown(GROUPS)

