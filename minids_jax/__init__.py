"""minids_jax: Mini DeepSeek-V3 in JAX/Flax NNX."""

import importlib

from minids_jax.config import Config, ConfigError, ModelConfig

# Names that need jax resolve on first use, so `import minids_jax.config` (the config files do
# it) does not import jax before train.py has chosen the GPUs.
_LAZY = {"MiniDeepSeek": "minids_jax.model"}

__all__ = ["Config", "ConfigError", "ModelConfig", "MiniDeepSeek"]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'minids_jax' has no attribute {name!r}")
