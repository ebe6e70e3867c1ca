"""The architecture features of DeepSeek's dense releases (llama, qwen2) and of DeepSeek-V2:
grouped-query attention, an explicit head width, projection biases, tied embeddings, llama3
and linear RoPE scaling, and the max-scored expert groups."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax import generation
from minids_jax.model import MiniDeepSeek, routing
from minids_jax.model.attention import HeadsFirstKeysValues, MHA
from minids_jax.model.rotary import Rope
from minids_jax.training import loss as loss_lib
from tests.factories import compute_config, small_model_config

# llama/qwen2-like: 4 query heads sharing 2 key-value heads, heads wider than d_model / n_heads.
GQA = dict(attn_pattern=("mha",), n_heads=4, n_kv_heads=2, head_dim=12)


def randomized(module: nnx.Module, seed: int = 0) -> nnx.Module:
    """`module` with every parameter random (biases and norm gains are not zero or one)."""
    keys = iter(jax.random.split(jax.random.key(seed), 500))
    for variable in jax.tree.leaves(nnx.state(module, nnx.Param),
                                    is_leaf=lambda x: isinstance(x, nnx.Variable)):
        variable[...] = 0.3 * jax.random.normal(next(keys), variable.shape, variable.dtype)
    return module


@pytest.mark.parametrize("attention_kernel", ["fused", "dot_product_attention"])
def test_grouped_query_attention_is_attention_with_each_kv_head_repeated_for_its_group(
        attention_kernel):
    """(XLA's kernel takes the key-value heads unrepeated, the fused one repeated.)"""
    cfg = small_model_config(**GQA, qkv_bias=True, out_bias=True)
    grouped = randomized(MHA(cfg, compute_config(attention_kernel=attention_kernel),
                             rngs=nnx.Rngs(0)))
    proj = grouped.attention
    assert proj.q.kernel.shape == (cfg.d_model, 4 * 12)
    assert proj.k.kernel.shape == proj.v.kernel.shape == (cfg.d_model, 2 * 12)
    assert proj.out.kernel.shape == (4 * 12, cfg.d_model)
    # The same layer with 4 kv heads, kv head h // 2 copied to head h (transformers' repeat_kv).
    full = MHA(small_model_config(**{**GQA, "n_kv_heads": 4}, qkv_bias=True, out_bias=True),
               compute_config(), rngs=nnx.Rngs(1))
    for name in ("q", "out"):
        nnx.update(getattr(full.attention, name), nnx.state(getattr(proj, name)))
    for name in ("k", "v"):
        kernel = getattr(proj, name).kernel[...].reshape(cfg.d_model, 2, 1, 12)
        bias = getattr(proj, name).bias[...].reshape(2, 1, 12)
        getattr(full.attention, name).kernel[...] = jnp.repeat(kernel, 2, 2).reshape(
            cfg.d_model, 48)
        getattr(full.attention, name).bias[...] = jnp.repeat(bias, 2, 1).reshape(48)
    x = jax.random.normal(jax.random.key(2), (2, 10, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
    attend = nnx.jit(lambda layer, x, positions: layer(x, positions)[0])
    np.testing.assert_allclose(attend(grouped, x, positions), attend(full, x, positions),
                               rtol=1e-5, atol=1e-6)
    # Its cache holds the key-value heads only (heads-first for the fused kernels).
    cached_keys = grouped.init_cache(2, 16, jnp.float32).keys_values[0]
    assert cached_keys.shape == ((4, 16, 12) if attention_kernel == "fused" else (2, 16, 2, 12))


@pytest.mark.parametrize("kernel,batch", [("fused", 2), ("fused", 1),
                                          ("dot_product_attention", 2)])
def test_grouped_query_attention_decodes_as_the_uncached_forward(kernel, batch):
    """A 6-token prefill, then 4 tokens one at a time, through the cache of a grouped layer
    (heads-first for the fused kernels, as projected otherwise) give the outputs of the
    uncached forward over all 10 tokens."""
    cfg = small_model_config(**GQA, qkv_bias=True)
    layer = randomized(MHA(cfg, compute_config(attention_kernel=kernel), rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(2), (batch, 10, cfg.d_model))
    positions = jnp.broadcast_to(jnp.arange(10), (batch, 10))
    expected = nnx.jit(lambda layer, x, positions: layer(x, positions)[0])(layer, x, positions)
    cached = nnx.jit(lambda layer, x, positions, cache: layer(x, positions, cache))
    cache = layer.init_cache(batch, 16, jnp.float32)
    assert isinstance(cache.keys_values, HeadsFirstKeysValues) == (kernel == "fused")
    got, cache = cached(layer, x[:, :6], positions[:, :6], cache)
    outputs = [got]
    for t in range(6, 10):
        got, cache = cached(layer, x[:, t:t + 1], positions[:, t:t + 1], cache)
        outputs.append(got)
    np.testing.assert_allclose(jnp.concatenate(outputs, axis=1), expected, rtol=1e-5,
                               atol=1e-6)


def test_biases_are_added_where_the_config_asks():
    cfg = small_model_config(**GQA, qkv_bias=True, mlp_bias=True, first_k_dense=1, n_layers=2)
    model = MiniDeepSeek(cfg, compute_config(), rngs=nnx.Rngs(0))
    attention = model.blocks[0].attn.attention
    assert [getattr(attention, n).bias is not None for n in ("q", "k", "v", "out")] == \
        [True, True, True, False]
    assert all(getattr(model.blocks[0].mlp, n).bias is not None for n in ("w1", "w2", "w3"))
    assert model.blocks[1].moe.shared is None or model.blocks[1].moe.shared.w1.bias is None
    tokens = jnp.arange(8)[None] % cfg.vocab_size
    forward = nnx.jit(lambda model, tokens: model(tokens).logits_BxLxV)
    before = forward(model, tokens)
    attention.q.bias[...] = jnp.ones_like(attention.q.bias[...])
    model.blocks[0].mlp.w3.bias[...] = jnp.ones_like(model.blocks[0].mlp.w3.bias[...])
    assert not np.allclose(forward(model, tokens), before)


def test_tied_embeddings_score_with_the_embedding_and_have_no_head():
    cfg = small_model_config(**GQA, tie_embeddings=True)
    model = randomized(MiniDeepSeek(cfg, compute_config(), rngs=nnx.Rngs(0)))
    assert model.head is None
    assert not any("head" in str(path) for path, _ in nnx.to_flat_state(nnx.state(model)))
    tokens = jax.random.randint(jax.random.key(1), (2, 9), 0, cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": jnp.ones((2, 8))}

    @nnx.jit  # one program: eager, each op would compile on its own
    def check(model, batch):
        features, _, _ = model.hidden(batch["inputs"])
        fused = nnx.value_and_grad(lambda m: loss_lib.model_loss(m, batch, chunk=4)[0])
        return features, model(batch["inputs"]).logits_BxLxV, *fused(model)

    features, logits, loss, grads = check(model, batch)
    np.testing.assert_allclose(logits, features @ model.embed.embedding[...].T, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(loss, loss_lib.cross_entropy(logits, batch["targets"],
                                                            batch["weights"]), rtol=1e-5)
    assert float(jnp.abs(grads.embed.embedding[...]).sum()) > 0


def test_a_llama_like_model_decodes_through_its_cache_as_its_full_forward():
    cfg = small_model_config(**GQA, qkv_bias=True, out_bias=True, tie_embeddings=True,
                             rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8)
    model = randomized(MiniDeepSeek(cfg, compute_config(), rngs=nnx.Rngs(0)), seed=3)
    prompt = np.array([[5, 9, 2], [7, 1, 3]])
    new = generation.generate(model, prompt, 6)
    # The full forward over the result (causal): each position's argmax is the next token.
    logits = nnx.jit(lambda model, tokens: model(tokens).logits_BxLxV)(
        model, np.concatenate([prompt, new[:, :-1]], axis=1))
    np.testing.assert_array_equal(np.argmax(logits[:, 2:], axis=-1), new)


def llama3_reference(dim, theta, factor, low, high, original):
    """transformers' `_compute_llama3_parameters`, written out per frequency."""
    out = []
    for i in range(0, dim, 2):
        freq = 1.0 / theta ** (i / dim)
        wavelength = 2 * math.pi / freq
        if wavelength < original / high:
            out.append(freq)
        elif wavelength > original / low:
            out.append(freq / factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return np.array(out)


def test_llama3_and_linear_rope_scaling_give_transformers_frequencies():
    cfg = small_model_config(**GQA, rope_theta=500000.0, rope_scaling="llama3",
                             rope_factor=8.0, rope_low_freq_factor=1.0,
                             rope_high_freq_factor=4.0, rope_original_max_len=64)
    frequencies = np.array(Rope.of(cfg, 128).inv_freq)
    expected = llama3_reference(128, 500000.0, 8.0, 1.0, 4.0, 64)
    np.testing.assert_allclose(frequencies, expected, rtol=1e-6)
    # Each of the three regimes occurs.
    plain = 500000.0 ** (-np.arange(0, 128, 2) / 128)
    ratio = frequencies / plain
    assert np.isclose(ratio, 1).any() and np.isclose(ratio, 1 / 8).any()
    assert ((ratio > 1 / 8 + 1e-6) & (ratio < 1 - 1e-6)).any()
    linear = small_model_config(**GQA, rope_scaling="linear", rope_factor=4.0)
    np.testing.assert_allclose(Rope.of(linear, 12).inv_freq,
                               10000.0 ** (-np.arange(0, 12, 2) / 12) / 4, rtol=1e-6)
    assert Rope.of(cfg, 128).amplitude == 1.0


@pytest.mark.parametrize("overrides, message", [
    (dict(n_kv_heads=3), "n_kv_heads=3 must divide model.n_heads=4"),
    (dict(head_dim=7), "head_dim=7 must be even"),
    (dict(rope_scaling="llama3", rope_yarn_factor=4.0), "use one of them"),
])
def test_inconsistent_features_are_refused_by_name(overrides, message):
    from minids_jax.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        small_model_config(**{**GQA, **overrides})


def test_deepseek_v2_groups_score_their_best_expert():
    """group_limited_greedy: softmax scores, a group scored by its max, the top topk_group
    groups kept, then top-k, weights not renormalized but scaled."""
    cfg = small_model_config(router_scoring="softmax", n_experts=8, n_group=4, topk_group=2,
                             top_k=3, norm_topk_prob=False, routed_scaling_factor=16.0,
                             group_score="max")
    logits = jax.random.normal(jax.random.key(0), (64, 8))
    result = routing.route(logits, None, cfg)
    for row_logits, weights, experts in zip(np.asarray(logits, np.float64),
                                            np.asarray(result.weight_TxK),
                                            np.asarray(result.expert_TxK)):
        scores = np.exp(row_logits - row_logits.max())
        scores /= scores.sum()
        best_groups = np.argsort(-scores.reshape(4, 2).max(axis=1), kind="stable")[:2]
        allowed = [e for e in range(8) if e // 2 in best_groups]
        chosen = sorted(allowed, key=lambda e: (-scores[e], e))[:3]
        assert list(experts) == chosen
        np.testing.assert_allclose(weights, 16.0 * scores[chosen], rtol=1e-5)
    top2 = routing.route(logits, None, small_model_config(
        **{**cfg.__dict__, "group_score": "top2_sum"}))
    assert not np.array_equal(top2.expert_TxK, result.expert_TxK)  # the two rules differ


def test_a_dense_model_trains_with_no_balancing_to_report():
    """first_k_dense = n_layers: every block a dense SwiGLU, as llama and qwen2 are; no expert
    statistics (no balance or load in the log), and the sizes inspect reports are its own."""
    from minids_jax import inspect
    from minids_jax.model import count_params
    from minids_jax.training import reporting, trainer
    from tests.factories import Repeating, tiny_config

    config = tiny_config(model=dict(GQA, n_layers=2, first_k_dense=2, dense_hidden_dim=48,
                                    tie_embeddings=True, qkv_bias=True),
                         optim=dict(lr=1e-2, warmup_steps=1, total_steps=12),
                         train=dict(log_every=1))
    run = trainer.Trainer(config)
    run.source = Repeating()
    steps = [record for record in run.train() if "loss" in record]
    assert not hasattr(run.model().blocks[0], "moe")
    assert steps[-1]["loss"] < 0.5 * steps[0]["loss"]
    assert np.size(steps[-1]["expert_load"]) == 0 and steps[-1]["aux_loss"] == 0
    line = reporting.format_train_line(12, 12, steps[-1])
    assert "balance" not in line and "load" not in line
    assert inspect.sizes(config, 1)["parameters"] == count_params(run.model())


@pytest.mark.parametrize("name, parameters", [
    ("deepseek_llm_7b", 6_910_365_696),  # the safetensors' total, as the hub lists it
    ("r1_distill_llama_8b", 8_030_261_248),
    ("r1_distill_qwen_1_5b", 1_777_088_000),
    ("deepseek_v2_lite", 15_706_484_224),
])
def test_the_release_configs_have_the_published_parameter_counts(name, parameters):
    import importlib

    from minids_jax import inspect
    from minids_jax.config import from_config_dict

    config = from_config_dict(importlib.import_module(f"configs.{name}").get_config())
    assert inspect.sizes(config, 1)["parameters"] == parameters


def test_a_dense_config_stays_dense_when_its_depth_is_overridden():
    """first_k_dense=-1 (every layer) resolves after the overrides, so --config.model.n_layers
    on a llama or qwen2 config gives a shallower dense model, not an error or an MoE layer."""
    import importlib

    from minids_jax.config import ConfigError, ModelConfig, from_config_dict

    fields = importlib.import_module("configs.deepseek_llm_7b").get_config()
    fields.model.n_layers = 2
    assert from_config_dict(fields).model.first_k_dense == 2
    with pytest.raises(ConfigError, match=r"first_k_dense=3 exceeds model.n_layers=2; set it "
                                          r"to -1 for a dense model"):
        ModelConfig(n_layers=2, first_k_dense=3)
