import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minids_jax import MiniDeepSeek
from tests.factories import compute_config, small_model_config


def test_model_is_causal_and_independent_of_input_length():
    cfg = small_model_config(n_layers=4)  # mha, mhla, mha, mhla
    model = MiniDeepSeek(cfg, compute_config(), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)
    t = 9
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 1) % cfg.vocab_size)
    forward = nnx.jit(lambda model, tokens: model(tokens))  # eager, each op compiles alone
    logits, aux, cache = forward(model, tokens)
    logits_changed = forward(model, changed).logits_BxLxV
    logits_truncated = forward(model, tokens[:, :t + 1]).logits_BxLxV
    assert cache is None  # nothing cached without a cache
    np.testing.assert_allclose(logits[:, :t + 1], logits_changed[:, :t + 1], atol=1e-5)
    np.testing.assert_allclose(logits[:, :t + 1], logits_truncated, atol=1e-4)
    assert not np.allclose(logits[:, t + 1:], logits_changed[:, t + 1:], atol=1e-3)
    assert logits.shape == (2, 16, cfg.vocab_size) and logits.dtype == jnp.float32
    assert aux["expert_load_NxE"].shape == (4, cfg.n_experts)
    assert np.isfinite(float(aux["aux_loss"]))


def test_layers_follow_the_attention_pattern():
    model = MiniDeepSeek(small_model_config(n_layers=3, attn_pattern=("mhla", "mha", "mha")),
                         compute_config(), rngs=nnx.Rngs(0))
    kinds = [type(block.attn).__name__ for block in model.blocks]
    assert kinds == ["MHLA", "MHA", "MHA"]


def test_bfloat16_compute_keeps_float32_params_and_logits():
    model = MiniDeepSeek(small_model_config(), compute_config(dtype="bfloat16"), rngs=nnx.Rngs(0))
    logits = nnx.jit(lambda model, tokens: model(tokens).logits_BxLxV)(
        model, jnp.zeros((1, 16), jnp.int32))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert all(p.dtype == jnp.float32 for p in params)
    assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_build_draws_as_a_plain_rngs_and_never_reads_a_tracers_sharding():
    """`build` draws from a copy of its Rngs whose counters are array refs: the same parameters
    as the plain Rngs of that seed, and, under one trace (nnx.eval_shape), no read of a tracer's
    `.sharding`, which jax answers by walking the whole trace (a start quadratic in depth)."""
    from unittest import mock

    from jax._src import core

    from minids_jax import kernels
    from minids_jax.model import build
    from tests.factories import tiny_config

    config = tiny_config(model=dict(attn_pattern=("mla",), n_layers=3, router_scoring="sigmoid"))
    plain = MiniDeepSeek(config.model, kernels.resolve(config.compute, "cpu"), rngs=nnx.Rngs(5))
    given = nnx.Rngs(5)
    built = build(config, "cpu", given)
    assert int(given.default.count[...]) == 0  # the caller's counters do not move
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(built)),
                 nnx.to_pure_dict(nnx.state(plain)))
    reads = []
    sharding = core.Tracer.sharding

    def counted(tracer):
        reads.append(tracer)
        return sharding.fget(tracer)

    with mock.patch.object(core.Tracer, "sharding", property(counted)):
        nnx.eval_shape(lambda: build(config, "cpu", nnx.Rngs(0)))
        assert not reads
        # The probe does see such reads: a plain Rngs' counters make them.
        nnx.eval_shape(lambda: MiniDeepSeek(config.model, kernels.resolve(config.compute, "cpu"),
                                            rngs=nnx.Rngs(0)))
        assert reads
