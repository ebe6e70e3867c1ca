"""minids_jax: Mini DeepSeek-V3 in JAX/Flax NNX."""

import importlib

# Names resolve on first use, so `import minids_jax.config` (the config files do it) does not
# import jax before train.py has chosen the GPUs, and `python -m minids_jax.config` runs clean.
_LAZY = {
    "Config": "minids_jax.config",
    "ConfigError": "minids_jax.config",
    "ModelConfig": "minids_jax.config",
    "MiniDeepSeek": "minids_jax.model",
    "CheckpointError": "minids_jax.checkpoint",
    "generate": "minids_jax.generation",
    "load": "minids_jax.checkpoint",
    "load_params": "minids_jax.checkpoint",
    "merge_lora": "minids_jax.model.lora",
    "read_config": "minids_jax.checkpoint",
}

__all__ = ["CheckpointError", "Config", "ConfigError", "ModelConfig", "MiniDeepSeek", "generate",
           "load", "load_params", "merge_lora", "read_config"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minids_jax' has no attribute {name!r}")
