"""The step's state keeps each scanned run stacked (training/packing.py): the same training as
one array per layer, a state whose size in arrays does not grow with depth, and checkpoints
that still hold one array per layer."""

import jax
import numpy as np
import pytest

from minids_jax import checkpoint
from minids_jax.training import trainer
from tests.factories import tiny_config

# A dense first layer, then a scanned run of MLA/MoE layers with balancing biases and MTP.
V3_LIKE = dict(attn_pattern=("mla",), router_scoring="sigmoid", n_experts=4, top_k=2,
               n_shared_experts=1, first_k_dense=1, mtp_depth=1)


def config(n_layers, optimizer="adamw", optim=None, saves=None, **compute):
    return tiny_config(model=dict(V3_LIKE, n_layers=n_layers),
                       compute=compute or dict(scan_layers=True, scan_min_repeats=2),
                       optim=optim or dict(name=optimizer), checkpoint=saves or {},
                       train=dict(router_bias_rate=1e-2), data=dict(source="random"))


def test_the_steps_arrays_do_not_grow_with_a_scanned_runs_depth():
    counts = {}
    for n_layers in (3, 7):
        with trainer.Trainer(config(n_layers)) as run:
            assert run.packing.groups == {1: list(range(1, n_layers))}
            counts[n_layers] = len(jax.tree.leaves(run.step_state))
            per_layer = len(jax.tree.leaves(run.state))
    assert counts[3] == counts[7]
    # The run's 6 layers stacked as one: 5 layers' weights (10 at least), each with 2 moments.
    assert per_layer - counts[7] >= 5 * 10 * 3
    with trainer.Trainer(config(7, scan_layers=False)) as run:  # nothing scanned: per layer
        assert run.packing.groups == {}
        assert len(jax.tree.leaves(run.step_state)) == per_layer


@pytest.mark.slow  # trains end to end
@pytest.mark.parametrize("optimizer", ["adamw", "muon", "adafactor"])
def test_stacked_steps_train_as_one_array_per_layer(optimizer):
    """Three steps with the run stacked give the parameters, optimizer state, balancing biases
    and loss of three steps without a scan; the state read back per layer (as checkpoints
    hold it) and written again is the same state. Adafactor, which factors a whole array,
    keeps every layer its own (and its factored moments, unlike their parameters, whole)."""
    results = []
    for compute in (dict(scan_layers=False), {}):
        with trainer.Trainer(config(4, optimizer, **compute)) as run:
            stacks = compute == {} and optimizer != "adafactor"
            assert run.packing.groups == ({1: [1, 2, 3]} if stacks else {})
            for step in range(3):
                run.step_state, metrics = run.train_step(run.step_state, run.batch(step))
            state = jax.device_get(run.state)
            run.state = run.state
            again = jax.device_get(run.state)
            assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state),
                                                            jax.tree.leaves(again)))
            assert state.step == 3
            results.append((state, jax.device_get(metrics)))
    (loop, loop_metrics), (stacked, metrics) = results
    np.testing.assert_allclose(metrics["loss"], loop_metrics["loss"], rtol=1e-5)
    loop_leaves = jax.tree_util.tree_leaves_with_path(loop)
    assert len(loop_leaves) == len(jax.tree.leaves(stacked))
    for (path, a), b in zip(loop_leaves, jax.tree.leaves(stacked)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
    biases = loop.model["blocks"][2]["moe"]["bias"][...]
    assert np.abs(biases).max() > 0  # the biases moved, and equally in both


@pytest.mark.slow  # trains end to end
def test_a_stacked_run_resumes_from_a_checkpoint_as_if_uninterrupted(tmp_path):
    """Checkpoints hold one array per layer; a stacked run resumed from its step-2 checkpoint
    ends where the uninterrupted run did, bit for bit."""
    import shutil

    resumable = config(4, optim=dict(name="adamw", total_steps=4), saves=dict(every=2))
    with trainer.Trainer(resumable, str(tmp_path / "straight")) as straight:
        straight.train()
        ended = jax.device_get(straight.state)
    saved = checkpoint.load_params(tmp_path / "straight")
    assert saved["blocks"]["3"]["attn"]["kv_down"]["kernel"].shape == \
        ended.model["blocks"][3]["attn"]["kv_down"]["kernel"][...].shape  # per layer
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
    with trainer.Trainer(resumable, str(tmp_path / "resumed")) as resumed:
        assert resumed.packing.groups
        assert resumed.restore_or_initialize() == 2
        resumed.train()
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ended),
                                jax.tree.leaves(jax.device_get(resumed.state))):
            np.testing.assert_array_equal(b, a, err_msg=jax.tree_util.keystr(path))
