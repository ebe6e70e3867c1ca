import dataclasses
import logging
import pathlib

import pytest

from configs import mini, tiny
from minids_jax import config as config_lib
from minids_jax.config import (
    ComputeConfig,
    ConfigError,
    ModelConfig,
    OptimConfig,
    compat,
    from_config_dict,
    from_json,
)
from tests.factories import compute_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("cls, overrides, message", [
    (ModelConfig, dict(d_model=100, n_heads=16), "not divisible by model.n_heads"),
    (ModelConfig, dict(max_seq_len=1000, latent_k=64), "not divisible by model.latent_k"),
    (ModelConfig, dict(top_k=3, n_experts=2), "top_k=3 exceeds model.n_experts=2"),
    (ModelConfig, dict(attn_pattern=("mha", "flash")), "unknown attention kind 'flash'"),
    (ModelConfig, dict(n_layers=0), "model.n_layers must be a positive integer"),
    (ModelConfig, dict(d_model="wide"), "model.d_model must be an integer, got 'wide'"),
    (ComputeConfig, dict(moe_dispatch="magic"), "compute.moe_dispatch='magic' is unknown"),
    (ComputeConfig, dict(attention_kernel="flash"), "compute.attention_kernel='flash' is unknown"),
    (ComputeConfig, dict(capacity_factor=0), r"compute.capacity_factor must be > 0"),
    (OptimConfig, dict(b2=1.0), r"optim.b2 must be < 1"),
])
def test_bad_values_name_the_field(cls, overrides, message):
    with pytest.raises(ConfigError, match=message):
        cls(**overrides)


def test_unknown_fields_are_reported_with_the_known_ones():
    config = tiny.get_config()
    config.model.unlock()
    config.model.n_layer = 3  # a typo of n_layers
    with pytest.raises(ConfigError, match=r"model\.n_layer.*known fields.*n_layers"):
        from_config_dict(config)
    with pytest.raises(ConfigError, match=r"model\.dtype is now compute\.dtype"):
        from_config_dict({"model": {"dtype": "bfloat16"}})


def test_mini_is_the_original_config_and_round_trips_through_json():
    config = from_config_dict(mini.get_config())
    assert config == config_lib.Config()  # mini is the defaults, nothing restated
    m = config.model
    assert (m.vocab_size, m.max_seq_len, m.d_model, m.n_layers, m.n_heads, m.latent_k,
            m.mlp_mult, m.n_experts, m.top_k) == (32000, 1024, 1024, 6, 16, 64, 4, 2, 1)
    assert m.attn_pattern == ("mha", "mhla")
    o = config.optim
    assert (o.lr, o.warmup_steps, o.total_steps, o.b1, o.b2, o.eps, o.weight_decay) == (
        3e-4, 100, 1000, 0.9, 0.999, 1e-8, 0.01)
    assert config.train.batch_size == 8 and config.train.log_every == 50
    assert from_json(config.to_json()) == config
    assert from_json(from_config_dict(tiny.get_config()).to_json()).model.d_model == 128


def test_every_field_has_a_doc_and_a_policy():
    for group, cls in config_lib.GROUPS.items():
        for field in dataclasses.fields(cls):
            assert field.metadata["doc"], f"{group}.{field.name} has no doc"
            assert field.metadata["policy"] in (config_lib.ARCHITECTURE, config_lib.NOTED,
                                                config_lib.QUIET)
    # The architecture is exactly the model group and the adapters: what the parameters are
    # (the adapters' dropout is how they train, not what they are).
    architecture = [name for name, _ in compat.fields_of(config_lib.Config(),
                                                           config_lib.ARCHITECTURE)]
    assert architecture == [f"model.{f.name}" for f in dataclasses.fields(ModelConfig)] + [
        f"lora.{f.name}" for f in dataclasses.fields(config_lib.LoRAConfig)
        if f.name != "dropout"]


def test_changes_are_sorted_by_policy():
    saved = config_lib.Config()
    current = dataclasses.replace(
        saved, model=dataclasses.replace(saved.model, n_layers=3),
        compute=dataclasses.replace(saved.compute, attention_kernel="fused", dtype="bfloat16"),
        optim=dataclasses.replace(saved.optim, total_steps=2000))
    assert compat.changes(saved, current, config_lib.ARCHITECTURE) == [
        "model.n_layers: checkpoint 6, this run 3"]
    assert compat.changes(saved, current, config_lib.NOTED) == [
        "compute.dtype: checkpoint 'float32', this run 'bfloat16'"]
    quiet = compat.changes(saved, current, config_lib.QUIET)
    assert len(quiet) == 2 and quiet[0].startswith("compute.attention_kernel")


def test_a_warmup_longer_than_the_run_is_clamped_with_one_line(caplog):
    with caplog.at_level(logging.WARNING):
        optim = OptimConfig(warmup_steps=30, total_steps=20)
    assert optim.warmup_steps == 19
    assert [r.getMessage() for r in caplog.records] == [
        "optim.warmup_steps=30 does not fit a run of optim.total_steps=20: warming up for 19 "
        "steps instead."]
    assert OptimConfig(warmup_steps=0, total_steps=1).warmup_steps == 0


def test_the_configuration_reference_is_generated_from_the_metadata():
    """docs/configuration.md is `python -m minids_jax.config`'s output, never hand-kept."""
    reference = config_lib.reference_markdown()
    assert "| `aux_loss_coef` | `0.01` | noted |" in reference
    assert (ROOT / "docs" / "configuration.md").read_text() == reference, (
        "docs/configuration.md is stale: python -m minids_jax.config > docs/configuration.md")


def test_the_deepseek_v3_config_has_the_published_parameter_counts():
    """671.03B in the main model (the reference's meta-device count) and the MTP module apart,
    from abstract shapes only."""
    from flax import nnx

    from configs import deepseek_v3
    from minids_jax import inspect
    from minids_jax.model import MiniDeepSeek
    from minids_jax.training import footprint

    config = config_lib.from_config_dict(deepseek_v3.get_config())
    figures = inspect.sizes(config, 1)
    assert round(figures["parameters"] / 1e9, 2) == 671.03
    assert 11.4e9 < figures["mtp_parameters"] < 11.7e9  # one MoE block, its 2D -> D projection
    small, layer_of = footprint.representative(config.model)
    assert small.n_layers == 2 and layer_of == [0] * 3 + [1] * 58  # 3 dense, then MoE
    layer = nnx.eval_shape(lambda: MiniDeepSeek(small, compute_config(),
                                                rngs=nnx.Rngs(0))).blocks[1].attn
    assert layer.kv_up.kernel.shape == (512, 128 * (128 + 128))
    assert layer.kv_down.kernel.shape == (7168, 512 + 64)


@pytest.mark.parametrize("first_k_dense, n_layers", [(2, 9), (4, 6)])  # (4, 6): a kind is
def test_sizes_from_one_layer_of_each_kind_are_the_whole_models(first_k_dense, n_layers):
    import jax  # missing from the small stack there, so every layer is built
    from flax import nnx

    from minids_jax import inspect
    from minids_jax.model import MiniDeepSeek
    from tests.factories import tiny_config

    config = tiny_config(model=dict(attn_pattern=("mha", "mhla", "mla"), mtp_depth=1,
                                    first_k_dense=first_k_dense, n_layers=n_layers))
    model = nnx.eval_shape(lambda: MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(0)))
    whole = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    figures = inspect.sizes(config, 1)
    assert figures["parameters"] + figures["mtp_parameters"] == whole
    assert figures["bytes_per_device"] == 12 * whole  # float32, and two AdamW moments


@pytest.mark.parametrize("name", ["v3_tiny", "v3_mini"])
def test_the_deepseek_v3_configs_build(name):
    import importlib

    cfg = config_lib.from_config_dict(importlib.import_module(f"configs.{name}").get_config())
    assert cfg.model.attn_pattern == ("mla",) and cfg.model.router_scoring == "sigmoid"
    assert cfg.model.mtp_depth == 1 and cfg.model.first_k_dense == 1


@pytest.mark.slow  # python -m minids_jax.inspect
def test_inspect_prints_the_published_counts_and_splits_memory_over_fsdp():
    import subprocess
    import sys

    from configs import v3_tiny
    from minids_jax import inspect

    result = subprocess.run([sys.executable, "-m", "minids_jax.inspect", "--config",
                             "configs/deepseek_v3.py"], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).resolve().parents[1], timeout=300,
                            env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "671.03B in the main model (+ 11.61B in 1 MTP module(s))" in result.stdout
    assert "active per token:    37.5" in result.stdout  # the paper: 37B
    config = config_lib.from_config_dict(v3_tiny.get_config())
    one = inspect.sizes(config, 1)
    fsdp8 = inspect.sizes(dataclasses.replace(config, mesh=dataclasses.replace(
        config.mesh, data=1, fsdp=8)), 8)
    assert one["bytes_per_device"] == 12 * (one["parameters"] + one["mtp_parameters"])
    assert one["bytes_per_device"] / 8 < fsdp8["bytes_per_device"] < one["bytes_per_device"] / 7
