"""Training at scale: gradient accumulation, scanned layers, rematerialization, bfloat16."""

import jax
import numpy as np
import pytest

from minids_jax.config import ConfigError
from minids_jax.training import trainer
from tests.factories import Repeating, tiny_config

# MLA, sigmoid routing with its balancing biases, shared experts, a dense first layer and MTP:
# the accumulated update must also get the router-bias step and the MTP loss right.
DEEPSEEK_V3_LIKE = dict(n_layers=2, attn_pattern=("mla",), router_scoring="sigmoid",
                        n_experts=4, top_k=2, n_shared_experts=1, first_k_dense=1, mtp_depth=1)


def one_step(config):
    """(the model's state before, the train state after one step, its metrics)."""
    with trainer.Trainer(config) as run:
        before = jax.device_get(run.state.model)
        state, metrics = run.train_step(run.step_state, run.batch(0))
        return before, jax.device_get((state, metrics))


def assert_trees_close(a, b, rtol, atol=0.0):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow  # trains end to end
def test_four_microbatches_give_the_full_batch_update(model=DEEPSEEK_V3_LIKE):
    # Balancing losses are statistics of each microbatch (not additive): off here. With a
    # large epsilon, Adam's first update is lr * g / (|g| + 1): about linear in the gradient.
    groups = dict(model=model, train=dict(batch_size=8, aux_loss_coef=0.0),
                  data=dict(source="random"), optim=dict(eps=1.0, lr=1.0, weight_decay=0.0))
    before, (whole_state, whole) = one_step(tiny_config(**groups))
    groups["train"] = dict(groups["train"], grad_accum_steps=4)
    _, (parts_state, parts) = one_step(tiny_config(**groups))
    for (path, start), whole_p, parts_p in zip(jax.tree_util.tree_leaves_with_path(before),
                                               jax.tree.leaves(whole_state.model),
                                               jax.tree.leaves(parts_state.model)):
        # Each leaf's update agrees to 1e-5 of its norm (float32 sums in another order), up
        # to the float32 spacing of the parameters it was added to.
        whole_update, parts_update = whole_p - start, parts_p - start
        spacing = np.linalg.norm(np.spacing(np.abs(start).astype(np.float32)))
        error = np.linalg.norm(parts_update - whole_update)
        assert error <= 1e-5 * np.linalg.norm(whole_update) + spacing, jax.tree_util.keystr(path)
    whole_update = jax.tree.map(np.subtract, whole_state.model, before)
    assert max(np.abs(u).max() for u in jax.tree.leaves(whole_update)) > 1e-4  # it moved
    for key in ("loss", "total_loss", "grad_norm", "expert_load", "mtp_loss"):
        if key in whole:
            np.testing.assert_allclose(parts[key], whole[key], rtol=1e-6, err_msg=key)


def test_a_batch_that_does_not_split_into_the_microbatches_is_a_config_error():
    config = tiny_config(train=dict(batch_size=6, grad_accum_steps=4))
    with pytest.raises(ConfigError, match="grad_accum_steps=4"):
        trainer.Trainer(config)


PATTERNS = {  # layer patterns, each with a run of at least two units, scanned
    "original": dict(n_layers=4, attn_pattern=("mha", "mhla")),
    "mla_dense_first": dict(n_layers=4, attn_pattern=("mla",), first_k_dense=1),
    # Also llama/qwen2's attention: grouped-query, wide heads, biases, llama3 RoPE, tied head.
    "three_kinds_mtp": dict(n_layers=7, attn_pattern=("mha", "mhla", "mla"), first_k_dense=1,
                            mtp_depth=1, router_scoring="sigmoid", n_shared_experts=1,
                            n_kv_heads=2, head_dim=12, qkv_bias=True, out_bias=True,
                            tie_embeddings=True, rope_scaling="llama3", rope_factor=8.0,
                            rope_original_max_len=8),
}


def loss_and_grads(model_cfg, **compute):
    from flax import nnx

    from minids_jax import MiniDeepSeek
    from minids_jax.training import loss as loss_lib
    from tests.factories import compute_config

    model = MiniDeepSeek(model_cfg, compute_config(**compute), rngs=nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 17), 0, model_cfg.vocab_size)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": np.ones((2, 16))}

    def loss(model):
        return loss_lib.total_loss(model, batch, 16, 0.01, 0.0, 0.3)[0]

    jaxpr = str(jax.make_jaxpr(lambda m: nnx.grad(loss)(m))(model))
    value, grads = nnx.jit(nnx.value_and_grad(loss))(model)
    return value, nnx.to_pure_dict(grads), jaxpr


# Each case: a layer pattern, scanned (with a remat policy) against the plain loop; together
# they cover every attention kind, a dense first layer, MTP and each policy.
CASES = {"three_kinds_mtp": "none", "original": "full", "mla_dense_first": "save_dots"}


@pytest.mark.parametrize("pattern,remat", CASES.items())
def test_scanned_and_rematerialized_layers_give_the_plain_loss_and_gradients(pattern, remat):
    from tests.factories import small_model_config

    model_cfg = small_model_config(**PATTERNS[pattern])
    loop_loss, loop_grads, loop_jaxpr = loss_and_grads(model_cfg, scan_layers=False)
    loss, grads, jaxpr = loss_and_grads(model_cfg, scan_layers=True, scan_min_repeats=2,
                                        remat=remat)
    # Each repeating unit is traced once, not once per repeat: a shorter program (remat
    # traces its recomputation too).
    assert remat != "none" or len(jaxpr) < 0.8 * len(loop_jaxpr)
    assert (" remat" in jaxpr) == (remat != "none") and " remat" not in loop_jaxpr
    np.testing.assert_allclose(loss, loop_loss, rtol=1e-6)
    assert_trees_close(grads, loop_grads, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("pattern,remat", [("original", "full"),
                                           ("mla_dense_first", "save_dots")])
def test_rematerialized_layers_outside_a_scan_give_the_plain_loss_and_gradients(pattern,
                                                                              remat):
    """On a CPU a rematerialized block outside a scan reads what its forward kept through a
    conditional (model/scan.py, `rematerialized`): the same numbers as no remat at all."""
    from tests.factories import small_model_config

    model_cfg = small_model_config(**PATTERNS[pattern])
    loop_loss, loop_grads, _ = loss_and_grads(model_cfg, scan_layers=False)
    loss, grads, jaxpr = loss_and_grads(model_cfg, scan_layers=False, remat=remat)
    assert "cond[" in jaxpr  # the conditional that keeps XLA from merging it away
    np.testing.assert_allclose(loss, loop_loss, rtol=1e-6)
    assert_trees_close(grads, loop_grads, rtol=1e-5, atol=1e-7)


def test_only_runs_of_enough_repeats_are_scanned():
    from flax import nnx

    from minids_jax import MiniDeepSeek
    from minids_jax.model import scan as layer_scan
    from tests.factories import compute_config, small_model_config

    blocks = MiniDeepSeek(small_model_config(n_layers=7, first_k_dense=1), compute_config(),
                          rngs=nnx.Rngs(0)).blocks  # dense MHA, then 3 x (MHLA, MHA MoE)
    singles = [(i, 1, 1) for i in range(7)]
    assert layer_scan.runs(blocks, 2, 2) == [(0, 1, 1), (1, 3, 2)]
    assert layer_scan.runs(blocks, 2, 4) == singles  # 3 repeats are too few
    assert layer_scan.runs(blocks, 2, None) == singles  # scan_layers=False


def test_cpu_scans_only_longer_runs_by_default():
    """scan_min_repeats=0 is the platform's: on a CPU a run must repeat 8 times (the scan's
    copies cost more of a CPU step), elsewhere 4; a value set is kept."""
    from minids_jax.config import ComputeConfig
    from minids_jax.training import footprint
    from tests.factories import compute_config, small_model_config

    assert compute_config("cpu").scan_min_repeats == 8
    assert compute_config("gpu").scan_min_repeats == 4
    assert compute_config("cpu", scan_min_repeats=2).scan_min_repeats == 2
    cfg = small_model_config(n_layers=13, first_k_dense=1)  # dense, then 6 units of 2
    unresolved = ComputeConfig()
    assert footprint.scanned_layers(cfg, unresolved, "cpu") == set()
    assert footprint.scanned_layers(cfg, unresolved, "gpu") == set(range(1, 13))


@pytest.mark.slow  # trains end to end
def test_bfloat16_training_follows_float32():
    """Compute in bfloat16 (params, optimizer state, softmaxes, router and loss in float32):
    the loss curve of a short run stays close to float32's and falls as far."""


    curves = {}
    for dtype in ("float32", "bfloat16"):
        config = tiny_config(compute=dict(dtype=dtype), train=dict(log_every=1),
                             optim=dict(lr=1e-2, warmup_steps=2, total_steps=12))
        with trainer.Trainer(config) as run:
            run.source = Repeating()
            curves[dtype] = np.array([h["loss"] for h in run.train() if "loss" in h])
            assert run.state.model["head"]["kernel"][...].dtype == np.float32
    assert curves["float32"][-1] < curves["float32"][0] - 1.0  # it learns
    np.testing.assert_allclose(curves["bfloat16"], curves["float32"], atol=0.1)
