"""A memory plan: the bytes one device holds while the train step runs, before anything runs.

    plan(config, n_devices)                       -> MemoryPlan (its .lines() are what
                                                     `python -m minids_jax.inspect --memory` prints)
    plan(config, n_devices, device_bytes=24e9)    -> with a verdict and, if it does not fit,
                                                     the cheapest change that does
    fitting(config, n_devices, device_bytes)      -> {'compute.remat': ..., ...} or None

Nothing is allocated or compiled. The state comes from abstract shapes (`nnx.eval_shape` of
inspect.py's `representative` model, each layer standing for the real layers of its kind),
placed by the mesh's axis rules. The activations come from tracing the real loss: the
residuals `jax.vjp` keeps for the backward pass (under compute.remat, through the custom
kernels: the chunked head loss, the attention kernel, the MoE dispatch) are read off the
traced program's shapes, per block and for the rest of the model; a layer's residuals are the
same whatever its depth, so the traced small model scales to the real one. What XLA adds on
top while the backward runs (a block's recomputed activations under remat, cotangents, the
optimizer's update) is estimated from the same shapes; tests/test_memory_plan.py holds the
total to XLA's own memory analysis of the compiled step.

Shapes: B microbatch rows per device, L length, D model width.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math
import re

GB = 1e9
QUANTIZED_BASES = ("int8", "nf4")
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
            return f"does not fit: {used}; no remat, microbatch, nf4 base or fsdp change fits"
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


def parse_bytes(text: str) -> float:
    """'24GB', '80GiB', '512MB', '1.5e9' -> bytes. Raises ValueError."""
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", text, re.IGNORECASE)
    if not match:
        raise ValueError(f"--device_memory={text!r} is not a size; write it like 24GB or 80GiB")
    unit = (match.group(2) or "B").upper().rstrip("B")
    power = " KMGT".index(unit[0]) if unit else 0
    return float(match.group(1)) * (1024 if unit.endswith("I") else 1000) ** power


def quantized_bytes(shape, scheme: str) -> int:
    """Stored bytes of a weight [..., I, O] quantized by `scheme` (the contraction axis I)."""
    *lead, d_in, d_out = shape
    if scheme == "int8":
        one = d_in * d_out + 4 * d_out
    else:  # nf4: packed codes, int8 absmax per 64 inputs, float32 second-level scales, offset
        second = 256 if d_out % 256 == 0 else d_out
        one = d_in * d_out // 2 + d_in // 64 * d_out + 4 * (d_in // 64) * (d_out // second) + 4
    return math.prod(lead) * one


def _base_quant(config) -> str:
    return getattr(config.lora, "base_quant", "none")


def _full_precision(config):
    """`config` with the base stored in its param_dtype (shapes the formulas apply to)."""
    if _base_quant(config) == "none":
        return config
    return dataclasses.replace(config, lora=dataclasses.replace(config.lora, base_quant="none"))


def _quantized(path: tuple[str, ...]) -> bool:
    """Whether a base weight is stored quantized: Linear kernels but the head's and routers',
    and the routed experts' weights."""
    if path[-1] == "kernel":
        return len(path) < 2 or path[-2] not in ("head", "gate")
    return len(path) >= 2 and path[-2] == "moe" and path[-1] in ("w1", "w2", "w3")


def batch_ways(config, mesh_sizes) -> int:
    from minids_jax.config.run import as_axes

    return math.prod(mesh_sizes[a] for a in as_axes(dict(config.mesh.axis_rules).get("batch")))


def scanned_layers(cfg, compute) -> set[int]:
    """The layers model/scan.py runs inside a lax.scan (their kinds repeat in units of P)."""
    if not compute.scan_layers:
        return set()
    kinds = [(cfg.attention_kind(i), cfg.is_moe_layer(i)) for i in range(cfg.n_layers)]
    period, found, i = len(cfg.attn_pattern), set(), 0
    while i < len(kinds):
        unit, repeats = kinds[i:i + period], 1
        while len(unit) == period and kinds[i + repeats * period:i + (repeats + 1) * period] == unit:
            repeats += 1
        if repeats >= max(compute.scan_min_repeats, 2):
            found.update(range(i, i + repeats * period))
            i += repeats * period
        else:
            i += 1
    return found


def _names(path) -> tuple[str, ...]:
    keys = (getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))) for k in path)
    return tuple(str(k) for k in keys if str(k) != "value")


def _residual_bytes(fn, diff, frozen, counted_inputs: int = 0) -> int:
    """Bytes of what `jax.vjp(fn)` keeps for the backward pass, traced, never run: every
    residual but the inputs (parameters, batch), except the first `counted_inputs` leaves of
    `diff` (a block's input activation, which the block keeps)."""
    import jax
    from jax.extend.core import Literal

    closed, shapes = jax.make_jaxpr(lambda d, f: jax.vjp(lambda d: fn(d, f), d),
                                    return_shape=True)(diff, frozen)
    jaxpr, n_residuals = closed.jaxpr, len(jax.tree.leaves(shapes[1]))
    skip, total = set(jaxpr.invars[counted_inputs:]) | set(jaxpr.constvars), 0
    for var in jaxpr.outvars[len(jaxpr.outvars) - n_residuals:]:
        if isinstance(var, Literal) or var in skip:
            continue
        skip.add(var)
        total += var.aval.size * var.aval.dtype.itemsize
    return total


@contextlib.contextmanager
def _flash_attention_stand_in():
    """cuDNN's flash attention traced where cuDNN is absent (planning a GPU run on a CPU): a
    stand-in that keeps what it keeps, q, k, v, the output and a float32 softmax statistic
    per query and head, not the [L, L] probabilities of the other kernels."""
    from unittest import mock

    import jax
    import jax.numpy as jnp

    original = jax.nn.dot_product_attention

    @jax.custom_vjp
    def flash(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh):
        return flash_fwd(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh)[0]

    def flash_fwd(q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh):
        out_BxQxHxDh = q_BxQxHxDh[..., :1] * jnp.mean(v_BxSxHxDh, axis=1, keepdims=True)
        stats_BxQxH = jnp.sum(q_BxQxHxDh.astype(jnp.float32), -1) + jnp.sum(k_BxSxHxDh[:, :1])
        return out_BxQxHxDh, (q_BxQxHxDh, k_BxSxHxDh, v_BxSxHxDh, out_BxQxHxDh, stats_BxQxH)

    def flash_bwd(residuals, _):
        return tuple(jnp.zeros_like(a) for a in residuals[:3])

    flash.defvjp(flash_fwd, flash_bwd)

    def stand_in(query, key, value, *args, implementation=None, **kwargs):
        if implementation != "cudnn":
            return original(query, key, value, *args, implementation=implementation, **kwargs)
        return flash(query, key, value)

    with mock.patch.object(jax.nn, "dot_product_attention", stand_in):
        yield


def _activations(config, small, layer_of, platform: str, rows: int) -> tuple[float, float]:
    """(bytes kept for the backward pass by one microbatch of `rows` sequences, bytes one
    block's backward recomputes under compute.remat), from the traced loss of the `small`
    model (scan off: each layer on its own) scaled by the real layers of each kind."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minids_jax import kernels
    from minids_jax.model import build, lora
    from minids_jax.model.scan import REMAT_POLICIES
    from minids_jax.training import loss as loss_lib

    cfg, remat = config.model, config.compute.remat
    traced = dataclasses.replace(_full_precision(config), model=small, compute=dataclasses.replace(
        config.compute, scan_layers=False))
    with nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build(traced, platform, nnx.Rngs(0)))
    trainable, dtype = lora.trainable(config.lora), jnp.dtype(config.compute.dtype)
    tokens = jax.ShapeDtypeStruct((rows, cfg.max_seq_len), jnp.int32)
    batch = {"inputs": tokens, "targets": tokens,
             "weights": jax.ShapeDtypeStruct(tokens.shape, jnp.float32)}
    chunk = loss_lib.loss_chunk(rows, cfg.max_seq_len, cfg.vocab_size, platform)
    coefs = (config.train.aux_loss_coef, config.train.sequence_aux_loss_coef,
             config.train.mtp_loss_coef)
    graphdef, diff, frozen = nnx.split(model, trainable, ...)

    def loss(d, f):
        return loss_lib.total_loss(nnx.merge(graphdef, d, f[0]), f[1], chunk, *coefs)[0]

    def block_bytes(block, policy: str) -> int:
        block_graphdef, block_diff, block_frozen = nnx.split(block, trainable, ...)

        def apply(x_BxLxD, d, f, positions_BxL, scored_BxL):
            out_BxLxD, stats, _ = nnx.merge(block_graphdef, d, f)(
                x_BxLxD, positions_BxL, None, None, None, scored_BxL)
            return out_BxLxD, stats

        if policy != "none":
            apply = jax.checkpoint(apply, policy=REMAT_POLICIES[policy])
        x_BxLxD = jax.ShapeDtypeStruct((*tokens.shape, cfg.d_model), dtype)
        extra = (tokens, jax.ShapeDtypeStruct(tokens.shape, jnp.bool_))
        return _residual_bytes(lambda d, f: apply(d[0], d[1], f[0], *f[1:]),
                               (x_BxLxD, block_diff), (block_frozen, *extra), counted_inputs=1)

    cudnn = kernels.resolve(config.compute, platform).attention_kernel == "cudnn"
    stand_in = (_flash_attention_stand_in() if cudnn and jax.default_backend() != "gpu"
                else contextlib.nullcontext())
    with stand_in:
        whole = _residual_bytes(loss, diff, (frozen, batch))
        kept = [block_bytes(block, remat) for block in model.blocks]
        full = [block_bytes(block, "none") for block in model.blocks] if remat != "none" \
            else kept
    real = whole - sum(kept) + sum(kept[j] for j in layer_of)
    return float(real), float(max(full))


def _optimizer_bytes(name: str, path: tuple[str, ...], shape, nbytes: float) -> float:
    """Optimizer state of one trainable leaf (training/optim.py's optax chains)."""
    from minids_jax.training.optim import NO_DECAY_NAMES

    matrix = len(shape) >= 2 and not set(path) & set(NO_DECAY_NAMES)
    if name == "adafactor" and len(shape) >= 2 and min(shape[-2:]) >= 128:
        return nbytes * (1 / shape[-1] + 1 / shape[-2]) * 4 / (nbytes / math.prod(shape))
    return nbytes * {"adamw": 2, "lion": 1, "adafactor": 1}.get(name, 1 if matrix else 2)


def _state(config, n_devices: int, platform: str, quant: str) -> dict:
    """Per-device bytes of the parameters (by dtype), gradients, optimizer state, the scanned
    layers' stacked copies, and the largest transient weight; from abstract shapes."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minids_jax import sharding
    from minids_jax.config.run import as_axes
    from minids_jax.inspect import representative
    from minids_jax.model import build, lora

    cfg = config.model
    small, layer_of = representative(cfg)
    if any("blocks" in target for target in config.lora.targets):  # targets naming layers
        small, layer_of = cfg, list(range(cfg.n_layers))
    copies = collections.Counter(layer_of)
    scanned = collections.Counter(layer_of[i] for i in scanned_layers(cfg, config.compute))
    built = dataclasses.replace(_full_precision(config), model=small)
    with nnx.logical_axis_rules(config.mesh.axis_rules), nnx.use_eager_sharding(False):
        model = nnx.eval_shape(lambda: build(built, platform, nnx.Rngs(0)))
        state = nnx.state(model)
        specs = nnx.get_partition_spec(state)
        trains = {_names(p) for p, _ in jax.tree_util.tree_leaves_with_path(
            nnx.state(model, lora.trainable(config.lora)))}
    mesh_sizes = sharding.resolve_axis_sizes(config.mesh, n_devices)
    compute_size = jnp.dtype(config.compute.dtype).itemsize
    out = collections.defaultdict(float)
    by_dtype, trainable, largest = collections.defaultdict(float), 0, collections.Counter()
    for (path, leaf), spec in zip(jax.tree_util.tree_leaves_with_path(state), jax.tree.leaves(
            specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))):
        if not hasattr(leaf, "shape"):
            continue
        names, size = _names(path), math.prod(leaf.shape)
        block = int(names[1]) if names[0] == "blocks" else None
        n = copies[block] if block is not None else 1
        ways = math.prod(math.prod(mesh_sizes[a] for a in as_axes(axes)) for axes in spec)
        stored = size * leaf.dtype.itemsize
        dtype = str(leaf.dtype)
        if quant != "none" and names not in trains and not lora.is_adapter(names[-1]) \
                and _quantized(names):
            stored, dtype = quantized_bytes(leaf.shape, quant), quant
            # dequantized for its matmul, one projection (or one layer's experts) at a time
            largest[names[:-1] if names[-2] == "moe" else names] += size * compute_size
        by_dtype[dtype] += n * stored / ways
        if block is not None:
            out["stacked"] += scanned[block] * stored / ways
        if names in trains:
            trainable += n * size
            grad = size * leaf.dtype.itemsize / ways
            out["gradients"] += n * grad + scanned[block] * grad * (block is not None)
            out["optimizer"] += n * _optimizer_bytes(config.optim.name, names, leaf.shape, grad)
            out["accumulation"] += n * size * 4 / ways * (config.train.grad_accum_steps > 1)
    return dict(out, by_dtype=dict(by_dtype), trainable=trainable, small=small,
                layer_of=layer_of, mesh=mesh_sizes, dequantized=max(largest.values(), default=0))



def kv_cache_bytes(config, batch: int = 1) -> float:
    """The generation cache of `batch` sequences of model.max_seq_len, in the compute dtype
    (attention.py, mhla.py, mla.py `init_cache`): MHA keeps the keys and values of its
    key-value heads per slot, MHLA those and its latents' (twice: latent self, write), MLA
    the latent and the shared RoPE key."""
    import jax.numpy as jnp

    cfg, total = config.model, 0
    for i in range(cfg.n_layers):
        kind, heads = cfg.attention_kind(i), 2 * cfg.n_kv_heads * cfg.head_dim
        total += {"mha": heads * cfg.max_seq_len,
                  "mhla": heads * (cfg.max_seq_len + 2 * cfg.latent_k),
                  "mla": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.max_seq_len}[kind]
    return float(batch * total * jnp.dtype(config.compute.dtype).itemsize)


def plan(config, n_devices: int = 1, device_bytes: float | None = None,
         platform: str | None = None, suggest: bool = True,
         base_quant: str | None = None) -> MemoryPlan:
    """The memory plan of `config`'s train step on each of `n_devices` devices of `platform`
    (default: JAX's backend here), judged against `device_bytes` if given; `base_quant`
    overrides lora.base_quant. Raises ConfigError if the mesh does not fit `n_devices`."""
    import jax

    platform = platform or jax.default_backend()
    state = _state(config, n_devices, platform, base_quant or _base_quant(config))
    accum, length = config.train.grad_accum_steps, config.model.max_seq_len
    device_rows = max(1, config.train.batch_size // batch_ways(config, state["mesh"]))
    kept, block = _activations(config, state["small"], state["layer_of"], platform,
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
    result = MemoryPlan(parts, state["by_dtype"], state["trainable"], kv_cache_bytes(config),
                        device_bytes)
    if suggest and result.fits is False:
        result.fix, result.fix_total = _cheapest_fix(config, n_devices, device_bytes, platform)
    return result



def with_overrides(config, overrides: dict):
    """`config` with {'group.field': value} applied (lora.base_quant aside: see `plan`)."""
    groups = collections.defaultdict(dict)
    for key, value in overrides.items():
        group, field = key.split(".")
        groups[group][field] = value
    return dataclasses.replace(config, **{group: dataclasses.replace(getattr(config, group),
                                                                     **fields)
                                          for group, fields in groups.items()})


def _candidates(config, n_devices: int, changes: tuple[str, ...]):
    """Overrides to try, cheapest first, each keeping the ones before it: remat='full', then
    more microbatches (each a divisor of a device's rows), an nf4 base (LoRA runs), more
    fsdp (each a divisor of the devices, data taking the rest)."""
    from minids_jax import sharding

    overrides = {}
    if "remat" in changes and config.compute.remat != "full":
        overrides["compute.remat"] = "full"
        yield dict(overrides)
    mesh = sharding.resolve_axis_sizes(config.mesh, n_devices)
    rows = config.train.batch_size // batch_ways(config, mesh)
    if "accum" in changes:
        for accum in range(config.train.grad_accum_steps + 1, rows + 1):
            if rows % accum == 0:
                overrides["train.grad_accum_steps"] = accum
                yield dict(overrides)
    if "nf4" in changes and config.lora.rank and _base_quant(config) != "nf4":
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
    from minids_jax.config import ConfigError

    has_quant = "base_quant" in {f.name for f in dataclasses.fields(config.lora)}

    def total_if_fits(overrides):
        applied = dict(overrides)
        quant = None if has_quant else applied.pop("lora.base_quant", None)
        try:
            tried = plan(with_overrides(config, applied), n_devices, device_bytes, platform,
                         suggest=False, base_quant=quant)
        except ConfigError:  # e.g. a batch the new mesh cannot split
            return None
        return tried.total if tried.fits else None

    for overrides in _candidates(config, n_devices, changes):
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
    return _search(config, n_devices, device_bytes, platform, ("remat", "accum", "nf4", "fsdp"))


def fitting(config, n_devices: int, device_bytes: float,
            platform: str | None = None) -> dict | None:
    """The compute.remat and train.grad_accum_steps overrides under which the train step
    fits `device_bytes` ({} if it fits as it is), or None if none does."""
    if plan(config, n_devices, device_bytes, platform, suggest=False).fits:
        return {}
    return _search(config, n_devices, device_bytes, platform, ("remat", "accum"))[0]
