"""What a train step holds on each device, from abstract shapes and a traced program: the
arrays of the state (parameters by dtype, what trains, its gradients and optimizer state, the
scanned layers' stacked copies), the activations the backward pass keeps, and the generation
cache. memory.py adds them up into a plan.

Nothing is allocated or compiled. The state comes from abstract shapes (`nnx.eval_shape` of a
`representative` model, each layer standing for the real layers of its kind), placed by the
mesh's axis rules. The activations come from tracing the real loss: the residuals `jax.vjp`
keeps for the backward pass (under compute.remat, through the custom kernels: the chunked head
loss, the attention kernel, the MoE dispatch, a quantized base's matmuls) are read off the
traced program's shapes, per block and for the rest of the model; a layer's residuals are the
same whatever its depth, so the traced small model scales to the real one.

Shapes: B microbatch rows per device, L length, D model width.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import math

from unittest import mock

import jax
import jax.numpy as jnp
from flax import nnx
from jax.extend.core import Literal

from minids_jax import kernels, sharding
from minids_jax.config.run import as_axes
from minids_jax.model import build, lora, quant
from minids_jax.model.scan import REMAT_POLICIES
from minids_jax.training import loss as loss_lib
from minids_jax.training.optim import NO_DECAY_NAMES


def representative(cfg):
    """(a model config of fewer than 3 * P layers, holding each kind of layer the model has;
    for each real layer, the layer of that config with its shapes). Layers of one kind
    (attention kind, and dense or MoE) have equal shapes, and tracing all 61 of DeepSeek-V3's
    takes a minute: flax updates its RNG counter in a way whose cost grows with the traced
    program. The MTP modules' blocks follow the last layer's kinds, so they stay the same."""
    period = len(cfg.attn_pattern)
    kind = lambda c, i: (c.attention_kind(i), c.is_moe_layer(i))  # noqa: E731
    dense, moe_layers = min(cfg.first_k_dense, period), cfg.n_layers - cfg.first_k_dense
    moe = min(moe_layers, period)
    while moe < moe_layers and (dense + moe - cfg.n_layers) % period:
        moe += 1  # the same layer count mod P: the same kinds of MTP blocks
    small = dataclasses.replace(cfg, first_k_dense=dense, n_layers=dense + moe)
    index = {kind(small, j): j for j in range(small.n_layers)}
    if any(kind(cfg, i) not in index for i in range(cfg.n_layers)) or any(
            kind(cfg, cfg.n_layers + d) != kind(small, small.n_layers + d)
            for d in range(cfg.mtp_depth)):
        return cfg, list(range(cfg.n_layers))  # a kind the small stack lacks: build them all
    return small, [index[kind(cfg, i)] for i in range(cfg.n_layers)]


def batch_ways(config, mesh_sizes) -> int:

    return math.prod(mesh_sizes[a] for a in as_axes(dict(config.mesh.axis_rules).get("batch")))


def scanned_layers(cfg, compute, platform: str) -> set[int]:
    """The layers model/scan.py runs inside a lax.scan on `platform` (their kinds repeat in
    units of P)."""
    compute = kernels.resolve(compute, platform)
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


def activations(config, small, layer_of, platform: str, rows: int) -> tuple[float, float]:
    """(bytes kept for the backward pass by one microbatch of `rows` sequences, bytes one
    block's backward recomputes under compute.remat), from the traced loss of the `small`
    model (scan off: each layer on its own) scaled by the real layers of each kind."""


    cfg, remat = config.model, config.compute.remat
    traced = dataclasses.replace(config, model=small, compute=dataclasses.replace(
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


def optimizer_bytes(name: str, path: tuple[str, ...], shape, nbytes: float) -> float:
    """Optimizer state of one trainable leaf (training/optim.py's optax chains)."""

    matrix = len(shape) >= 2 and not set(path) & set(NO_DECAY_NAMES)
    if name == "adafactor" and len(shape) >= 2 and min(shape[-2:]) >= 128:
        return nbytes * (1 / shape[-1] + 1 / shape[-2]) * 4 / (nbytes / math.prod(shape))
    return nbytes * {"adamw": 2, "lion": 1, "adafactor": 1}.get(name, 1 if matrix else 2)


def state_bytes(config, n_devices: int, platform: str) -> dict:
    """Per-device bytes of the parameters (by dtype), gradients, optimizer state, the scanned
    layers' stacked copies, and the largest transient weight; from abstract shapes."""


    cfg = config.model
    small, layer_of = representative(cfg)
    if any("blocks" in target for target in config.lora.targets):  # targets naming layers
        small, layer_of = cfg, list(range(cfg.n_layers))
    copies = collections.Counter(layer_of)
    scanned = collections.Counter(layer_of[i]
                                  for i in scanned_layers(cfg, config.compute, platform))
    built = dataclasses.replace(config, model=small)
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
        stored, dtype = size * leaf.dtype.itemsize, str(leaf.dtype)
        if names[-1] in quant.STORED_NAMES:  # a frozen weight stored quantized
            dtype = config.lora.base_quant
            if names[-1] in ("codes", "values"):  # dequantized for its matmul, one
                # projection (or one layer's experts) at a time
                full = size * (2 if names[-1] == "codes" else 1)
                largest[names[:-2] if names[-3] == "moe" else names[:-1]] += full * compute_size
        by_dtype[dtype] += n * stored / ways
        if block is not None:
            out["stacked"] += scanned[block] * stored / ways
        if names in trains:
            trainable += n * size
            grad = size * leaf.dtype.itemsize / ways
            out["gradients"] += n * grad + scanned[block] * grad * (block is not None)
            out["optimizer"] += n * optimizer_bytes(config.optim.name, names, leaf.shape, grad)
            out["accumulation"] += n * size * 4 / ways * (config.train.grad_accum_steps > 1)
    return dict(out, by_dtype=dict(by_dtype), trainable=trainable, small=small,
                layer_of=layer_of, mesh=mesh_sizes, dequantized=max(largest.values(), default=0))



def kv_cache_bytes(config, batch: int = 1) -> float:
    """The generation cache of `batch` sequences of model.max_seq_len, in the compute dtype
    (attention.py, mhla.py, mla.py `init_cache`): MHA keeps the keys and values of its
    key-value heads per slot, MHLA those and its latents' (twice: latent self, write), MLA
    the latent and the shared RoPE key."""

    cfg, total = config.model, 0
    for i in range(cfg.n_layers):
        kind, heads = cfg.attention_kind(i), 2 * cfg.n_kv_heads * cfg.head_dim
        total += {"mha": heads * cfg.max_seq_len,
                  "mhla": heads * (cfg.max_seq_len + 2 * cfg.latent_k),
                  "mla": (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.max_seq_len}[kind]
    return float(batch * total * jnp.dtype(config.compute.dtype).itemsize)
