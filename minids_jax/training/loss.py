"""The training loss: next-token cross-entropy in float32 over weighted positions, plus the
MoE balancing terms and the multi-token-prediction loss.

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
from minids_jax.model.mtp import mtp_chain, shift_left, with_more_moe_layers


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


def ahead_weights(batch: dict[str, jax.Array], k: int) -> jax.Array:
    """The weight of position i's target k further on, targets[i + k]: weights[i + k], 0 past
    the window and, in a document-masked batch, past position i's document."""
    weights_BxL = shift_left(batch["weights"].astype(jnp.float32), k)
    if "segments" not in batch or not k:
        return weights_BxL
    return weights_BxL * (shift_left(batch["segments"], k, -1) == batch["segments"])


def denominators(batch: dict[str, jax.Array], mtp_depth: int) -> jax.Array:
    """[1 + mtp_depth]: the weight each loss is a mean over (the cross-entropy's, then MTP
    module k's, whose targets are k further on). Given to `model_loss` of a part of the batch,
    they make its losses that part's share of the whole batch's."""
    totals = [jnp.sum(ahead_weights(batch, k)) for k in range(mtp_depth + 1)]
    return jnp.maximum(jnp.stack(totals), 1.0)


def _head_loss(model: MiniDeepSeek, features_BxLxD, targets_BxL, weights_BxL, chunk: int,
               denominator):
    features_BxLxD, kernel_DxV = model.head_matmul(features_BxLxD)
    loss_sum = head_cross_entropy(features_BxLxD, kernel_DxV.astype(features_BxLxD.dtype),
                                  targets_BxL, weights_BxL, chunk)
    return loss_sum / denominator


def model_loss(model: MiniDeepSeek, batch: dict[str, jax.Array], chunk: int,
               with_mtp: bool = True, denominators_K: jax.Array | None = None):
    """`cross_entropy(model(inputs).logits, targets, weights)` and aux, the head fused in.

    With multi-token prediction (and `with_mtp`), aux["mtp_loss"] is the mean over the
    modules of module k's loss: its features at i score targets[i + k] (the token k + 1
    ahead), weighted by `ahead_weights` (nothing past the window or the document); the
    modules' MoE layers join the balancing statistics (the last rows of expert_load_NxE).
    Each loss is a weighted sum over `denominators_K` (default: this batch's `denominators`).
    The balancing statistics of each MoE layer count the positions its loss scores (weight
    > 0): padding moves neither the expert loads nor the balance losses.
    """
    segments_BxL = batch.get("segments")  # a document-masked batch (sources.py)
    depth = len(model.mtp) if model.mtp is not None and with_mtp else 0
    weights = [ahead_weights(batch, k) for k in range(depth + 1)]  # [B, L] of each loss
    trunk_BxLxD, aux, _ = model.trunk(batch["inputs"], batch.get("positions"),
                                      segments_BxL=segments_BxL, scored_BxL=weights[0] > 0)
    if denominators_K is None:
        denominators_K = denominators(batch, depth)
    features_BxLxD = model.final_norm(trunk_BxLxD)
    ce = _head_loss(model, features_BxLxD, batch["targets"], weights[0], chunk,
                    denominators_K[0])
    if depth:
        positions_BxL = batch.get("positions", jnp.broadcast_to(
            jnp.arange(trunk_BxLxD.shape[1]), batch["inputs"].shape))
        features, mtp_stats = mtp_chain(model.mtp, model.embed, batch["inputs"],
                                        features_BxLxD, positions_BxL, segments_BxL,
                                        scored=[w > 0 for w in weights[1:]])
        losses = [_head_loss(model, features_BxLxD, shift_left(batch["targets"], k),
                             weights[k], chunk, denominators_K[k])
                  for k, features_BxLxD in enumerate(features, start=1)]
        aux = {**with_more_moe_layers(aux, mtp_stats), "mtp_loss": jnp.mean(jnp.stack(losses))}
    return ce, aux


def total_loss(model: MiniDeepSeek, batch: dict[str, jax.Array], chunk: int,
               aux_loss_coef: float, sequence_aux_loss_coef: float = 0.0,
               mtp_loss_coef: float = 0.0, denominators_K: jax.Array | None = None,
               microbatches: int = 1):
    """The loss the optimizer minimizes, and (cross-entropy, aux) for the metrics. For one of
    `microbatches` parts of a batch (with the whole batch's `denominators_K`), the part's
    share: the parts' losses, and so their gradients, add up to the whole batch's (the
    balancing terms, statistics of each part, are averaged over the parts).

    The balance losses are summed over the MoE layers (the MTP modules' included), each
    weighted by its coefficient, as DeepSeek's code adds every layer's alpha-weighted loss:
    the paper's alpha is the coefficient itself. aux holds their per-layer means."""
    ce, aux = model_loss(model, batch, chunk, denominators_K=denominators_K)
    moe_layers = aux["expert_load_NxE"].shape[0]
    balance = moe_layers * (aux_loss_coef * aux["aux_loss"]
                            + sequence_aux_loss_coef * aux["sequence_aux_loss"])
    return (ce + balance / microbatches + mtp_loss_coef * aux.get("mtp_loss", 0.0),
            (ce, aux))
