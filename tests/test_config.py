import pytest

from configs import mini, tiny
from minids_jax.config import ConfigError, ModelConfig, from_config_dict, from_json


@pytest.mark.parametrize("overrides, message", [
    (dict(d_model=100, n_heads=16), "not divisible by model.n_heads"),
    (dict(max_seq_len=1000, latent_k=64), "not divisible by model.latent_k"),
    (dict(top_k=3, n_experts=2), "top_k=3 exceeds model.n_experts=2"),
    (dict(attn_pattern=("mha", "flash")), "unknown attention kind 'flash'"),
    (dict(moe_dispatch="magic"), "moe_dispatch='magic' is unknown"),
    (dict(attention_kernel="flash"), "attention_kernel='flash' is unknown"),
    (dict(n_layers=0), "model.n_layers must be a positive integer"),
])
def test_bad_model_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


def test_unknown_fields_are_reported_with_the_known_ones():
    config = tiny.get_config()
    config.model.unlock()
    config.model.n_layer = 3  # a typo of n_layers
    with pytest.raises(ConfigError, match=r"model\.n_layer.*known fields.*n_layers"):
        from_config_dict(config)


def test_mini_is_the_seed_config_and_round_trips_through_json():
    config = from_config_dict(mini.get_config())
    m = config.model
    assert (m.vocab_size, m.max_seq_len, m.d_model, m.n_layers, m.n_heads, m.latent_k,
            m.mlp_mult, m.n_experts, m.top_k) == (32000, 1024, 1024, 6, 16, 64, 4, 2, 1)
    assert m.attn_pattern == ("mha", "mhla")
    o = config.optim
    assert (o.lr, o.warmup_steps, o.total_steps, o.b1, o.b2, o.eps, o.weight_decay) == (
        3e-4, 100, 1000, 0.9, 0.999, 1e-8, 0.01)
    assert config.train.batch_size == 8 and config.train.log_every == 50
    assert from_json(config.to_json()) == config
