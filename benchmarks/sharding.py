"""Mesh layouts compared: tokens/s (total and per device) and compiled per-device memory.

    # 8 simulated CPU devices, data parallel vs FSDP (and any other layout):
    python benchmarks/sharding.py --config configs/tiny.py --cpu_devices 8 \
        --layout data=-1 --layout fsdp=-1 --layout data=2,fsdp=2,tensor=2
    # the GPUs of this machine:
    python benchmarks/sharding.py --config configs/mini.py --config.compute.dtype=bfloat16 \
        --layout data=-1 --layout fsdp=-1

Each layout starts from data=fsdp=tensor=expert=1 and sets the named axes (-1: the devices
left over; without a -1, the first product-of-sizes devices, so `--layout data=1` is the
one-device baseline). Per device, from the compiled train step's `memory_analysis()`:
arguments (model and optimizer state plus this device's batch rows; donated, so the output
reuses them) and temporaries (activations, gradients, gathered weights). Simulated CPU devices
share the host's cores, so their tokens/s measure overhead, not scaling; the memory figures are
exact.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import time_train_step  # noqa: E402  (benchmarks/timing.py, beside this file)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_LAYOUTS = flags.DEFINE_multi_string("layout", ["data=-1", "fsdp=-1"],
                                     "Mesh sizes, e.g. data=2,fsdp=4 (repeat the flag).")
_CPU_DEVICES = flags.DEFINE_integer("cpu_devices", 0,
                                    "Simulate this many CPU devices (0: use the real ones).")
_STEPS = flags.DEFINE_integer("steps", 5, "Timed steps (after two warm-up steps).")

MiB = 1024 ** 2


def parse_layout(text: str) -> dict[str, int]:
    sizes = {"data": 1, "fsdp": 1, "tensor": 1, "expert": 1}
    for item in filter(None, text.split(",")):
        name, _, value = item.partition("=")
        if name not in sizes or not value.lstrip("-").isdigit():
            raise app.UsageError(f"bad --layout item {item!r}: use e.g. data=2,fsdp=-1 with "
                                 f"axes {tuple(sizes)}")
        sizes[name] = int(value)
    return sizes


def measure(config, steps: int) -> dict:
    import math

    import jax

    from minids_jax.training import trainer

    sizes = config.mesh.axis_sizes()
    devices = None if -1 in sizes.values() else jax.devices()[:math.prod(sizes.values())]
    run = trainer.Trainer(config, devices=devices)
    first_device = jax.local_devices()[0]
    state_bytes = sum(shard.data.nbytes for leaf in jax.tree.leaves(run.step_state)
                      for shard in leaf.addressable_shards if shard.device == first_device)
    timing = time_train_step(run, steps)
    memory = timing.compiled.memory_analysis()
    tokens_per_s = timing.tokens_per_s
    devices = run.mesh.devices.size
    return {
        "mesh": "x".join(f"{a}{n}" for a, n in run.mesh.shape.items() if n > 1) or "1 device",
        "compile_s": timing.compile_s, "step_s": timing.step_s, "tokens_per_s": tokens_per_s,
        "tokens_per_s_per_device": tokens_per_s / devices,
        "state_mib": state_bytes / MiB, "argument_mib": memory.argument_size_in_bytes / MiB,
        "temp_mib": memory.temp_size_in_bytes / MiB, "loss": float(timing.metrics["loss"]),
    }


def main(argv):
    del argv
    if _CPU_DEVICES.value:  # before jax starts
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   f" --xla_force_host_platform_device_count={_CPU_DEVICES.value}")
    from minids_jax import config as config_lib
    from minids_jax import startup

    base = _CONFIG.value
    if not _CPU_DEVICES.value:
        startup.select_gpus(config_lib.from_config_dict(base).devices)

    import jax

    print(f"{jax.device_count()} x {jax.devices()[0].device_kind} | "
          f"model d={base.model.d_model} layers={base.model.n_layers} "
          f"experts={base.model.n_experts} | batch {base.train.batch_size} x "
          f"{base.model.max_seq_len} | {base.compute.dtype}", flush=True)
    header = (f"{'mesh':<24} {'tok/s':>10} {'tok/s/dev':>10} {'step ms':>8} {'state MiB':>10} "
              f"{'args MiB':>9} {'temp MiB':>9} {'compile s':>9}")
    print(header)
    for layout in _LAYOUTS.value:
        config_dict = base.copy_and_resolve_references()
        config_dict.mesh.update(parse_layout(layout))
        r = measure(config_lib.from_config_dict(config_dict), _STEPS.value)
        print(f"{r['mesh']:<24} {r['tokens_per_s']:>10,.0f} {r['tokens_per_s_per_device']:>10,.0f} "
              f"{r['step_s'] * 1e3:>8.1f} {r['state_mib']:>10.2f} {r['argument_mib']:>9.2f} "
              f"{r['temp_mib']:>9.2f} {r['compile_s']:>9.1f}", flush=True)


if __name__ == "__main__":
    app.run(main)
