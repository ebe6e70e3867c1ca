"""A memory plan: the bytes one device holds while the train step runs, before anything runs.

    plan(config, n_devices)                       -> MemoryPlan (its .lines() are what
                                                     `python -m minids_jax.inspect --memory` prints)
    plan(config, n_devices, device_bytes=24e9)    -> with a verdict and, if it does not fit,
                                                     the cheapest change that does
    fitting(config, n_devices, device_bytes)      -> {'compute.remat': ..., ...} or None
    settle(config, mesh, log)                     -> the config with compute.remat='auto' and
                                                     train.grad_accum_steps=0 chosen (the
                                                     trainer's, before it compiles)

Nothing is allocated or compiled: footprint.py reads the state's arrays from abstract shapes
and the activations the backward pass keeps from the traced loss. What XLA adds on top while
the backward runs (a block's recomputed activations under remat, cotangents, the optimizer's
update) is estimated from the same shapes; tests/test_memory_plan.py holds the total to XLA's
own memory analysis of the compiled step.
"""

from __future__ import annotations

import collections
import dataclasses
import os

import jax

from minids_jax import sharding
from minids_jax.config import Config, ConfigError
from minids_jax.config.run import AUTO, parse_size
from minids_jax.training import footprint

GB = 1e9
# What the backward of the costliest block holds beyond the residuals, as a share of that
# block's residuals without remat: its cotangents (none); the activations it recomputes and
# their cotangents (full, save_dots). Fitted to XLA's memory analysis (docs/memory.md).
WORKING_SET = {"none": 0.5, "full": 0.95, "save_dots": 0.75}


@dataclasses.dataclass
class MemoryPlan:
    """Bytes per device. `parts` sum to `total`; `fix` is None or the config overrides (field
    path -> value) of the cheapest change that fits `device_bytes`."""

    parts: dict[str, float]
    parameters_by_dtype: dict[str, float]
    trainable: int  # trainable parameters, the whole model's
    kv_cache: float  # generation at batch 1 and model.max_seq_len (not part of the total)
    device_bytes: float | None = None
    fix: dict | None = None
    fix_total: float | None = None

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.total <= self.device_bytes

    def verdict(self) -> str:
        if self.device_bytes is None:
            return "verdict: pass --device_memory (e.g. 24GB): no GPU memory found to compare"
        used = f"{gb(self.total)} of {gb(self.device_bytes)}"
        if self.fits:
            return f"fits: {used}"
        if self.fix is None:
            return f"does not fit: {used}; no scan, remat, microbatch, nf4 base or fsdp change fits"
        flags = " ".join(f"--config.{key}={value}" for key, value in self.fix.items())
        return f"does not fit: {used}; {flags} fits ({gb(self.fix_total)})"

    def lines(self) -> list[str]:
        dtypes = ", ".join(f"{gb(n)} {name}" for name, n in self.parameters_by_dtype.items())
        out = [f"parameters:           {gb(self.parts['parameters'])} ({dtypes})",
               f"trainable:            {self.trainable:,} parameters"]
        labels = {"gradients": "gradients", "optimizer": "optimizer state",
                  "accumulation": "grad accumulation", "stacked": "scan stacked copies",
                  "activations": "activations kept", "transient": "backward working set",
                  "batch": "batch"}
        out += [f"{labels[name] + ':':<22}{gb(n)}" for name, n in self.parts.items()
                if name in labels and n]
        out += [f"{'total:':<22}{gb(self.total)} per device", self.verdict(),
                f"{'kv cache:':<22}{gb(self.kv_cache)} (generation: 1 sequence of max_seq_len)"]
        return out


def gb(n: float) -> str:
    """Bytes in GB (1e9), or MB below 0.1 GB."""
    return f"{n / GB:,.2f} GB" if n >= 0.1 * GB else f"{n / 1e6:,.2f} MB"


def plan(config, n_devices: int = 1, device_bytes: float | None = None,
         platform: str | None = None, suggest: bool = True) -> MemoryPlan:
    """The memory plan of `config`'s train step on each of `n_devices` devices of `platform`
    (default: JAX's backend here), judged against `device_bytes` if given. Raises ConfigError
    if the mesh does not fit `n_devices` (or the config cannot be built)."""


    platform = platform or jax.default_backend()
    state = footprint.state_bytes(config, n_devices, platform)
    accum, length = config.train.grad_accum_steps, config.model.max_seq_len
    device_rows = max(1, config.train.batch_size // footprint.batch_ways(config, state["mesh"]))
    kept, block = footprint.activations(config, state["small"], state["layer_of"], platform,
                                        max(1, device_rows // accum))
    parts = {"parameters": sum(state["by_dtype"].values()),
             "gradients": state.get("gradients", 0.0), "optimizer": state.get("optimizer", 0.0),
             # the microbatch loop (training/steps.py) carries the model's arrays: a copy
             "accumulation": state.get("accumulation", 0.0) + (
                 sum(state["by_dtype"].values()) if accum > 1 else 0.0),
             "stacked": state.get("stacked", 0.0),
             "activations": kept, "transient": state["dequantized"],
             "batch": 12.0 * device_rows * length}
    parts["transient"] += WORKING_SET[config.compute.remat] * block
    result = MemoryPlan(parts, state["by_dtype"], state["trainable"],
                        footprint.kv_cache_bytes(config), device_bytes)
    if suggest and result.fits is False:
        result.fix, result.fix_total = _cheapest_fix(config, n_devices, device_bytes, platform)
    return result



def with_overrides(config, overrides: dict):
    """`config` with {'group.field': value} applied."""
    groups = collections.defaultdict(dict)
    for key, value in overrides.items():
        group, field = key.split(".")
        groups[group][field] = value
    return dataclasses.replace(config, **{group: dataclasses.replace(getattr(config, group),
                                                                     **fields)
                                          for group, fields in groups.items()})


def _candidates(config, n_devices: int, platform: str, changes: tuple[str, ...]):
    """Overrides to try, cheapest first, each keeping the ones before it: no scan (its stacked
    copy of the scanned layers' weights goes; compiling takes longer), remat='full', then
    more microbatches (each a divisor of a device's rows), an nf4 base (LoRA runs), more
    fsdp (each a divisor of the devices, data taking the rest)."""
    overrides = {}
    if "scan" in changes and footprint.scanned_layers(config.model, config.compute, platform):
        overrides["compute.scan_layers"] = False
        yield dict(overrides)
    if "remat" in changes and config.compute.remat != "full":
        overrides["compute.remat"] = "full"
        yield dict(overrides)
    mesh = sharding.resolve_axis_sizes(config.mesh, n_devices)
    rows = config.train.batch_size // footprint.batch_ways(config, mesh)
    if "accum" in changes:
        for accum in range(config.train.grad_accum_steps + 1, rows + 1):
            if rows % accum == 0:
                overrides["train.grad_accum_steps"] = accum
                yield dict(overrides)
    if "nf4" in changes and config.lora.rank and config.lora.base_quant != "nf4":
        overrides["lora.base_quant"] = "nf4"
        yield dict(overrides)
    if "fsdp" in changes:
        for fsdp in range(mesh["fsdp"] + 1, n_devices + 1):
            if n_devices % fsdp == 0 and n_devices % (fsdp * mesh["tensor"] * mesh["expert"]) == 0:
                overrides.update({"mesh.fsdp": fsdp, "mesh.data": -1})
                yield dict(overrides)


def _search(config, n_devices, device_bytes, platform, changes):
    """(the first candidate that fits, less the earlier changes it does not need, and its
    plan's total), or (None, None)."""

    def total_if_fits(overrides):
        try:
            tried = plan(with_overrides(config, overrides), n_devices, device_bytes, platform,
                         suggest=False)
        except ConfigError:  # e.g. a batch the new mesh cannot split, widths nf4 cannot block
            return None
        return tried.total if tried.fits else None

    for overrides in _candidates(config, n_devices, platform, changes):
        total = total_if_fits(overrides)
        if total is None:
            continue
        for key in [k for k in overrides if not k.startswith("mesh.")][:-1]:
            fewer = {k: v for k, v in overrides.items() if k != key}
            fewer_total = total_if_fits(fewer)
            if fewer_total is not None:
                overrides, total = fewer, fewer_total
        return overrides, total
    return None, None


def _cheapest_fix(config, n_devices, device_bytes, platform):
    return _search(config, n_devices, device_bytes, platform, ("scan", "remat", "accum", "nf4", "fsdp"))


def fitting(config, n_devices: int, device_bytes: float, platform: str | None = None,
            changes: tuple[str, ...] = ("remat", "accum")) -> dict | None:
    """The compute.remat and train.grad_accum_steps overrides (of those `changes` names)
    under which the train step fits `device_bytes` ({} if it fits as it is), or None if none
    does."""
    if plan(config, n_devices, device_bytes, platform, suggest=False).fits:
        return {}
    return _search(config, n_devices, device_bytes, platform, changes)[0]


def gpu_memory() -> float | None:
    """The total memory of this machine's first GPU (NVML), or None without one."""
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            return float(pynvml.nvmlDeviceGetMemoryInfo(
                pynvml.nvmlDeviceGetHandleByIndex(0)).total)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no NVML, driver or GPU
        return None


def device_memory(config: Config, mesh) -> float | None:
    """Bytes each device of `mesh` has for a run (devices.memory): the setting, or with
    'auto' what the device reports (a CPU: this machine's RAM shared by its devices)."""
    if config.devices.memory == "off":
        return None
    if config.devices.memory != AUTO:
        return parse_size(config.devices.memory, "devices.memory")
    device = mesh.devices.flat[0]
    if device.platform != "cpu":
        return (device.memory_stats() or {}).get("bytes_limit") or gpu_memory()
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram / len([d for d in mesh.devices.flat if d.process_index == device.process_index])


def settle(config: Config, mesh, log) -> Config:
    """`config` with compute.remat='auto' and train.grad_accum_steps=0 chosen by the memory
    plan (the least that fits devices.memory: no remat and one microbatch if that does; auto
    remat may also turn compute.scan_layers off, whose stacked weights cost memory).
    Raises ConfigError, before anything compiles, when the run cannot fit. Plans only what
    needs planning: a run on a GPU (or with devices.memory set), or one with auto fields."""
    auto_remat, auto_accum = config.compute.remat == AUTO, config.train.grad_accum_steps == 0
    platform = sharding.mesh_platform(mesh)
    if not (auto_remat or auto_accum) and (config.devices.memory == "off" or (
            config.devices.memory == AUTO and platform == "cpu")):
        return config
    chosen = with_overrides(config, {"compute.remat": "none" if auto_remat else
                                     config.compute.remat,
                                     "train.grad_accum_steps": 1 if auto_accum else
                                     config.train.grad_accum_steps})
    limit = device_memory(config, mesh)
    if limit is None:
        return chosen
    n_devices = mesh.devices.size
    changes = ("scan", "remat") * auto_remat + ("accum",) * auto_accum
    as_set = plan(chosen, n_devices, limit, platform, suggest=False)
    overrides, total = ({}, as_set.total) if as_set.fits else _search(
        chosen, n_devices, limit, platform, changes)
    if overrides is None:
        verdict = plan(chosen, n_devices, limit, platform).verdict()
        raise ConfigError(f"the train step would not fit in memory (the memory plan: "
                          f"{verdict}); python -m minids_jax.inspect --memory shows the plan, "
                          f"devices.memory='off' runs it anyway.")
    settled = with_overrides(chosen, overrides)
    if changes:
        scan = "" if settled.compute.scan_layers == config.compute.scan_layers else \
            ", compute.scan_layers=False"
        log(f"memory plan: {gb(total)} of {gb(limit)} per device with compute.remat="
            f"{settled.compute.remat}, train.grad_accum_steps="
            f"{settled.train.grad_accum_steps}{scan}")
    return settled
