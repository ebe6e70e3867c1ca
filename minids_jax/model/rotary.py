"""Rotary position embedding (RoPE) as DeepSeek-V3's checkpoints use it, with YaRN scaling.

Layout: each head's rotated dims are read as interleaved pairs (x[2i], x[2i+1]) and returned
as halves (out[i], out[Dh/2 + i] are pair i turned), which is Hugging Face's
`rope_interleave=True` and the original's, so published weights need no permutation; q and k
are reordered alike, so q.k is unchanged.

YaRN (arXiv 2309.00071, as in HF `_compute_yarn_parameters` and the official
`precompute_freqs_cis`) stretches a RoPE trained on `original_max_len` positions by `factor`:
frequency j of base_j = theta^(-2j/Dh) becomes base_j/factor * ramp_j + base_j * (1 - ramp_j),
where the ramp climbs from 0 at the dims that turn beta_fast times over the original context to
1 at those that turn beta_slow times. The rotated dims are scaled by the attention factor
mscale(f, mscale) / mscale(f, mscale_all_dim) (1 for DeepSeek-V3), and, as DeepSeek-V3 does,
the softmax scale by mscale(f, mscale_all_dim)^2, where mscale(f, m) = 0.1 m ln f + 1.

`model.rope_scaling` scales the frequencies as transformers' rope types do: 'linear' divides
them by the factor; 'llama3' divides those whose wavelength exceeds original_max_len /
low_freq_factor, keeps those below original_max_len / high_freq_factor, and blends in between.

Shapes: B batch, L length, H heads, Dh rotated width, P pairs (Dh/2).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from minids_jax.config import ModelConfig
from minids_jax.kernels.rope import rotate_pairs


def _mscale(factor: float, mscale: float) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def yarn_inv_freq(dim: int, theta: float, factor: float, original_max_len: int,
                  beta_fast: float, beta_slow: float) -> np.ndarray:
    """The P = dim/2 frequencies of YaRN (float64); plain RoPE's when factor is 1."""
    base_P = theta ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    if factor <= 1:
        return base_P

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times
        return dim * math.log(original_max_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # as the references do: no division by zero
    ramp_P = np.clip((np.arange(dim // 2) - low) / (high - low), 0.0, 1.0)
    return base_P / factor * ramp_P + base_P * (1 - ramp_P)


def llama3_inv_freq(base_P: np.ndarray, factor: float, low_freq_factor: float,
                    high_freq_factor: float, original_max_len: int) -> np.ndarray:
    """Llama 3's frequencies (transformers' `_compute_llama3_parameters`)."""
    wavelength_P = 2 * math.pi / base_P
    blend_P = ((original_max_len / wavelength_P - low_freq_factor)
               / (high_freq_factor - low_freq_factor))
    blended_P = (1 - blend_P) * base_P / factor + blend_P * base_P
    return np.where(wavelength_P > original_max_len / low_freq_factor, base_P / factor,
                    np.where(wavelength_P < original_max_len / high_freq_factor, base_P,
                             blended_P))


def inv_freq(cfg: ModelConfig, dim: int) -> np.ndarray:
    """The P = dim/2 frequencies (float64) of a RoPE over `dim` dims, as the config scales
    them."""
    if cfg.rope_scaling == "linear":
        return yarn_inv_freq(dim, cfg.rope_theta, 1.0, 1, 2.0, 1.0) / cfg.rope_factor
    if cfg.rope_scaling == "llama3":
        return llama3_inv_freq(yarn_inv_freq(dim, cfg.rope_theta, 1.0, 1, 2.0, 1.0),
                               cfg.rope_factor, cfg.rope_low_freq_factor,
                               cfg.rope_high_freq_factor, cfg.rope_original_max_len)
    return yarn_inv_freq(dim, cfg.rope_theta, cfg.rope_yarn_factor, cfg.rope_original_max_len,
                         cfg.rope_beta_fast, cfg.rope_beta_slow)


@dataclasses.dataclass(frozen=True)
class Rope:
    """The rotation of one attention's rotated dims: frequencies and amplitude."""

    inv_freq: tuple[float, ...]  # P frequencies (a tuple: static, hashable)
    amplitude: float = 1.0  # YaRN's attention factor on the rotated dims

    @classmethod
    def of(cls, cfg: ModelConfig, dim: int) -> Rope:
        frequencies = inv_freq(cfg, dim)
        amplitude = 1.0
        if cfg.rope_yarn_factor > 1:
            amplitude = (_mscale(cfg.rope_yarn_factor, cfg.rope_mscale) /
                         _mscale(cfg.rope_yarn_factor, cfg.rope_mscale_all_dim)
                         if cfg.rope_mscale and cfg.rope_mscale_all_dim else
                         _mscale(cfg.rope_yarn_factor, 1.0))
        return cls(tuple(float(f) for f in frequencies), amplitude)

    @classmethod
    def plain(cls, dim: int, theta: float = 10000.0) -> Rope:
        return cls(tuple(float(f) for f in theta ** (-np.arange(0, dim, 2) / dim)))

    def angles(self, positions_BxL: jax.Array) -> jax.Array:
        """Rotation angles [B, L, P]: pair j turns by position * inv_freq[j]."""
        return positions_BxL.astype(jnp.float32)[..., None] * jnp.asarray(self.inv_freq,
                                                                          jnp.float32)

    def __call__(self, x_BxLxHxDh: jax.Array, positions_BxL: jax.Array) -> jax.Array:
        """Turns the interleaved pairs of each head by its position's angles (output: halves)."""
        angles_BxLx1xP = self.angles(positions_BxL)[:, :, None, :]
        return rotate_pairs(x_BxLxHxDh, self.amplitude * jnp.cos(angles_BxLx1xP),
                            self.amplitude * jnp.sin(angles_BxLx1xP))


def softmax_mscale(cfg: ModelConfig) -> float:
    """What YaRN multiplies the softmax scale by (DeepSeek-V3: mscale(f, mscale_all_dim)^2)."""
    if cfg.rope_yarn_factor <= 1 or not cfg.rope_mscale_all_dim:
        return 1.0
    return _mscale(cfg.rope_yarn_factor, cfg.rope_mscale_all_dim) ** 2
