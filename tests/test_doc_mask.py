"""Document masking (data.doc_mask): packed documents do not see each other, and restart."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax import MiniDeepSeek
from minids_jax.data.instructions import TokenizedExamples
from minids_jax.data.sources import InstructionSource, WindowSource
from minids_jax.training import loss as loss_lib
from minids_jax.training import trainer
from tests.factories import compute_config, small_model_config, tiny_config

EOS = 2


def test_text_windows_number_their_documents_and_restart_positions():
    stream = np.array([5, 6, EOS, 7, 8, 9, EOS, 3, 4, 10, 11, EOS], np.int32)
    source = WindowSource({"train": stream, "val": stream}, seq_len=8, seed=0, name="t",
                          doc_eos=EOS)
    batch = source.batch(0, 16)
    assert len({tuple(row) for row in batch["inputs"]}) > 1  # windows at several offsets
    for inputs, segments, positions, weights in zip(
            batch["inputs"], batch["segments"], batch["positions"], batch["weights"]):
        # A document ends with its EOS; positions count from each document's first token,
        # and an EOS's target (the next document's first token) is not scored.
        np.testing.assert_array_equal(segments, np.cumsum(np.r_[0, inputs[:-1] == EOS]))
        for i in range(8):
            first = max([0] + [j + 1 for j in range(i) if inputs[j] == EOS])
            assert positions[i] == i - first
        np.testing.assert_array_equal(weights, inputs != EOS)
    unmasked = WindowSource({"train": stream, "val": stream}, 8, 0, "t").batch(0, 16)
    assert "segments" not in unmasked and unmasked["weights"].all()


def test_packed_examples_are_documents():
    tokens = np.array([1, 5, 6, 2, 1, 7, 2], np.int32)
    examples = TokenizedExamples(tokens, np.array([0, 4, 7]), np.ones(7, bool))
    source = InstructionSource({"train": examples, "val": examples}, seq_len=9, seed=0,
                               pad_id=0, pack=True, doc_mask=True)
    batch = source.batch(0, 1)
    row = np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]])
    first_len = 4 if row[1] == 5 else 3
    expected = [0] * first_len + [1] * (9 - first_len)  # the padding joins the last
    np.testing.assert_array_equal(batch["segments"][0], expected[:9])
    np.testing.assert_array_equal(batch["positions"][0][:first_len], np.arange(first_len))
    assert batch["positions"][0][first_len] == 0
    assert batch["weights"][0][first_len - 1] == 0  # no example predicts the next one


def packed(first_doc, second_doc):
    """A window of two documents: inputs, positions restarting at the second, segments."""
    tokens = np.concatenate([first_doc, second_doc])[None].astype(np.int32)
    positions = np.concatenate([np.arange(len(first_doc)), np.arange(len(second_doc))])[None]
    segments = np.concatenate([np.zeros(len(first_doc)), np.ones(len(second_doc))])[None]
    return jnp.asarray(tokens), jnp.asarray(positions, jnp.int32), jnp.asarray(segments,
                                                                               jnp.int32)


@pytest.fixture(scope="module")
def model():
    # Every attention kind, a window of four MHLA segments, a multi-token-prediction module.
    cfg = small_model_config(n_layers=3, attn_pattern=("mha", "mhla", "mla"), mtp_depth=1)
    return MiniDeepSeek(cfg, compute_config(), rngs=nnx.Rngs(0))


@nnx.jit
def masked_logits(model, tokens_BxL, positions_BxL, segments_BxL):
    return model(tokens_BxL, positions_BxL, segments_BxL=segments_BxL).logits_BxLxV


@nnx.jit
def plain_logits(model, tokens_BxL, positions_BxL):
    return model(tokens_BxL, positions_BxL).logits_BxLxV


def test_a_document_computes_as_if_it_were_alone_in_its_window(model):
    rng = np.random.default_rng(0)
    doc = rng.integers(3, 64, 11)
    # The same document after two different ones (of 5 and 7 tokens, so it starts off a
    # latent segment boundary in one window and on it in none), and on its own (what
    # follows it in that window cannot change it: attention is causal).
    after_five = masked_logits(model, *packed(rng.integers(3, 64, 5), doc))[0, 5:]
    after_seven = masked_logits(model, *packed(rng.integers(3, 64, 7), doc[:9]))[0, 7:]
    alone_tokens, arange, _ = packed(doc, rng.integers(3, 64, 5))
    alone = plain_logits(model, alone_tokens, jnp.arange(16)[None])[0, :11]
    np.testing.assert_allclose(after_five, alone, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(after_seven, alone[:9], rtol=1e-5, atol=1e-5)
    # Unmasked, the first document leaks into the second: the masking is what holds.
    tokens, positions, _ = packed(rng.integers(3, 64, 5), doc)
    leaky = plain_logits(model, tokens, positions)[0, 5:]
    assert np.abs(leaky - alone).max() > 1e-3
    # One document filling the window: the plain forward (MHLA's latents included).
    np.testing.assert_allclose(
        masked_logits(model, alone_tokens, jnp.arange(16)[None], jnp.zeros((1, 16), jnp.int32)),
        plain_logits(model, alone_tokens, jnp.arange(16)[None]), rtol=1e-5, atol=1e-5)


def test_the_losses_of_a_document_ignore_the_one_before(model):
    """Cross-entropy and the multi-token-prediction loss of the second document are the same
    whatever document precedes it, and no target beyond a document is scored."""
    rng = np.random.default_rng(1)
    doc = rng.integers(3, 64, 11)
    losses = []
    for first in (rng.integers(3, 64, 6), rng.integers(3, 64, 6)):
        tokens, positions, segments = packed(first, doc)
        batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
                 "positions": positions[:, :-1], "segments": segments[:, :-1],
                 "weights": jnp.asarray((segments[:, 1:] == 1) & (segments[:, :-1] == 1),
                                        jnp.float32)}
        ce, aux = nnx.jit(lambda m, b: loss_lib.model_loss(m, b, 16))(model, batch)
        losses.append((float(ce), float(aux["mtp_loss"])))
        # Module 1 at position i scores the token two ahead: never from the next document.
        mtp_weights = loss_lib.ahead_weights({**batch, "weights": jnp.ones_like(
            batch["weights"])}, 1)[0]
        assert mtp_weights[4] == 1 and mtp_weights[5] == 0  # 4 -> 6 crosses into doc
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)


@pytest.mark.slow  # trains end to end
def test_a_run_trains_on_masked_documents_with_accumulation(tmp_path):
    text = tmp_path / "docs"
    text.mkdir()
    for i in range(40):  # documents shorter than a window: every window holds an EOS
        (text / f"{i}.txt").write_text(f"doc {i}: " + "ab " * (i % 3))
    config = tiny_config(data=dict(source="text", path=str(text), doc_mask=True,
                                   val_fraction=0.2),
                         train=dict(grad_accum_steps=2),
                         model=dict(vocab_size=260, mtp_depth=1))
    run = trainer.Trainer(config, str(tmp_path / "run"))
    batch = run.batch(0)
    assert {"segments", "positions"} <= set(batch) and float(jnp.min(batch["weights"])) == 0
    losses = [float(h["loss"]) for h in run.train() if "loss" in h]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]
