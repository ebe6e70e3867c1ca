"""minids_jax: Mini DeepSeek-V3 in JAX/Flax NNX."""

from minids_jax.checkpoint import CheckpointError, load, load_params, read_config
from minids_jax.config import Config, ConfigError, ModelConfig
from minids_jax.model import MiniDeepSeek

__all__ = ["CheckpointError", "Config", "ConfigError", "ModelConfig", "MiniDeepSeek", "load",
           "load_params", "read_config"]
