"""Multi-token prediction: what each module reads and scores, and that decoding ignores it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minids_jax.model import MiniDeepSeek
from minids_jax.training import loss as loss_lib
from tests.factories import compute_config, small_model_config

CFG = small_model_config(attn_pattern=("mla",), router_scoring="sigmoid", n_shared_experts=1,
                         mtp_depth=2)


def batch(seed=0, length=16):
    tokens = jax.random.randint(jax.random.key(seed), (2, length + 1), 0, CFG.vocab_size)
    weights = jnp.ones((2, length)).at[0, 5].set(0.0).at[1, 10:].set(0.0)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "weights": weights}


def test_module_k_scores_the_token_k_plus_1_ahead_and_nothing_past_the_window():
    model = MiniDeepSeek(CFG, compute_config(), rngs=nnx.Rngs(0))
    data = batch()
    # Targets where the weight is zero do not count.
    changed = dict(data, targets=data["targets"].at[1, 12].set((data["targets"][1, 12] + 1) %
                                                              CFG.vocab_size))

    @nnx.jit  # one program: eager, each op would compile on its own
    def losses(model, data, changed):
        _, aux = loss_lib.model_loss(model, data, chunk=16)
        # By hand, on windows cut to the positions that have a token k + 1 ahead (causal, so
        # a shorter input gives the same outputs at the positions it keeps).
        trunk, _, _ = model.trunk(data["inputs"])
        hidden, by_hand = model.final_norm(trunk), []  # what the head reads
        for k, module in enumerate(model.mtp, start=1):
            length = data["inputs"].shape[1] - k
            positions = jnp.broadcast_to(jnp.arange(length), (2, length))
            joined = jnp.concatenate([module.embed_norm(model.embed(data["inputs"][:, k:])),
                                      module.hidden_norm(hidden[:, :length])], axis=-1)
            hidden, _, _ = module.block(module.proj(joined), positions)
            logits = model.head(module.out_norm(hidden))
            by_hand.append(loss_lib.cross_entropy(logits, data["targets"][:, k:],
                                                  data["weights"][:, k:]))
        return (aux["mtp_loss"], jnp.mean(jnp.stack(by_hand)),
                loss_lib.model_loss(model, changed, 16)[1]["mtp_loss"])

    mtp_loss, by_hand, with_changed_target = losses(model, data, changed)
    np.testing.assert_allclose(mtp_loss, by_hand, rtol=1e-5)
    np.testing.assert_allclose(with_changed_target, mtp_loss, rtol=1e-6)


def test_the_mtp_loss_enters_the_total_and_decoding_ignores_the_modules():
    with_mtp = MiniDeepSeek(CFG, compute_config(), rngs=nnx.Rngs(1))
    without = MiniDeepSeek(small_model_config(**{**CFG.__dict__, "mtp_depth": 0}),
                           compute_config(), rngs=nnx.Rngs(1))
    data = batch()
    logits = nnx.jit(lambda model, tokens: model(tokens).logits_BxLxV)
    np.testing.assert_array_equal(logits(with_mtp, data["inputs"]),
                                  logits(without, data["inputs"]))

    @nnx.jit
    def total_and_grads(model, data):
        total, (ce, aux) = loss_lib.total_loss(model, data, 16, 0.0, 0.0, 0.5)
        grads = nnx.grad(lambda m: loss_lib.total_loss(m, data, 16, 0.0, 0.0, 0.5)[0])(model)
        return total, ce, aux["mtp_loss"], grads

    total, ce, mtp_loss, grads = total_and_grads(with_mtp, data)
    np.testing.assert_allclose(total, ce + 0.5 * mtp_loss, rtol=1e-6)
    assert float(jnp.abs(grads.mtp[1].proj.kernel[...]).sum()) > 0  # the deepest module learns


def test_the_first_module_reads_the_features_after_the_final_norm():
    """h^0 is what the main head reads, final_norm(trunk) (transformers' drafter, vLLM and
    Megatron-LM): the MTP loss moves with the final norm's gain."""
    model = MiniDeepSeek(CFG, compute_config(), rngs=nnx.Rngs(3))
    data = batch()

    @nnx.jit
    def mtp_grad_of_final_norm(model, data):
        return nnx.grad(lambda m: loss_lib.model_loss(m, data, 16)[1]["mtp_loss"])(model)

    grads = mtp_grad_of_final_norm(model, data)
    assert float(jnp.abs(grads.final_norm.scale[...]).sum()) > 0


def test_the_modules_moe_layers_are_balanced_like_the_main_ones():
    from minids_jax.training.steps import update_router_biases

    model = MiniDeepSeek(CFG, compute_config(), rngs=nnx.Rngs(2))
    # Both count the positions the main loss scores.
    loads = nnx.jit(lambda model, data: (loss_lib.model_loss(model, data, chunk=16)[1],
                                         model.trunk(data["inputs"],
                                                     scored_BxL=data["weights"] > 0)[1]))
    aux, main_aux = loads(model, batch())
    load_NxE = aux["expert_load_NxE"]
    assert load_NxE.shape[0] == main_aux["expert_load_NxE"].shape[0] + CFG.mtp_depth
    np.testing.assert_array_equal(load_NxE[:-CFG.mtp_depth], main_aux["expert_load_NxE"])
    before = [np.asarray(module.block.moe.bias[...]) for module in model.mtp]
    update_router_biases(model, load_NxE, rate=0.01)
    for k, module in enumerate(model.mtp):
        expected = before[k] + 0.01 * np.sign(1 / CFG.n_experts - load_NxE[-CFG.mtp_depth + k])
        np.testing.assert_allclose(module.block.moe.bias[...], expected, rtol=1e-6)
