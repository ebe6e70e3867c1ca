"""A quantized frozen base for LoRA (lora.base_quant): int8 per output channel, or QLoRA's NF4.

    stored = quantize(kernel_IxO, "nf4")                 # {codes, absmax, ...}: the arrays
    weight = QuantizedWeight(stored, "nf4", axes, shape, dtype)   # a frozen projection's
    weight[...]                                          # the dequantized array
    quantized_matmul(x_NxI, weight, dtype)               # x @ weight, nothing kept whole

int8: one float32 scale per output channel (absmax / 127) and int8 values.
NF4 (Dettmers et al., 2023): blocks of 64 consecutive inputs of each output channel (as
bitsandbytes blocks a torch [out, in] weight), each scaled by its absolute maximum onto the
16 NormalFloat levels (two 4-bit codes per byte, along the input axis); the blocks' absmax
values are themselves quantized ("double quantization"): centred, in int8 codes
with one float32 scale per 256 of them along the output axis (per row when the output width
is no multiple of 256). bitsandbytes stores those second-level codes in its 8-bit dynamic
float format; the linear int8 codes here take the same 8 bits, and their error is bounded in
the tests. That is 4.127 bits per weight.

Every array keeps the weight's rank and logical axes, its input axis shortened (I/2 codes,
I/64 absmax), so the quantized form shards exactly like the weight. Reading `weight[...]`
dequantizes in float32 and returns the weight's original dtype; `quantized_matmul` and the MoE
dispatch dequantize inside a rematerialized region, so no full-precision copy of a weight
outlives the matmul that uses it (the backward pass dequantizes again).

Shapes: I in, O out, and any leading axes (E experts) before them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

NF4_BLOCK = 64
SCALE_BLOCK = 256  # absmax values per second-level scale (QLoRA's)
# The 16 NormalFloat levels (QLoRA, appendix E; bitsandbytes' NF4 table).
NF4_LEVELS = np.array([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0], np.float32)
STORED_NAMES = ("values", "value_scale", "codes", "absmax", "absmax_scale", "absmax_offset")


class QuantizedBase(nnx.Variable):
    """An array of a quantized frozen weight: model state, never trained, saved with it."""


def scale_block(d_out: int) -> int:
    """Absmax values per second-level scale: 256 along the output axis, else the whole row."""
    return SCALE_BLOCK if d_out % SCALE_BLOCK == 0 else d_out


def _int8(weight: jax.Array) -> dict[str, jax.Array]:
    w = weight.astype(jnp.float32)
    scale = jnp.max(jnp.abs(w), axis=-2, keepdims=True) / 127.0
    safe = jnp.where(scale > 0, scale, 1.0)
    return {"values": jnp.clip(jnp.round(w / safe), -127, 127).astype(jnp.int8),
            "value_scale": scale}


def _nf4(weight: jax.Array) -> dict[str, jax.Array]:
    *lead, d_in, d_out = weight.shape
    w = weight.astype(jnp.float32).reshape(*lead, d_in // NF4_BLOCK, NF4_BLOCK, d_out)
    absmax = jnp.max(jnp.abs(w), axis=-2)  # [..., I/64, O]
    normed = w / jnp.where(absmax > 0, absmax, 1.0)[..., None, :]
    # The nearest level: how many midpoints between neighbouring levels lie below the value
    # (15 compares that XLA fuses, instead of a [..., 16] distance table).
    midpoints = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2
    codes = sum((normed > m).astype(jnp.uint8) for m in midpoints.tolist())
    codes = codes.reshape(*lead, d_in // 2, 2, d_out)
    packed = (codes[..., 0, :] << 4) | codes[..., 1, :]
    # Double quantization: absmax - offset in int8, a float32 scale per block of them. The
    # offset is the middle of their range where QLoRA takes their mean: it centres them as
    # well, and needs no sum, whose rounding would depend on how the weight is split over
    # devices (one code in ten thousand moved between fsdp=8 and one device).
    offset = (jnp.max(absmax, axis=(-2, -1), keepdims=True)
              + jnp.min(absmax, axis=(-2, -1), keepdims=True)) / 2
    block = scale_block(d_out)
    centred = (absmax - offset).reshape(*lead, d_in // NF4_BLOCK, d_out // block, block)
    scale = jnp.max(jnp.abs(centred), axis=-1) / 127.0  # [..., I/64, O/B]
    safe = jnp.where(scale > 0, scale, 1.0)[..., None]
    absmax_codes = jnp.clip(jnp.round(centred / safe), -127, 127).astype(jnp.int8)
    return {"codes": packed.astype(jnp.uint8),
            "absmax": absmax_codes.reshape(*lead, d_in // NF4_BLOCK, d_out),
            "absmax_scale": scale, "absmax_offset": offset}


def quantize(weight: jax.Array, kind: str) -> dict[str, jax.Array]:
    """The quantized arrays of `weight` ([..., I, O]) as `kind` stores them."""
    return {"int8": _int8, "nf4": _nf4}[kind](weight)


def random(key: jax.Array, shape: tuple[int, ...], kind: str, std: float) -> dict[str, jax.Array]:
    """The stored arrays of a random weight of `shape` with standard deviation `std`, drawn
    as codes: a model built with a quantized base never holds its full-precision random
    weights (all of them at once, while the initialization runs, would be the largest
    allocation of a QLoRA run). Uniform int8 values; uniform NF4 codes (each NF4 level is
    equally likely for normal weights: the levels are its quantiles) under one block maximum."""
    *lead, d_in, d_out = shape
    if kind == "int8":
        values = jax.random.randint(key, shape, -127, 128, jnp.int32).astype(jnp.int8)
        step = std * np.sqrt(3.0) / 127  # a uniform [-127, 127] step: the std asked for
        return {"values": values, "value_scale": jnp.full((*lead, 1, d_out), step, jnp.float32)}
    codes = jax.random.randint(key, (*lead, d_in // 2, d_out), 0, 256, jnp.int32)
    level_rms = float(np.sqrt(np.mean(NF4_LEVELS ** 2)))
    return {"codes": codes.astype(jnp.uint8),
            "absmax": jnp.zeros((*lead, d_in // NF4_BLOCK, d_out), jnp.int8),
            "absmax_scale": jnp.zeros((*lead, d_in // NF4_BLOCK, d_out // scale_block(d_out)),
                                      jnp.float32),
            "absmax_offset": jnp.full((*lead, 1, 1), std / level_rms, jnp.float32)}


def dequantize(arrays: dict[str, jax.Array], dtype) -> jax.Array:
    """The weight `quantize` made `arrays` of, in `dtype` (computed in float32)."""
    if "values" in arrays:
        return (arrays["values"].astype(jnp.float32) * arrays["value_scale"]).astype(dtype)
    packed = arrays["codes"]
    *lead, half_in, d_out = packed.shape
    codes = jnp.stack([packed >> 4, packed & 15], axis=-2).reshape(*lead, 2 * half_in, d_out)
    levels = jnp.asarray(NF4_LEVELS)[codes.astype(jnp.int32)]
    scale = arrays["absmax_scale"]
    per_value = jnp.repeat(scale, d_out // scale.shape[-1], axis=-1)  # [..., I/64, O]
    absmax = arrays["absmax"].astype(jnp.float32) * per_value + arrays["absmax_offset"]
    blocks = levels.reshape(*lead, -1, NF4_BLOCK, d_out) * absmax[..., None, :]
    return blocks.reshape(*lead, 2 * half_in, d_out).astype(dtype)


def full_shape(stored_shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The weight's shape, from its stored arrays' shapes."""
    if "values" in stored_shapes:
        return tuple(stored_shapes["values"])
    *lead, half_in, d_out = stored_shapes["codes"]
    return (*lead, 2 * half_in, d_out)


def stored_axes(kind: str, axes: tuple) -> dict[str, tuple]:
    """The logical axes of each stored array of a weight with logical `axes` (its input axis
    shortened, so it splits the same way; the scales' output blocks replicated)."""
    *lead, axis_in, axis_out = axes
    lead = tuple(lead)
    if kind == "int8":
        return {"values": axes, "value_scale": (*lead, None, axis_out)}
    return {"codes": axes, "absmax": axes, "absmax_scale": (*lead, axis_in, None),
            "absmax_offset": (*lead, None, None)}


def check_shape(kind: str, shape: tuple[int, ...], name: str) -> str | None:
    """Why a weight of `shape` cannot be stored as `kind`, or None."""
    if kind == "nf4" and shape[-2] % NF4_BLOCK:
        return (f"lora.base_quant='nf4' quantizes blocks of {NF4_BLOCK} along each weight's "
                f"input axis, and {name} {tuple(shape)} has {shape[-2]} inputs (not a multiple "
                f"of {NF4_BLOCK}); use lora.base_quant='int8', or widths that are multiples "
                f"of {NF4_BLOCK}.")
    return None


class QuantizedWeight(nnx.Module):
    """A frozen weight stored quantized; `weight[...]` dequantizes it (so code that reads a
    kernel reads this one the same way). `shape` and `dtype` are the full weight's."""

    def __init__(self, arrays: dict[str, jax.Array], kind: str, axes: tuple, shape, dtype):
        self.kind, self.axes = kind, tuple(axes)
        self.shape, self.dtype = tuple(shape), jnp.dtype(dtype)
        for name, array_axes in stored_axes(kind, self.axes).items():
            setattr(self, name, QuantizedBase(arrays[name], out_sharding=array_axes))

    @classmethod
    def drawn(cls, key: jax.Array, shape, dtype, kind: str, axes: tuple) -> "QuantizedWeight":
        """A random weight with lecun_normal's deviation (1 / sqrt(inputs)), as `random`."""
        return cls(random(key, tuple(shape), kind, shape[-2] ** -0.5), kind, axes, shape, dtype)

    def arrays(self) -> dict[str, jax.Array]:
        return {name: getattr(self, name)[...] for name in stored_axes(self.kind, self.axes)}

    def __getitem__(self, index) -> jax.Array:
        return dequantize(self.arrays(), self.dtype)[index]


def is_quantized(weight) -> bool:
    return isinstance(weight, QuantizedWeight)


def quantized_matmul(x_NxI: jax.Array, weight: QuantizedWeight, dtype) -> jax.Array:
    """x @ weight in `dtype`; the dequantized weight is recomputed for the backward pass
    rather than kept (jax.checkpoint keeps only the inputs: x and the quantized arrays)."""
    @jax.checkpoint
    def apply(x, arrays):
        return x @ dequantize(arrays, dtype)

    return apply(x_NxI.astype(dtype), weight.arrays())


def stored_bytes(shape: tuple[int, ...], kind: str) -> int:
    """Bytes `kind` stores a weight of `shape` ([..., I, O]) in."""
    *lead, d_in, d_out = shape
    per = {"int8": d_in * d_out + 4 * d_out,
           "nf4": d_in * d_out // 2 + d_in // NF4_BLOCK * d_out
           + 4 * (d_in // NF4_BLOCK) * (d_out // scale_block(d_out)) + 4}[kind]
    return int(np.prod(lead, dtype=np.int64)) * per
