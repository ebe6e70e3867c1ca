"""Learning-rate schedule and AdamW with clipping and a weight-decay mask."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from minids_jax.config import OptimConfig

# Parameters that are not decayed: gains of norms, embedding tables (token embeddings and the
# MHLA latents), and biases. Matrices that multiply activations are decayed.
NO_DECAY_NAMES = ("scale", "embedding", "latents", "bias")


def schedule(cfg: OptimConfig) -> optax.Schedule:
    """The original's schedule: lr*s/warmup for s < warmup, then lr*(1 - s/total).

    s counts updates from 1, while optax counts from 0, hence the shift by one below.
    """
    decay = optax.linear_schedule(cfg.lr * (1 - cfg.warmup_steps / cfg.total_steps), 0.0,
                                  cfg.total_steps - cfg.warmup_steps)
    if cfg.warmup_steps == 0:
        joined = lambda count: decay(count + 1)
    else:
        warmup = (optax.constant_schedule(cfg.lr) if cfg.warmup_steps == 1 else  # (no log line)
                  optax.linear_schedule(cfg.lr / cfg.warmup_steps, cfg.lr, cfg.warmup_steps - 1))
        joined = optax.join_schedules([warmup, decay], boundaries=[cfg.warmup_steps - 1])
    # float32 interpolation can land a hair below zero at the last step
    return lambda count: jnp.maximum(joined(count), 0.0)


def decay_mask(params):
    """True for the leaves AdamW should decay (see NO_DECAY_NAMES)."""

    def decays(path, _leaf) -> bool:
        names = {str(getattr(key, "key", getattr(key, "name", key))) for key in path}
        return not names.intersection(NO_DECAY_NAMES)

    return jax.tree_util.tree_map_with_path(decays, params)


def adamw(cfg: OptimConfig) -> optax.GradientTransformation:
    clip = optax.clip_by_global_norm(cfg.clip_norm) if cfg.clip_norm > 0 else optax.identity()
    return optax.chain(
        clip,
        optax.adamw(schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay, mask=decay_mask),
    )
