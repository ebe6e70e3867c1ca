"""FLOPs per token, counted from the config, and the peak FLOP/s they are measured against.

MFU = tokens/s * train_flops_per_token / (peak FLOP/s per device * devices).

Counted (a multiply-add is 2 FLOPs, training = forward + backward = 3 x forward):
  - every matmul a token passes through, with only its top_k experts (not all n_experts);
  - MHLA's per-latent projections (read q/out, latent self, write k/v), shared by the
    max_seq_len / latent_k tokens of a segment;
  - attention scores and weighted sums over the positions a query may see under the causal
    masks (on average (L+1)/2 for MHA; latents and segments for MHLA), i.e. the useful work,
    not what a kernel that ignores the mask computes;
  - the output head; not the embedding lookup, norms, softmax or the router's softmax.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from minids_jax.config import ModelConfig

# Dense bf16/fp16 tensor-core peaks per device, from the vendors' data sheets. Devices not
# listed, and float32 compute, are measured instead (see `peak_flops_per_device`).
PEAK_BF16_FLOPS = {
    "H100 PCIe": 756e12,
    "H100": 989e12,  # SXM / HBM3
    "H200": 989e12,
    "GH200": 989e12,
    "A100": 312e12,
}


def flops_breakdown(cfg: ModelConfig) -> dict[str, float]:
    """Forward FLOPs per token of a full max_seq_len sequence, by part, summed over layers;
    `mtp` is the multi-token-prediction modules' whole work (projection, block, head)."""
    d = cfg.d_model
    parts = dict.fromkeys(("attention_projections", "attention_scores", "experts", "router",
                           "head", "mtp"), 0.0)
    for layer in range(cfg.n_layers):
        _add_layer(cfg, layer, parts)
    parts["head"] = 2 * d * cfg.vocab_size
    for depth in range(1, cfg.mtp_depth + 1):
        module = dict.fromkeys(parts, 0.0)
        _add_layer(cfg, cfg.n_layers + depth - 1, module)
        parts["mtp"] += sum(module.values()) + 2 * (2 * d) * d + parts["head"]  # + proj, head
    return {name: float(value) for name, value in parts.items()}


def _add_layer(cfg: ModelConfig, layer: int, parts: dict[str, float]) -> None:
    """Adds one block's forward FLOPs per token to `parts`."""
    d, length, k_lat = cfg.d_model, cfg.max_seq_len, cfg.latent_k
    kind = cfg.attention_kind(layer)
    if kind == "mha":
        queries, keys = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
        parts["attention_projections"] += 2 * d * (2 * queries + 2 * keys)  # q, out; k, v
        parts["attention_scores"] += 2 * 2 * queries * (length + 1) / 2  # q.k and p.v, causal
    elif kind == "mla":
        heads, query_dims = cfg.n_heads, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        rank = cfg.kv_lora_rank
        query = (d * cfg.q_lora_rank + cfg.q_lora_rank * heads * query_dims
                 if cfg.q_lora_rank else d * heads * query_dims)
        parts["attention_projections"] += 2 * (
            query + d * (rank + cfg.qk_rope_head_dim)  # q; kv_down
            + rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)  # kv_up
            + heads * cfg.v_head_dim * d)  # out
        parts["attention_scores"] += 2 * heads * (query_dims + cfg.v_head_dim) * (
            length + 1) / 2
    else:
        segment = length // k_lat
        ends_K = (np.arange(k_lat) + 1) * segment
        # Per token: read k, v and write q, out. Per latent: read q, out; latent-self
        # q, k, v, out; write k, v.
        parts["attention_projections"] += 2 * d * d * (4 + 8 * k_lat / length)
        read_keys = ends_K.sum()  # latent j reads positions < e_j
        self_keys = k_lat * (k_lat + 1) / 2  # latent j attends to latents <= j
        write_keys = np.sum((np.arange(length) + 1) // segment)  # position i: e_j <= i+1
        parts["attention_scores"] += 2 * 2 * d * (read_keys + self_keys + write_keys) / length
    if not cfg.is_moe_layer(layer):
        parts["experts"] += 3 * 2 * d * cfg.dense_mlp_dim  # the dense SwiGLU
        return
    # w1, w2, w3 of each routed expert a token goes to, and of the shared ones
    active = cfg.top_k + cfg.n_shared_experts
    parts["experts"] += active * 3 * 2 * d * cfg.expert_hidden_dim
    parts["router"] += 2 * d * cfg.n_experts


def forward_flops_per_token(cfg: ModelConfig) -> float:
    return sum(flops_breakdown(cfg).values())


def train_flops_per_token(cfg: ModelConfig, frozen_base: bool = False) -> float:
    """Forward plus backward: twice the forward (gradients for activations and weights), or
    once with a `frozen_base` (LoRA: no weight gradients but the adapters', left out here as
    a rank's worth of work)."""
    return (2 if frozen_base else 3) * forward_flops_per_token(cfg)


def measure_matmul_flops(dtype: str = "float32", size: int | None = None,
                         device: jax.Device | None = None, repeats: int = 5) -> float:
    """FLOP/s of one square matmul on `device` in `dtype`: what this device attains at best."""
    device = device or jax.devices()[0]
    size = size or (8192 if device.platform == "gpu" else 1024)
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()  # compile
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_flops_per_device(dtype: str, configured: float = 0.0,
                          device: jax.Device | None = None) -> tuple[float, str]:
    """(peak FLOP/s, where it came from): the configured value if > 0, the data sheet for
    known GPUs computing in bf16/fp16, else a quick matmul measurement on this device."""
    if configured > 0:
        return configured, "config train.peak_flops"
    device = device or jax.devices()[0]
    if dtype in ("bfloat16", "float16"):
        for name, peak in PEAK_BF16_FLOPS.items():  # most specific names first
            if name in device.device_kind:
                return peak, f"data sheet ({device.device_kind})"
    return measure_matmul_flops(dtype, device=device), f"measured matmul ({device.device_kind})"
