"""Custom-VJP and blocked kernels, one file each, and the choice of kernel per platform.

`resolve` turns the config's platform-dependent names (`auto` attention, `dropless` MoE
dispatch) into concrete ones once, when a trainer, generator or `load()` is set up for a mesh;
the model is built with concrete names and never looks at the ambient mesh to choose.
"""

from __future__ import annotations

import dataclasses

from minids_jax.config import ComputeConfig

# The fastest exact kernel per platform (docs/performance.md has the measurements).
AUTO_ATTENTION = {"cpu": "fused"}  # elsewhere: dot_product_attention (XLA's) or cudnn
HALF_DTYPES = ("bfloat16", "float16")  # what cuDNN's flash attention takes
DROPLESS_DISPATCH = {"cpu": "blocked"}  # elsewhere: ragged (jax.lax.ragged_dot)
# compute.scan_min_repeats=0: on a CPU a scan's copies (each layer's weights stacked, its saved
# activations written into stacked buffers and read back) cost up to a quarter of the step
# (docs/scale.md), so only runs long enough for the compile time to matter are scanned there.
SCAN_MIN_REPEATS = {"cpu": 8}  # elsewhere 4


def exact_dispatch(platform: str) -> str:
    """The dropless MoE dispatch for `platform`: nothing dropped, same output as `dense`."""
    return DROPLESS_DISPATCH.get(platform, "ragged")


def resolve(compute: ComputeConfig, platform: str) -> ComputeConfig:
    """`compute` with `auto` and `dropless` replaced by the kernels for `platform`, and the
    platform's shortest scanned run where scan_min_repeats is 0."""
    attention = compute.attention_kernel
    if attention == "auto":
        half = platform == "gpu" and compute.dtype in HALF_DTYPES
        attention = AUTO_ATTENTION.get(platform, "cudnn" if half else "dot_product_attention")
    dispatch = compute.moe_dispatch
    if dispatch == "dropless":
        dispatch = exact_dispatch(platform)
    return dataclasses.replace(compute, attention_kernel=attention, moe_dispatch=dispatch,
                               scan_min_repeats=(compute.scan_min_repeats
                                                 or SCAN_MIN_REPEATS.get(platform, 4)))

