import jax
import pytest
from flax import nnx

from minids_jax.config import ModelConfig

# Float32 matmuls at full precision so that equality checks against references are tight.
jax.config.update("jax_default_matmul_precision", "highest")
# Layers built on their own (outside MiniDeepSeek or a mesh) keep their sharding annotations
# as metadata only, as MiniDeepSeek does.
nnx.use_eager_sharding(False)


def small_model_config(**overrides) -> ModelConfig:
    fields = dict(vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, latent_k=4,
                  mlp_mult=2, n_experts=4, top_k=1, attn_pattern=("mha", "mhla"))
    fields.update(overrides)
    return ModelConfig(**fields)


@pytest.fixture
def model_cfg() -> ModelConfig:
    return small_model_config()
