"""Analytic FLOP counts for model FLOPs utilization (MFU).

Counted: every matmul of the forward pass at 2 FLOPs per multiply-add, for the experts a token
is actually routed to (top_k of n_experts, never all), attention scores and values over the
full (unmasked) score matrix as PaLM's MFU does, and the output head. Not counted: norms,
softmaxes, RoPE, the embedding lookup, routing sorts. Training = 3x forward (the backward pass
costs twice the forward).

Shapes: D model width, L sequence length, K latents, V vocab, F expert hidden width.
"""

from __future__ import annotations

from minids_jax.config import ModelConfig


def attention_flops_per_token(cfg: ModelConfig, kind: str) -> float:
    d, length, k = cfg.d_model, cfg.max_seq_len, cfg.latent_k
    if kind == "mha":
        projections = 4 * 2 * d * d  # q, k, v, out
        scores_and_values = 2 * 2 * length * d
        return projections + scores_and_values
    # MHLA. Per token: read k, v and write q, out. Per sequence (K latents): read q, out,
    # latent-self q, k, v, out and write k, v, spread over the L tokens of the sequence.
    token_projections = 4 * 2 * d * d
    latent_projections = 8 * 2 * d * d * k / length
    read_and_write = 2 * (2 * 2 * k * d)  # read: K x L scores; write: L x K, per token
    latent_self = 2 * 2 * k * k * d / length
    return token_projections + latent_projections + read_and_write + latent_self


def moe_flops_per_token(cfg: ModelConfig) -> float:
    router = 2 * cfg.d_model * cfg.n_experts
    expert = 3 * 2 * cfg.d_model * cfg.hidden_dim  # w1, w2, w3
    return router + cfg.top_k * expert


def forward_flops_per_token(cfg: ModelConfig) -> float:
    layers = sum(attention_flops_per_token(cfg, cfg.attention_kind(i)) + moe_flops_per_token(cfg)
                 for i in range(cfg.n_layers))
    head = 2 * cfg.d_model * cfg.vocab_size
    return layers + head


def train_flops_per_token(cfg: ModelConfig) -> float:
    return 3 * forward_flops_per_token(cfg)
