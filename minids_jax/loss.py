"""The training loss: next-token cross-entropy in float32 over weighted positions, plus the
MoE balancing term.

`targets` are already the next tokens (see sources.py): logits at t score targets[t], with no
further shift here. `model_loss` fuses the head into the cross-entropy (kernels/head_loss.py),
so the [B, L, V] logits never exist at once; `cross_entropy` of the model's logits is its
reference.

Shapes: B batch, L length, D model width, V vocab.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from minids_jax.kernels.head_loss import head_cross_entropy
from minids_jax.model import MiniDeepSeek


def cross_entropy(logits_BxLxV: jax.Array, targets_BxL: jax.Array, weights_BxL: jax.Array):
    """Mean float32 cross-entropy over the weighted positions."""
    losses_BxL = optax.softmax_cross_entropy_with_integer_labels(
        logits_BxLxV.astype(jnp.float32), targets_BxL)
    return jnp.sum(losses_BxL * weights_BxL) / jnp.maximum(jnp.sum(weights_BxL), 1.0)


def loss_chunk(device_batch: int, length: int, vocab: int, platform: str) -> int:
    """Positions per chunk of the fused head + loss, for one device's share of the batch. On a
    CPU a chunk of at least 256 rows and about 2M logits stays in cache (docs/performance.md);
    accelerators take the sequence whole."""
    rows = max(256, (1 << 21) // vocab) if platform == "cpu" else 1 << 16
    return max(1, min(length, rows // max(1, device_batch)))


def model_loss(model: MiniDeepSeek, batch: dict[str, jax.Array], chunk: int):
    """`cross_entropy(model(inputs).logits, targets, weights)` and aux, the head fused in."""
    hidden_BxLxD, aux, _ = model.hidden(batch["inputs"])
    weights_BxL = batch["weights"].astype(jnp.float32)
    kernel_DxV = model.head.kernel[...].astype(hidden_BxLxD.dtype)
    loss_sum = head_cross_entropy(hidden_BxLxD, kernel_DxV, batch["targets"], weights_BxL, chunk)
    return loss_sum / jnp.maximum(jnp.sum(weights_BxL), 1.0), aux


def total_loss(model: MiniDeepSeek, batch: dict[str, jax.Array], chunk: int,
               aux_loss_coef: float, sequence_aux_loss_coef: float = 0.0):
    """The loss the optimizer minimizes, and (cross-entropy, aux) for the metrics."""
    ce, aux = model_loss(model, batch, chunk)
    balance = aux_loss_coef * aux["aux_loss"] + sequence_aux_loss_coef * aux["sequence_aux_loss"]
    return ce + balance, (ce, aux)
