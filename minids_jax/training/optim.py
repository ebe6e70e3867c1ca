"""Learning-rate schedules and the optimizers (optax's), with clipping and one weight-decay rule.

Every optimizer decays the same parameters (`decay_mask`), decoupled and scaled by the
learning rate as AdamW does it, so `optim.weight_decay` means the same for each.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from minids_jax.config import OptimConfig

# Parameters that are not decayed: gains of norms, embedding tables (token embeddings and the
# MHLA latents), and biases. Matrices that multiply activations are decayed.
NO_DECAY_NAMES = ("scale", "embedding", "latents", "bias")


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """Warm-up lr*s/warmup for update s < warmup (s counts from 1, optax's count from 0),
    then, with floor = lr * min_lr_ratio:
      linear  floor + (lr - floor) * (1 - s/total): the original's (floor 0)
      cosine  floor + (lr - floor) * (1 + cos(pi * p)) / 2, p = (s - warmup)/(total - warmup)
      wsd     lr until the last decay_fraction of p, then linear to floor
    """
    warmup, total, peak = cfg.warmup_steps, cfg.total_steps, cfg.lr
    floor = cfg.lr * cfg.min_lr_ratio

    def lr(count):
        s = jnp.asarray(count, jnp.float32) + 1
        progress = jnp.clip((s - warmup) / max(total - warmup, 1), 0.0, 1.0)
        if cfg.schedule == "linear":
            after = floor + (peak - floor) * (1 - s / total)
        elif cfg.schedule == "cosine":
            after = floor + (peak - floor) * 0.5 * (1 + jnp.cos(math.pi * progress))
        else:  # wsd
            decayed = (progress - (1 - cfg.decay_fraction)) / cfg.decay_fraction
            after = peak - (peak - floor) * jnp.clip(decayed, 0.0, 1.0)
        warming = peak * s / max(warmup, 1)
        return jnp.maximum(jnp.where(s < warmup, warming, after), floor)

    return lr


def decay_mask(params):
    """True for the leaves the optimizer should decay (see NO_DECAY_NAMES)."""

    def decays(path, _leaf) -> bool:
        names = {str(getattr(key, "key", getattr(key, "name", key))) for key in path}
        return not names.intersection(NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def _muon_dimensions(params):
    """Muon orthogonalizes the decayed matrices ([in, out], or [E, in, out] per expert); the
    rest (embeddings, norms, biases, latents) takes AdamW's update (None here)."""
    return jax.tree.map(
        lambda leaf, decayed: (optax.contrib.MuonDimensionNumbers(leaf.ndim - 2, leaf.ndim - 1)
                               if decayed and leaf.ndim >= 2 else None),
        params, decay_mask(params))


def _update_rule(cfg: OptimConfig) -> optax.GradientTransformation:
    lr = schedule(cfg)
    if cfg.name == "adamw":
        return optax.adamw(lr, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, mask=decay_mask)
    if cfg.name == "lion":
        return optax.lion(lr, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                          mask=decay_mask)
    if cfg.name == "adafactor":
        # optax.adafactor adds its decay after the learning rate; this chain puts it before,
        # as for the others. Its lr is absolute (no parameter-scale multiplier) like AdamW's.
        return optax.chain(optax.scale_by_factored_rms(), optax.clip_by_block_rms(1.0),
                           optax.add_decayed_weights(cfg.weight_decay, decay_mask),
                           optax.scale_by_learning_rate(lr))
    # muon: consistent_rms=0.2 scales its updates to AdamW's typical size (Moonlight's
    # recipe), so AdamW's learning rate carries over; what it leaves to AdamW is undecayed.
    return optax.contrib.muon(lr, beta=cfg.b1, eps=cfg.eps, weight_decay=cfg.weight_decay,
                              muon_weight_dimension_numbers=_muon_dimensions,
                              consistent_rms=0.2, adam_learning_rate=lr, adam_b1=cfg.b1,
                              adam_b2=cfg.b2)


def optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """optim.name's update after global-norm clipping."""
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(clip, _update_rule(cfg))
