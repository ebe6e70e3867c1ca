"""Sizes of a config without allocating it: parameters, active parameters, FLOPs, memory.

    python -m minids_jax.inspect --config configs/deepseek_v3.py
    python -m minids_jax.inspect --config configs/v3_mini.py --devices 8 \
        --config.mesh.data=1 --config.mesh.fsdp=8

Everything comes from abstract shapes (`nnx.eval_shape` of one layer of each kind) and the
mesh's logical-axis rules: the total and per-token active parameter counts (routed experts
count top_k / n_experts; the MTP modules apart), the training FLOPs per token (flops.py), and
the bytes per device of the parameters and the AdamW state (two moments of each parameter)
under the configured mesh on `--devices` devices.

    python -m minids_jax.inspect --config configs/deepseek_llm_7b.py --memory \
        --device_memory 24GB --config.lora.rank=16 --config.compute.remat=full

`--memory` adds training/memory.py's plan of the train step on each device (parameters by dtype,
gradients, optimizer state, activations, ...) and, against `--device_memory` (default: the
total memory of this machine's first GPU, from NVML), whether it fits and the cheapest
change that does. `--platform gpu` plans a GPU run's kernels from a machine without one.
"""

from __future__ import annotations

import math

from absl import flags

from minids_jax import cli

GB = 1e9


def sizes(config, n_devices: int) -> dict:
    """The figures `inspect` prints, as numbers."""
    import collections
    import dataclasses

    import jax
    from flax import nnx

    from minids_jax import sharding
    from minids_jax.config import LoRAConfig
    from minids_jax.config.run import as_axes
    from minids_jax.model import build
    from minids_jax.training import flops, footprint

    cfg = config.model
    small, layer_of = footprint.representative(cfg)
    copies = collections.Counter(layer_of)  # how many real layers each built one stands for
    with nnx.logical_axis_rules(config.mesh.axis_rules), nnx.use_eager_sharding(False):
        base = dataclasses.replace(config, model=small, lora=LoRAConfig())  # no adapters
        model = nnx.eval_shape(lambda: build(base, sharding.mesh_platform(), nnx.Rngs(0)))
        params = nnx.state(model, nnx.Param)
        specs = nnx.get_partition_spec(params)
    mesh_sizes = sharding.resolve_axis_sizes(config.mesh, n_devices)
    leaves = jax.tree_util.tree_leaves_with_path(params)
    total = active = mtp = 0
    device_bytes = 0.0
    for (path, leaf), spec in zip(leaves, jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        name = jax.tree_util.keystr(path)
        size = math.prod(leaf.shape)
        if name.startswith("['blocks']"):
            size *= copies[int(path[1].key)]
        routed = "['moe']['w" in name  # the routed experts' [E, ...] weights
        share = cfg.top_k / cfg.n_experts if routed else 1.0
        if "['mtp']" in name:
            mtp += size
        else:
            total += size
            active += size * share
        ways = 1
        for axes in spec:
            ways *= math.prod(mesh_sizes[a] for a in as_axes(axes))
        device_bytes += 3 * size * leaf.dtype.itemsize / ways  # the parameter and two moments
    return {"parameters": total, "active_per_token": active, "mtp_parameters": mtp,
            "train_flops_per_token": flops.train_flops_per_token(cfg),
            "mesh": mesh_sizes, "bytes_per_device": device_bytes}


def count(n: int) -> str:
    """2 decimals in the largest unit of B (1e9) and M (1e6) that the count reaches."""
    return f"{n / 1e9:,.2f}B" if n >= 1e9 else f"{n / 1e6:,.2f}M"


def main() -> None:
    config_flag = cli.define_config_flag()
    devices_flag = flags.DEFINE_integer("devices", 1, "Devices the mesh spans.", lower_bound=1)
    memory_flag = flags.DEFINE_boolean("memory", False, "Also print the memory plan of the "
                                       "train step per device (minids_jax/training/memory.py).")
    device_memory_flag = flags.DEFINE_string(
        "device_memory", None, "Memory of each device, e.g. 24GB or 80GiB; default: the "
        "local GPU's total memory (NVML).")
    platform_flag = flags.DEFINE_enum("platform", None, ["cpu", "gpu", "tpu"], "Kernels the "
                                      "memory plan assumes; default: this machine's.")

    def run(argv):
        del argv
        config = cli.config_from_flag(config_flag)
        device_bytes = _device_bytes(device_memory_flag.value) if memory_flag.value else None
        figures = sizes(config, devices_flag.value)
        print(f"parameters:          {count(figures['parameters'])} in the main model "
              f"(+ {count(figures['mtp_parameters'])} in {config.model.mtp_depth} MTP "
              f"module(s))")
        print(f"active per token:    {count(figures['active_per_token'])}")
        print(f"training FLOPs:      {figures['train_flops_per_token'] / GB:,.1f} GFLOPs per "
              f"token")
        print(f"mesh:                {figures['mesh']} on {devices_flag.value} device(s)")
        every = " if every parameter trained" if config.lora.rank else ""
        print(f"per device:          {figures['bytes_per_device'] / GB:,.2f} GB of parameters "
              f"and AdamW moments{every} ({config.model.param_dtype})")
        if memory_flag.value:
            from minids_jax.training import memory

            plan = memory.plan(config, devices_flag.value, device_bytes, platform_flag.value)
            print(f"memory plan:         the train step on each device, "
                  f"{platform_flag.value or 'this machine'}'s kernels")
            for line in plan.lines():
                print(f"  {line}")

    cli.run(run)


def _device_bytes(text: str | None) -> float | None:
    """--device_memory in bytes; without it the local GPU's total memory (NVML), else None."""
    from minids_jax.config.run import parse_size
    from minids_jax.training import memory

    return parse_size(text, "--device_memory") if text is not None else memory.gpu_memory()


if __name__ == "__main__":
    main()
