"""Training at scale: gradient accumulation, scanned layers, rematerialization, bfloat16."""

import jax
import numpy as np
import pytest

from minids_jax import trainer
from minids_jax.config import ConfigError
from tests.factories import tiny_config

# MLA, sigmoid routing with its balancing biases, shared experts, a dense first layer and MTP:
# the accumulated update must also get the router-bias step and the MTP loss right.
DEEPSEEK_V3_LIKE = dict(n_layers=2, attn_pattern=("mla",), router_scoring="sigmoid",
                        n_experts=4, top_k=2, n_shared_experts=1, first_k_dense=1, mtp_depth=1)


def one_step(config):
    """(the model's state before, the train state after one step, its metrics)."""
    with trainer.Trainer(config) as run:
        before = jax.device_get(run.state.model)
        state, metrics = run.train_step(run.state, run.batch(0))
        return before, jax.device_get((state, metrics))


def assert_trees_close(a, b, rtol, atol=0.0):
    for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64),
                                   rtol=rtol, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("model", [{}, DEEPSEEK_V3_LIKE], ids=["original", "deepseek_v3_like"])
def test_four_microbatches_give_the_full_batch_update(model):
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
