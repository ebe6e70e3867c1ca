"""LoRA: low-rank adapters on chosen projections of a built model; everything else frozen.

    adapted = add_adapters(model, config.lora, rngs)   # names of the projections adapted
    trainable(config.lora)                             # the nnx filter of what trains
    merge_lora(model)                                  # a copy without adapters, merged in

A projection is a `layers.Linear` (attention, dense and shared MLPs, the head, the MTP
projections) or one of an MoE layer's routed expert weights `w1`, `w2`, `w3` ([E, in, out]:
an adapter per expert, with the expert axis leading, so expert parallelism splits them too).
Its path names it, e.g. `blocks.3.attn.q_up`, `blocks.1.moe.w1`, `blocks.1.moe.shared.w2`,
`mtp.0.block.attn.out`. A target matches a path equal to it or ending in `.target`, or matching
it as an fnmatch pattern (also after any prefix): `q_up`, `attn.*`, `moe.w1`, `blocks.0.*`.
The router gate and the embedding are never adapted. As in PEFT, `lora_a` starts uniform in
[-1/sqrt(in), 1/sqrt(in)] and `lora_b` at zero, so an adapted model computes exactly its base
at first; the adapter adds `alpha / rank * x @ lora_a @ lora_b` (PEFT's scaling).

A LoRA run started from a base (checkpoint.init_from) saves only what trains, on that base
(checkpoint/base.py).

Shapes: D in, F out, R rank, E experts.
"""

from __future__ import annotations

import fnmatch

import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from minids_jax.config import ConfigError, LoRAConfig
from minids_jax.model import quant
from minids_jax.model.layers import Linear
from minids_jax.model.moe import EXPERT_AXES, MoE

EXPERT_WEIGHTS = ("w1", "w2", "w3")
# PEFT's target names (transformers' module names) -> the projections here they name.
PEFT_NAMES = {
    "q_proj": ("attention.q", "attn.q"), "k_proj": ("attention.k",),
    "v_proj": ("attention.v",), "o_proj": ("attention.out", "attn.out"),
    "q_a_proj": ("attn.q_down",), "q_b_proj": ("attn.q_up",),
    "kv_a_proj_with_mqa": ("attn.kv_down",), "kv_b_proj": ("attn.kv_up",),
    "gate_proj": ("mlp.w1", "shared.w1"), "up_proj": ("mlp.w2", "shared.w2"),
    "down_proj": ("mlp.w3", "shared.w3"), "lm_head": ("head",),
}
ALL_LINEAR = "all-linear"  # PEFT's: every Linear but the output layer (experts are no Linear)
NEVER_ADAPTED = ("gate",)  # the router: adapting it would move routing, not features


def projections(model: nnx.Module) -> dict[str, tuple[nnx.Module, str | None]]:
    """{path: (module, expert weight name or None)} of every projection that can be adapted."""
    out = {}
    for path, module in nnx.iter_modules(model):
        name = ".".join(str(key) for key in path)
        if isinstance(module, Linear) and path and path[-1] not in NEVER_ADAPTED:
            out[name] = (module, None)
        elif isinstance(module, MoE):
            out.update({f"{name}.{weight}": (module, weight) for weight in EXPERT_WEIGHTS})
    return out


def matches(path: str, target: str, expert: bool = False) -> bool:
    """Whether a projection's path is one `target` names: a pattern of ours, one of PEFT's
    module names, or 'all-linear' (`expert`: the path is a routed expert weight)."""
    if target == ALL_LINEAR:
        return not expert and path != "head"
    return any(fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, f"*.{pattern}")
               for pattern in PEFT_NAMES.get(target, (target,)))


def short_names(paths) -> list[str]:
    """The distinct kinds of projection, without layer numbers: what a target may name."""
    kinds = set()
    for path in paths:
        parts = [part for part in path.split(".") if not part.isdigit()]
        kinds.add(".".join(parts[1:] if parts[0] == "blocks" else parts))
    return sorted(kinds)


def is_adapter(name: str) -> bool:
    """Whether a state key names an adapter (`lora_a`, `w1_lora_b`, ...)."""
    return name.endswith(("lora_a", "lora_b"))


def without_adapters(tree: dict) -> dict:
    """A nested state dict without its adapters: the base model's state."""
    return unflatten_dict({path: leaf for path, leaf in flatten_dict(tree).items()
                           if not is_adapter(str(path[-1]))})


def merged_params(params: dict, cfg: LoRAConfig) -> dict:
    """A nested dict of numpy parameters (load_params) with its adapters merged into their
    weights and removed: the base layout, computing the adapted model."""
    flat = flatten_dict(params)
    for path in [p for p in flat if str(p[-1]).endswith("lora_a")]:
        weight, b_path = adapted_weight(path)
        flat[weight] = merged_weight(flat[weight], flat.pop(path), flat.pop(b_path), cfg)
    return unflatten_dict(flat)


def adapted_weight(a_path: tuple) -> tuple[tuple, tuple]:
    """(the weight's path, the B matrix's path) of an adapter's A matrix path."""
    weight = str(a_path[-1])[:-len("_lora_a")] or "kernel"  # w1_lora_a -> w1; lora_a -> kernel
    return a_path[:-1] + (weight,), a_path[:-1] + (str(a_path[-1])[:-1] + "b",)


def merged_weight(weight, a, b, cfg: LoRAConfig) -> np.ndarray:
    """weight + alpha / rank * A @ B, in the weight's dtype."""
    delta = np.matmul(np.asarray(a, np.float32), np.asarray(b, np.float32))
    return (np.asarray(weight, np.float32) + cfg.alpha / cfg.rank * delta
            ).astype(np.asarray(weight).dtype)


def add_adapters(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> list[str]:
    """Adds adapters of `cfg.rank` to the projections `cfg.targets` match; returns their
    paths. A target that matches nothing, or a rank above a projection's smaller side, is a
    ConfigError naming the projections there are."""
    found = projections(model)
    unmatched = [t for t in cfg.targets
                 if not any(matches(path, t, weight is not None)
                            for path, (_, weight) in found.items())]
    if unmatched:
        raise ConfigError(
            f"lora.targets {unmatched} match no projection of this model; the projections are "
            f"{', '.join(short_names(found))} (e.g. 'attn.*' for all attention projections, "
            f"'moe.w1' for the routed experts' first weights; PEFT's names such as 'q_proj' "
            f"and 'all-linear' work too).")
    chosen = [path for path, (_, weight) in found.items()
              if any(matches(path, t, weight is not None) for t in cfg.targets)]
    experts = [path for path in chosen if found[path][1] is not None]
    if cfg.dropout and experts:
        # The dispatches apply each expert's merged weight: no separate adapter path to drop
        # from (PEFT's adapters on fused experts refuse lora_dropout too).
        raise ConfigError(f"lora.dropout={cfg.dropout} needs adapters with their own path, "
                          f"and the routed experts' ({experts[0]}, ...) are merged into their "
                          f"weights; set lora.dropout=0 or leave moe.w* out of lora.targets.")
    for path in chosen:  # all checked before any is changed
        module, weight = found[path]
        shape = (module.kernel if weight is None else getattr(module, weight)).shape[-2:]
        if cfg.rank > min(shape):
            raise ConfigError(f"lora.rank={cfg.rank} exceeds the smaller side of {path} "
                              f"{tuple(shape)}; lower lora.rank or leave {path} out of "
                              f"lora.targets.")
    with nnx.use_eager_sharding(False):  # placed by whoever builds the model (as its params)
        for path in chosen:
            module, weight = found[path]
            if weight is None:
                _adapt_linear(module, cfg, rngs)
            else:
                _adapt_experts(module, weight, cfg, rngs)
    return chosen


def _pair(shape_a, shape_b, axes_a, axes_b, rngs: nnx.Rngs, dtype):
    # PEFT's kaiming_uniform_(lora_A, a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), so that its
    # learning rates and alphas carry over; the fan-in is one expert's, not E times it.
    experts_axis = tuple(range(len(shape_a) - 2))  # (0,) for [E, in, R], () for [in, R]
    init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform", in_axis=-2,
                                             out_axis=-1, batch_axis=experts_axis)
    a = nnx.LoRAParam(init(rngs.params(), shape_a, dtype), out_sharding=axes_a)
    b = nnx.LoRAParam(jnp.zeros(shape_b, dtype), out_sharding=axes_b)
    return a, b


def _adapt_linear(module: Linear, cfg: LoRAConfig, rngs: nnx.Rngs) -> None:
    d_in, d_out = module.kernel.shape
    axis_in, axis_out = module.axes
    module.lora_a, module.lora_b = _pair((d_in, cfg.rank), (cfg.rank, d_out), (axis_in, None),
                                         (None, axis_out), rngs, module.kernel.dtype)
    module.lora_scale = cfg.alpha / cfg.rank


def _adapt_experts(module: MoE, weight: str, cfg: LoRAConfig, rngs: nnx.Rngs) -> None:
    experts, d_in, d_out = getattr(module, weight).shape
    _, axis_in, axis_out = EXPERT_AXES[weight]
    a, b = _pair((experts, d_in, cfg.rank), (experts, cfg.rank, d_out),
                 ("expert", axis_in, None), ("expert", None, axis_out), rngs,
                 getattr(module, weight).dtype)
    setattr(module, f"{weight}_lora_a", a)
    setattr(module, f"{weight}_lora_b", b)
    module.lora_scale = cfg.alpha / cfg.rank


def quantize_base(model: nnx.Module, cfg: LoRAConfig, rngs: nnx.Rngs) -> list[str]:
    """Stores every frozen projection weight as `cfg.base_quant` (quant.py), drawn afresh
    from `rngs` in that form (a base is restored over it: checkpoint.init_from): each
    Linear's kernel but the head's (kept at full precision, as bitsandbytes keeps the output
    layer) and the routers' (never adapted), and the routed experts' weights. Returns their
    paths. A weight the format cannot hold is a ConfigError, raised before anything changes."""
    if cfg.base_quant == "none":
        return []
    frozen = {path: found for path, found in projections(model).items() if path != "head"}
    for path, (module, weight) in frozen.items():
        shape = (module.kernel if weight is None else getattr(module, weight)).shape
        problem = quant.check_shape(cfg.base_quant, shape, path)
        if problem:
            raise ConfigError(problem)
    with nnx.use_eager_sharding(False):
        for module, weight in frozen.values():
            name, axes = (weight, EXPERT_AXES[weight]) if weight else ("kernel", module.axes)
            full = getattr(module, name)
            setattr(module, name, quant.QuantizedWeight.drawn(
                rngs.params(), full.shape, full.dtype, cfg.base_quant, axes))
    return list(frozen)


def trainable(cfg: LoRAConfig):
    """What an optimizer updates: everything without adapters; with them, the adapters (and
    the norm gains with `train_norms`)."""
    if not cfg.rank:
        return nnx.Param
    if cfg.train_norms:
        return nnx.Any(nnx.LoRAParam, nnx.All(nnx.Param, nnx.PathContains("scale")))
    return nnx.LoRAParam


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with every adapter merged into its weight and removed; a quantized
    base is dequantized (every weight at full precision again)."""
    model = nnx.clone(model)
    for module, weight in projections(model).values():
        name = weight or "kernel"
        adapted = getattr(module, f"{weight}_lora_a" if weight else "lora_a") is not None
        if not adapted and not quant.is_quantized(getattr(module, name)):
            continue
        full = module.weight() if weight is None else module.expert_weight(weight)
        if quant.is_quantized(getattr(module, name)):
            with nnx.use_eager_sharding(False):
                setattr(module, name, nnx.Param(full, out_sharding=getattr(module, name).axes))
        else:
            getattr(module, name)[...] = full
        if weight is None:
            module.lora_a = module.lora_b = None
        else:
            setattr(module, f"{weight}_lora_a", None)
            setattr(module, f"{weight}_lora_b", None)
    return model
