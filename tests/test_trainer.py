import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax.data import pipeline as data
from minids_jax.data import sources
from minids_jax.training import trainer
from minids_jax.training.loss import cross_entropy
from tests.factories import FAST_COMPILE_XLA_FLAGS, Repeating, tiny_config

# A user's shell, nearly: nothing of this session's environment but the tests' XLA flags.
BARE_ENV = {"JAX_PLATFORMS": "cpu", "PATH": "/usr/bin:/bin", "XLA_FLAGS": FAST_COMPILE_XLA_FLAGS}

ROOT = Path(__file__).resolve().parents[1]


def test_loss_scores_logits_at_t_against_token_t_plus_1():
    tokens = np.arange(10, dtype=np.int32)[None] % 7
    batch = sources.as_batch(tokens)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
    vocab = 7
    # A model that is certain of the next token scores ~0; one certain of the token after is bad.
    next_token = jax.nn.one_hot(batch["targets"], vocab) * 50.0
    token_after = jax.nn.one_hot(np.roll(batch["targets"], -1, axis=1), vocab) * 50.0
    weights = jnp.asarray(batch["weights"])
    assert float(cross_entropy(next_token, batch["targets"], weights)) < 1e-6
    assert float(cross_entropy(token_after, batch["targets"], weights)) > 10.0


def test_loss_ignores_zero_weight_positions():
    logits = jax.random.normal(jax.random.key(0), (1, 4, 5))
    targets = jnp.array([[1, 2, 3, 4]])
    masked = cross_entropy(logits, targets, jnp.array([[1.0, 1.0, 0.0, 0.0]]))
    first_two = cross_entropy(logits[:, :2], targets[:, :2], jnp.ones((1, 2)))
    np.testing.assert_allclose(float(masked), float(first_two), rtol=1e-6)


def test_batches_are_a_pure_function_of_seed_and_step():
    source = data.WindowSource({"train": np.arange(1000) % 251, "val": np.arange(300) % 251},
                               seq_len=16, seed=3, name="test")
    a, b = source.batch(5, 8), source.batch(5, 8)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert not np.array_equal(source.batch(6, 8)["inputs"], a["inputs"])
    rows = source.batch(5, 8, slice(2, 6))
    np.testing.assert_array_equal(rows["inputs"], a["inputs"][2:6])


DEEPSEEK_V3_LIKE = dict(attn_pattern=("mla",), router_scoring="sigmoid", n_experts=4,
                        n_group=2, topk_group=1, top_k=2, n_shared_experts=1, first_k_dense=1,
                        mtp_depth=1)


@pytest.mark.slow  # trains end to end
@pytest.mark.parametrize("architecture", [dict(attn_pattern=("mha", "mhla")),
                                          dict(attn_pattern=("mla",)), DEEPSEEK_V3_LIKE],
                         ids=["original", "mla", "deepseek_v3_like"])
def test_tiny_model_overfits_a_repeating_sequence(architecture):
    config = tiny_config(model=dict(n_layers=2, **architecture),
                         optim=dict(lr=1e-2, warmup_steps=5, total_steps=80, weight_decay=0.0),
                         train=dict(log_every=80))

    run = trainer.Trainer(config)
    run.source = Repeating()
    history = run.train()
    train_losses = [h["loss"] for h in history if "loss" in h]
    assert float(train_losses[-1]) < 0.3, train_losses  # from ln(64) = 4.2
    if config.model.mtp_depth:  # the token after next is as predictable here
        mtp_losses = [h["mtp_loss"] for h in history if "mtp_loss" in h]
        assert float(mtp_losses[-1]) < 0.5, mtp_losses
    assert history[-1]["eval_loss"] < 0.3


@pytest.mark.slow
def test_train_py_runs_end_to_end(tmp_path):
    command = [sys.executable, "train.py", "--config", "configs/tiny.py",
               "--config.model.max_seq_len=32", "--config.model.d_model=32",
               "--config.model.n_layers=2", "--config.model.latent_k=4",
               "--config.optim.total_steps=4", "--config.optim.warmup_steps=1",
               "--config.train.batch_size=2", "--config.train.log_every=2",
               "--config.data.max_bytes=200000", "--config.data.cache_dir=",
               f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=BARE_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("step ")]
    assert lines[0].startswith("step 2/4 | loss ") and any("eval_loss" in l for l in lines)
    losses = [float(l.split("| loss ")[1].split()[0]) for l in lines if "| loss " in l]
    assert all(np.isfinite(losses))


@pytest.mark.slow
def test_a_short_run_needs_one_override(tmp_path):
    """`--config.optim.total_steps=3` alone: the warmup of configs/tiny.py (30 steps) is
    clamped to the run, with one line that says so."""
    command = [sys.executable, "train.py", "--config", "configs/tiny.py",
               "--config.optim.total_steps=3", "--config.model.n_layers=1",
               "--config.model.d_model=32", "--config.train.batch_size=2",
               "--config.train.eval_batches=1", "--config.data.max_bytes=50000",
               "--config.data.cache_dir=", f"--workdir={tmp_path / 'run'}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300,
                            env=BARE_ENV)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("optim.warmup_steps=30 does not fit") == 1
    assert "step 3/3 | loss" in result.stdout


@pytest.mark.slow
def test_bad_config_override_fails_with_a_clear_message():
    command = [sys.executable, "train.py", "--config", "configs/tiny.py",
               "--config.model.n_heads=5"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env=BARE_ENV)
    assert result.returncode != 0
    assert "not divisible by model.n_heads=5" in result.stderr


def test_the_eval_loss_is_a_mean_over_scored_tokens_not_over_batches():
    """Held-out batches with few scored tokens (short answers, padding) weigh as little as
    they hold: the eval loss is the summed cross-entropy over the summed weights."""
    run = trainer.Trainer(tiny_config(train=dict(eval_batches=2)))
    vocab, length = run.config.model.vocab_size, run.config.model.max_seq_len

    class Uneven:  # the second batch scores only two positions per row
        def batch(self, step, batch_size, rows=slice(None), split="train"):
            tokens = np.random.default_rng(step).integers(0, vocab, (batch_size, length + 1))
            weights = np.ones(tokens.shape, np.float32)
            weights[:, 3:] = 1.0 if step % 2 == 0 else 0.0
            return sources.as_batch(tokens[rows], weights[rows])

    run.source = Uneven()
    mean_of = jax.jit(lambda state, batch: cross_entropy(
        nnx.merge(run.graphdefs.model, state)(batch["inputs"]).logits_BxLxV, batch["targets"],
        batch["weights"]))
    sums, scored, means = [], [], []
    for step in range(2):
        batch = run.batch(step, "val")
        mean = float(mean_of(run.state.model, batch))
        scored.append(float(jnp.sum(batch["weights"])))
        sums.append(mean * scored[-1])
        means.append(mean)
    assert scored[0] > 4 * scored[1]
    expected = sum(sums) / sum(scored)
    assert abs(expected - np.mean(means)) > 1e-3  # the two means tell the cases apart
    np.testing.assert_allclose(run.evaluate(), expected, rtol=1e-5)
