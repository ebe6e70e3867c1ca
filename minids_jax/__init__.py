"""minids_jax: Mini DeepSeek-V3 in JAX/Flax NNX."""

from minids_jax.config import Config, ConfigError, ModelConfig
from minids_jax.model import MiniDeepSeek

__all__ = ["Config", "ConfigError", "ModelConfig", "MiniDeepSeek"]
