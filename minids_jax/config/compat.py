"""A saved config (a checkpoint's) against this version and against this run: fields that
moved since, the differences that matter on resume, and the architecture a fine-tuning run
takes from its base. Pure functions of configs and dicts; reading the files is the caller's.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Iterator, Mapping

from minids_jax.config.fields import ConfigError

# Fields an older version kept elsewhere: read from old checkpoints, named in errors.
MOVED = {"model.dtype": "compute.dtype", "model.attention_kernel": "compute.attention_kernel",
         "model.moe_dispatch": "compute.moe_dispatch",
         "model.capacity_factor": "compute.capacity_factor",
         "model.aux_loss_coef": "train.aux_loss_coef",
         "devices.reuse_host_memory": "devices.host_huge_pages"}


def upgraded_groups(saved: Mapping[str, Any], groups: Mapping[str, type]) -> dict[str, dict]:
    """`saved` as this version's groups (`groups`: name -> dataclass): moved fields read from
    where they were, fields this version no longer has dropped (logged)."""
    values = {group: dict(saved.get(group, {})) for group in groups}
    for old, new in MOVED.items():
        (old_group, old_name), (new_group, new_name) = old.split("."), new.split(".")
        if old_name in values[old_group]:
            values[new_group].setdefault(new_name, values[old_group].pop(old_name))
    for group, fields in values.items():
        names = {field.name for field in dataclasses.fields(groups[group])}
        dropped = sorted(set(fields) - names)
        if dropped:
            logging.getLogger(__name__).warning(
                "checkpoint config fields unknown to this version, ignored: %s",
                ", ".join(f"{group}.{name}" for name in dropped))
        values[group] = {k: v for k, v in fields.items() if k in names}
    return values


def fields_of(config, policy: str) -> Iterator[tuple[str, Any]]:
    """(group.field, value) of every field of `policy` in a Config, in declaration order."""
    for group in dataclasses.fields(config):
        values = getattr(config, group.name)
        for field in dataclasses.fields(values):
            if field.metadata["policy"] == policy:
                yield f"{group.name}.{field.name}", getattr(values, field.name)


def changes(saved, current, policy: str, groups: tuple[str, ...] | None = None) -> list[str]:
    """'group.field: checkpoint X, this run Y' for each field of `policy` (of `groups`,
    default all) that differs between two Configs."""
    return [f"{name}: checkpoint {old!r}, this run {new!r}"
            for (name, old), (_, new) in zip(fields_of(saved, policy), fields_of(current, policy))
            if old != new and (groups is None or name.split(".")[0] in groups)]


def with_base_model(values: dict, base: Mapping[str, Any], defaults: Mapping[str, Any],
                    overridden: set[str]) -> dict:
    """`values` (a config as nested dicts) with the model group `base` (a fine-tuning run's
    base's, as a dict). A model field the run sets explicitly and differently is a ConfigError
    naming it: explicitly means overridden on the command line (`overridden`:
    'model.n_layers', ...) or set by the config file to other than the field's default
    (`defaults`; a file's value that equals the default cannot be told from one it did not
    set: the base's wins then)."""
    model = {name: _plain(value) for name, value in values.get("model", {}).items()}
    conflicts = [f"model.{name}: checkpoint {base[name]!r}, this run {value!r}"
                 for name, value in model.items() if name in base and value != base[name]
                 and (f"model.{name}" in overridden or value != defaults[name])]
    if conflicts:
        raise ConfigError(
            f"checkpoint.init_from={values['checkpoint']['init_from']} fixes the model "
            f"architecture, and this run changes it: {'; '.join(conflicts)}. A fine-tuning "
            f"run keeps its base's shapes: drop those model settings (the base's are used), "
            f"or leave out checkpoint.init_from to train a new model.")
    # Fields unknown here stay, so that from_config_dict reports them.
    return {**values, "model": {**model, **base}}


def _plain(value):
    """Lists (JSON, ml_collections) as the tuples the dataclasses hold."""
    return tuple(_plain(v) for v in value) if isinstance(value, list) else value
