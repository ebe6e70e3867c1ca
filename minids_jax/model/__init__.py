"""The parameters and the function they compute: `build` makes the model of a config."""

from __future__ import annotations

from flax import nnx

from minids_jax import kernels
from minids_jax.config import Config
from minids_jax.model import lora
from minids_jax.model.transformer import MiniDeepSeek, Output, count_params

__all__ = ["MiniDeepSeek", "Output", "build", "count_params"]


def build(config: Config, platform: str, rngs: nnx.Rngs) -> MiniDeepSeek:
    """The model of `config`, its kernels and MoE dispatch those of `platform` (cpu, gpu,
    tpu: `sharding.mesh_platform`), and with lora.rank its adapters and its frozen base as
    lora.base_quant stores it. Parameters carry logical axis names; whoever builds it under a
    mesh places them (sharding.create_sharded)."""
    model = MiniDeepSeek(config.model, kernels.resolve(config.compute, platform), rngs=rngs)
    if config.lora.rank:
        lora.add_adapters(model, config.lora, rngs)
        lora.quantize_base(model, config.lora, rngs)
    return model
