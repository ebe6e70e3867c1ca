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
    mesh places them (sharding.create_sharded). Draws from a copy of `rngs`: the given one's
    counters do not move."""
    rngs = _counted_by_refs(rngs)
    model = MiniDeepSeek(config.model, kernels.resolve(config.compute, platform), rngs=rngs)
    if config.lora.rank:
        lora.add_adapters(model, config.lora, rngs)
        lora.quantize_base(model, config.lora, rngs)
    return model


def _counted_by_refs(rngs: nnx.Rngs) -> nnx.Rngs:
    """The same streams (keys, and draws so far), their draw counters held as array refs.

    A draw bumps its stream's counter with flax's indexed assignment, which reads the new
    value's `.sharding`; on a tracer, jax answers that with an error whose message it builds by
    walking everything traced so far. Building a model inside one trace (nnx.eval_shape, as
    sharding.create_sharded and inspect do) thus took time in the square of its depth: 20 s of
    a 61-layer start (docs/scale.md). Assigning to a ref does not read it."""
    streams = {name: stream for name, stream in vars(rngs).items()
               if isinstance(stream, nnx.RngStream)}
    copy = nnx.Rngs(**{name: stream.key[...] for name, stream in streams.items()})
    for name, stream in streams.items():
        getattr(copy, name).count = nnx.RngCount(stream.count[...], tag=stream.tag, ref=True)
    return copy
