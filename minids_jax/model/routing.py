"""Routing tokens to experts: the original's softmax top-k, and DeepSeek-V3's sigmoid routing
with expert groups and a selection bias.

DeepSeek-V3 (HF `DeepseekV3TopkRouter`, the official `Gate`), all in float32:

    s       = sigmoid(logits)                    the affinities; weights come from these
    biased  = s + bias                           used for selection only
    groups  = the topk_group of n_group groups with the largest sum of their top-2 biased scores
    experts = the top_k biased scores among the kept groups' experts
    weights = s[experts], divided by their sum (norm_topk_prob, for any k as the references
              do), times routed_scaling_factor

With softmax scoring and one group this is the original's router: the top-k probabilities,
renormalized to sum to 1 (norm_topk_prob) only when k > 1 (with k = 1 the weight is p itself,
so the router gets a gradient through the expert output). Ties go to the lower expert index, as
`jax.lax.top_k` breaks them.

Shapes: T tokens, E experts, G groups, K experts per token.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from minids_jax.config import ModelConfig


class Routing(NamedTuple):
    scores_TxE: jax.Array  # softmax probabilities or sigmoid affinities (unbiased)
    weight_TxK: jax.Array  # what each chosen expert's output is multiplied by
    expert_TxK: jax.Array  # int32 expert ids


def kept_groups(biased_TxE: jax.Array, n_group: int, topk_group: int,
                group_score: str = "top2_sum") -> jax.Array:
    """[T, E] True for the experts of each token's `topk_group` best groups, a group scored by
    the sum of its two highest biased scores (DeepSeek-V3) or by its highest (`max`,
    DeepSeek-V2's group_limited_greedy)."""
    tokens, experts = biased_TxE.shape
    grouped_TxGxM = biased_TxE.reshape(tokens, n_group, experts // n_group)
    if group_score == "max":
        group_score_TxG = jnp.max(grouped_TxGxM, axis=-1)
    else:
        group_score_TxG = jnp.sum(jax.lax.top_k(grouped_TxGxM, 2)[0], axis=-1)
    _, kept_TxK = jax.lax.top_k(group_score_TxG, topk_group)
    kept_TxG = jnp.any(jax.nn.one_hot(kept_TxK, n_group, dtype=bool), axis=1)
    return jnp.repeat(kept_TxG, experts // n_group, axis=1)


def route(logits_TxE: jax.Array, bias_E: jax.Array | None, cfg: ModelConfig) -> Routing:
    logits_TxE = logits_TxE.astype(jnp.float32)
    if cfg.router_scoring == "sigmoid":
        scores_TxE = jax.nn.sigmoid(logits_TxE)
    else:
        scores_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    biased_TxE = scores_TxE if bias_E is None else scores_TxE + bias_E.astype(jnp.float32)
    if cfg.n_group > 1:
        biased_TxE = jnp.where(kept_groups(biased_TxE, cfg.n_group, cfg.topk_group,
                                           cfg.group_score),
                               biased_TxE, -jnp.inf)
    _, expert_TxK = jax.lax.top_k(biased_TxE, cfg.top_k)
    weight_TxK = jnp.take_along_axis(scores_TxE, expert_TxK, axis=-1)
    # Softmax with one expert keeps its probability (the original's router learns through it).
    if cfg.norm_topk_prob and (cfg.router_scoring == "sigmoid" or cfg.top_k > 1):
        weight_TxK = weight_TxK / (jnp.sum(weight_TxK, axis=-1, keepdims=True) + 1e-20)
    return Routing(scores_TxE, weight_TxK * cfg.routed_scaling_factor, expert_TxK)


def balance_probabilities(routing: Routing) -> jax.Array:
    """Each token's scores as a distribution over the experts (sigmoid affinities normalized,
    as the paper's balance loss does; softmax probabilities already are)."""
    scores_TxE = routing.scores_TxE
    return scores_TxE / jnp.sum(scores_TxE, axis=-1, keepdims=True)
