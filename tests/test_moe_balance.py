"""What the MoE balancing sees: the scored tokens only (padding counts toward neither the
expert loads that move the router biases nor the balance losses), and how the layers' balance
losses add up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minids_jax.model import MiniDeepSeek
from minids_jax.training import loss as loss_lib
from minids_jax.training import steps
from tests.factories import compute_config, small_model_config

# Sigmoid routing with groups and a shared expert, and an MTP module (its MoE layer is
# balanced too).
CFG = small_model_config(attn_pattern=("mla",), router_scoring="sigmoid", n_experts=8, top_k=2,
                         n_group=2, topk_group=1, n_shared_experts=1, mtp_depth=1)
BALANCE = ("expert_load_NxE", "aux_loss", "sequence_aux_loss")


def scored_batch(rows=2, length=16, seed=0):
    """Rows of random tokens, the last one's final positions unscored (a short example)."""
    tokens = jax.random.randint(jax.random.key(seed), (rows, length + 1), 0, CFG.vocab_size)
    weights = jnp.ones((rows, length)).at[-1, length - 5:].set(0.0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def with_padding_rows(batch, seed=1):
    """`batch` with a row of padding (other tokens, weight 0) after each of its rows."""
    noise = jax.random.randint(jax.random.key(seed), batch["inputs"].shape, 0, CFG.vocab_size)
    padding = {"inputs": noise, "targets": noise, "weights": jnp.zeros_like(batch["weights"])}
    return jax.tree.map(lambda a, b: jnp.stack([a, b], 1).reshape(-1, *a.shape[1:]),
                        batch, padding)


def test_padding_rows_count_toward_neither_the_expert_loads_nor_the_balance_losses():
    model = MiniDeepSeek(CFG, compute_config(), rngs=nnx.Rngs(0))
    aux = nnx.jit(lambda model, batch: loss_lib.model_loss(model, batch, chunk=16)[1])
    scored = scored_batch()
    alone, padded = aux(model, scored), aux(model, with_padding_rows(scored))
    assert alone["expert_load_NxE"].shape[0] == 3  # two main MoE layers and the MTP module's
    for key in BALANCE:
        np.testing.assert_allclose(padded[key], alone[key], rtol=1e-5, err_msg=key)
    # Each layer counts the tokens its loss scores (the MTP module's one fewer per row).
    np.testing.assert_array_equal(alone["scored_tokens_N"], [27, 27, 25])
    np.testing.assert_array_equal(padded["scored_tokens_N"], alone["scored_tokens_N"])


def test_a_part_of_padding_moves_no_expert_load_when_parts_are_merged():
    """With train.grad_accum_steps, each part's loads weigh by its scored tokens: a batch whose
    second part is padding balances the router biases as its first part alone."""
    model = MiniDeepSeek(CFG, compute_config(), rngs=nnx.Rngs(0))
    aux = nnx.jit(lambda model, batch: loss_lib.model_loss(model, batch, chunk=16)[1])
    first, second = scored_batch(seed=0), scored_batch(seed=2)
    padding = dict(second, weights=jnp.zeros_like(second["weights"]))
    whole = aux(model, jax.tree.map(lambda a, b: jnp.concatenate([a, b]), first, second))
    parts = [aux(model, first), aux(model, second), aux(model, padding)]

    def merged(*chosen):
        return steps.merge_parts(jax.tree.map(lambda *v: jnp.stack(v), *chosen))

    np.testing.assert_allclose(merged(parts[0], parts[2])["expert_load_NxE"],
                                parts[0]["expert_load_NxE"], rtol=1e-6)
    np.testing.assert_allclose(merged(parts[0], parts[1])["expert_load_NxE"],
                                whole["expert_load_NxE"], rtol=1e-5)


def test_the_balance_losses_add_up_over_the_moe_layers():
    """As DeepSeek's code adds each MoE layer's alpha-weighted balance loss, two identical
    layers (each passing its input on unchanged, so both route the same tokens) weigh twice as
    much as one; the metrics stay per-layer means (1.0 when routing is uniform)."""
    @nnx.jit
    def balance(model, batch):
        total, (ce, aux) = loss_lib.total_loss(model, batch, 16, 0.5, 0.25)
        return total - ce, aux

    results = []
    for n_layers in (1, 2):
        cfg = small_model_config(attn_pattern=("mha",), n_layers=n_layers, n_experts=4, top_k=2)
        model = MiniDeepSeek(cfg, compute_config(), rngs=nnx.Rngs(0))
        first = model.blocks[0]
        first.attn.attention.out.kernel[...] = jnp.zeros_like(first.attn.attention.out.kernel)
        first.moe.w3[...] = jnp.zeros_like(first.moe.w3)
        for block in model.blocks[1:]:
            nnx.update(block, nnx.state(first))
        results.append(balance(model, scored_batch()))
    (one, one_aux), (two, two_aux) = results
    assert float(one) > 0.5  # the Switch loss is at least 1 per layer
    np.testing.assert_allclose(two, 2 * one, rtol=1e-6)
    for key in ("aux_loss", "sequence_aux_loss"):
        np.testing.assert_allclose(two_aux[key], one_aux[key], rtol=1e-6)
