"""LoRA: adapters start as the base model, train while the base stays bitwise frozen, hold the
only optimizer state, merge into the weights, export merged, and refuse bad targets."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

import minids_jax
from minids_jax import checkpoint
from minids_jax.config import ConfigError
from minids_jax.hf import adapter, convert
from minids_jax.model import MiniDeepSeek, lora
from minids_jax.training import checkpointer
from minids_jax.training.trainer import Trainer
from tests.factories import V3_MODEL, compute_config, saved_lora_run, tiny_config

SMALL = dict(V3_MODEL, n_layers=2)  # a dense layer, an MoE layer (and the MTP module's)

EVERY_KIND = ("attn.*", "mlp.*", "shared.*", "moe.w1", "moe.w3", "head")


def adapted(rank=2, targets=EVERY_KIND, seed=0):
    config = tiny_config(model=SMALL, lora=dict(rank=rank, targets=targets))
    model = MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(seed))
    base = nnx.clone(model)
    names = lora.add_adapters(model, config.lora, nnx.Rngs(1))
    return config, base, model, names


def assert_close(ours, expected):
    """Equal to float32 rounding: merging reassociates x @ W + s * (x @ A) @ B."""
    scale = np.abs(np.asarray(expected)).max()
    np.testing.assert_allclose(np.asarray(ours) / scale, np.asarray(expected) / scale, atol=3e-5)


# A forward as one compiled program (eager, each op would compile on its own).
logits = nnx.jit(lambda model, tokens: model(tokens).logits_BxLxV)


def tokens(seed=0):
    return np.random.RandomState(seed).randint(0, 64, (2, 16)).astype(np.int32)


def test_fresh_adapters_compute_the_base_model_exactly():
    _, base, model, names = adapted()
    assert "blocks.1.moe.w1" in names and "blocks.0.mlp.w2" in names and "head" in names
    assert "mtp.0.block.attn.q_up" in names  # the MTP module's attention is attention too
    np.testing.assert_array_equal(logits(model, tokens()), logits(base, tokens()))


def test_merged_adapters_compute_the_adapted_model():
    _, _, model, _ = adapted()
    keys = iter(jax.random.split(jax.random.key(2), 200))
    for variable in jax.tree.leaves(nnx.state(model, nnx.LoRAParam),
                                    is_leaf=lambda x: isinstance(x, nnx.Variable)):
        variable[...] = 0.3 * jax.random.normal(next(keys), variable.shape)
    merged = lora.merge_lora(model)
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    adapted_logits = np.asarray(logits(model, tokens()))
    assert not np.allclose(adapted_logits, 0)
    assert_close(logits(merged, tokens()), adapted_logits)


@pytest.mark.parametrize("train_norms", [False, True])
def test_what_trains_is_the_adapters_and_optionally_the_norm_gains(train_norms):
    config, _, model, _ = adapted()
    config = dataclasses.replace(config, lora=dataclasses.replace(config.lora,
                                                                  train_norms=train_norms))
    names = {str(path[-1]) for path, _ in nnx.to_flat_state(
        nnx.state(model, lora.trainable(config.lora)))}
    assert names == ({"lora_a", "lora_b", "w1_lora_a", "w1_lora_b", "w3_lora_a", "w3_lora_b"}
                     | ({"scale"} if train_norms else set()))


@pytest.mark.parametrize("targets, message", [
    (("q_proj",), r"match no projection.*attn\.q_up"),
    (("moe.gate",), r"match no projection"),  # the router is never adapted
])
def test_targets_that_match_nothing_list_the_projections(targets, message):
    with pytest.raises(ConfigError, match=message):
        adapted(targets=targets)


def test_a_rank_above_a_projection_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"lora.rank=20 exceeds .* blocks.0.attn.kv_up"):
        adapted(rank=20)


def saved_tree(step_dir) -> set[tuple[str, ...]]:
    """The paths of the arrays a checkpoint's model item holds, as written."""
    import orbax.checkpoint as ocp

    return set(convert.flat_paths(ocp.PyTreeCheckpointHandler().metadata(
        step_dir / "model").tree))


@pytest.mark.slow  # trains end to end
def test_a_lora_run_trains_only_its_adapters_and_exports_merged(tmp_path, compile_cache):
    # A small instruction set: the byte tokenizer's vocabulary, and room for the prompt.
    records = [{"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
               for word in ("stone", "river", "cloud", "tiger") * 8]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tiny_config(model=dict(SMALL, mtp_depth=0, vocab_size=259, max_seq_len=80),
                         optim=dict(total_steps=8, lr=1e-2), checkpoint=dict(every=4),
                         data=dict(source="jsonl", path=str(tmp_path / "data.jsonl")))
    state = nnx.to_pure_dict(nnx.state(MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(3))))
    checkpoint.save_model(tmp_path / "base", config, state)
    tuned = dataclasses.replace(
        config, lora=dataclasses.replace(config.lora, rank=2, targets=EVERY_KIND,
                                         train_norms=True),
        checkpoint=dataclasses.replace(config.checkpoint, init_from=str(tmp_path / "base")))
    run = Trainer(tuned, str(tmp_path / "lora"))
    optimizer_values = sum(x.size for x in jax.tree.leaves(run.state.optimizer))
    adapter_values = sum(x.size for x in jax.tree.leaves(nnx.state(
        nnx.merge(run.graphdefs.model, run.state.model), lora.trainable(tuned.lora))))
    assert optimizer_values < 2 * adapter_values + 10  # moments of what trains only
    history = run.train()
    losses = [r["loss"] for r in history if "loss" in r]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses

    # The checkpoints hold the adapters and norm gains, and name the base.
    step_dir = tmp_path / "lora" / "checkpoints" / "8"
    paths = saved_tree(step_dir)
    assert paths and all(lora.is_adapter(p[-1]) or p[-1] == "scale" for p in paths), paths
    assert ("blocks", "1", "moe", "w1_lora_a") in paths
    base_dir = tmp_path / "base" / "checkpoints" / "0"
    assert checkpoint.read_meta(step_dir)["base"]["step_dir"] == str(base_dir)
    saved = convert.flat_paths(checkpoint.load_params(tmp_path / "lora"))  # base + adapters
    for path, array in convert.flat_paths(state).items():  # the base, bitwise unchanged
        if path[-1] != "scale":
            np.testing.assert_array_equal(saved[path], array, err_msg=str(path))
    model, _ = minids_jax.load(tmp_path / "lora")  # the adapted model: the trainer's
    np.testing.assert_array_equal(logits(model, tokens()), logits(run.model(), tokens()))

    # Resumed from step 4, the run goes on as if never stopped.
    shutil.copytree(tmp_path / "lora", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")
    resumed = Trainer(tuned, str(tmp_path / "resumed"))
    again = {r["step"]: r["loss"] for r in resumed.train() if "loss" in r}
    assert sorted(again) == [5, 6, 7, 8]
    straight = {r["step"]: r["loss"] for r in history if "loss" in r}
    assert all(again[step] == straight[step] for step in again)
    for ours, theirs in zip(jax.tree.leaves(jax.device_get(resumed.state)),
                            jax.tree.leaves(jax.device_get(run.state))):
        np.testing.assert_array_equal(ours, theirs)

    convert.export_run(tmp_path / "lora", tmp_path / "hf", dtype="float32", log=lambda _: None)
    convert.import_dir(tmp_path / "hf", tmp_path / "merged", tiny_config(model=dict(
        vocab_size=259)), log=lambda _: None)
    merged, _ = minids_jax.load(tmp_path / "merged")
    assert_close(logits(merged, tokens()), logits(model, tokens()))

    # Without a base to refer to (no init_from), the whole model is saved.
    alone = dataclasses.replace(tuned, checkpoint=dataclasses.replace(tuned.checkpoint,
                                                                      init_from=""))
    with checkpointer.Checkpointer(alone, tmp_path / "alone") as whole:
        whole.save(8, run.state)
    assert saved_tree(tmp_path / "alone" / "checkpoints" / "8") == set(saved)

    # A base that moved: loading names it and the fix; resuming finds it at init_from.
    (tmp_path / "base").rename(tmp_path / "moved")
    for load in (minids_jax.load, checkpoint.load_params):
        with pytest.raises(checkpoint.MissingBaseError, match=f"holds adapters only, on the base "
                                                        f"{base_dir}, which is gone .* put the "
                                                        f"base back at {base_dir}"):
            load(tmp_path / "lora")
    lines = []
    moved = dataclasses.replace(tuned, checkpoint=dataclasses.replace(
        tuned.checkpoint, init_from=str(tmp_path / "moved")))
    assert checkpointer.Checkpointer(moved, tmp_path / "resumed", log=lines.append
                                     ).restore_or_initialize(resumed.state) == 8
    assert f"the base of these adapters is now {tmp_path / 'moved'}" in lines[0], lines


def test_peft_targets_are_short_names_only_where_they_cover_every_such_module():
    every = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "o_proj")]
    assert adapter.peft_targets(set(every), every + ["lm_head"]) == ["o_proj", "q_proj"]
    # Layer 1's o_proj alone: "o_proj" would adapt layer 0's too.
    assert adapter.peft_targets({every[0], every[2], every[3]}, every) == [
        "model.layers.1.self_attn.o_proj", "q_proj"]


def test_the_peft_adapter_has_peft_names_shapes_and_scaling(tmp_path):
    from minids_jax.hf.files import TensorFiles

    _, run = saved_lora_run(tmp_path, dropout=0.1)
    adapter.export_adapter(run, tmp_path / "adapter", log=lambda _: None)
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (settings["peft_type"], settings["r"], settings["lora_alpha"],
            settings["lora_dropout"]) == ("LORA", 2, 4.0, 0.1)
    # PEFT's short names, as its users write them: every layer's projections are adapted.
    assert settings["target_modules"] == ["kv_a_proj_with_mqa", "kv_b_proj", "lm_head",
                                          "o_proj", "q_a_proj", "q_b_proj"]
    files = TensorFiles(tmp_path / "adapter")
    prefix = "base_model.model.model.layers.0.self_attn.kv_b_proj"
    assert files.shape(f"{prefix}.lora_A.weight") == (2, 16)  # [rank, in]
    assert files.shape(f"{prefix}.lora_B.weight") == (2 * (8 + 6), 2)  # [out, rank]
    params = convert.flat_paths(checkpoint.load_params(run))
    np.testing.assert_array_equal(files[f"{prefix}.lora_B.weight"],
                                  params[("blocks", "0", "attn", "kv_up", "lora_b")].T)


@pytest.mark.parametrize("targets, message", [
    (("shared.*",), r"MLPs' adapters .* would not load in peft"),
])
def test_adapters_peft_cannot_load_are_refused(tmp_path, targets, message):
    from minids_jax.errors import UserError

    _, run = saved_lora_run(tmp_path, targets=targets)
    with pytest.raises(UserError, match=message):
        adapter.export_adapter(run, tmp_path / "adapter", log=lambda _: None)


def test_routed_expert_adapters_go_out_in_peft_form_on_the_fused_experts(tmp_path):
    """gate (w1) and up (w2) share gate_up_proj's A and B at rank 2R (B block-diagonal, alpha
    doubled); each expert's delta, computed from the files as peft computes it, is ours."""
    from minids_jax.hf.files import TensorFiles

    _, run = saved_lora_run(tmp_path, targets=("attn.*", "moe.w1", "moe.w2", "moe.w3"),
                            model=dict(V3_MODEL, n_layers=2))  # with an MTP module
    logs = []
    adapter.export_adapter(run, tmp_path / "adapter", log=logs.append)
    assert any(line.startswith("skipping the adapters of mtp.0.block.moe.w1") for line in logs)
    settings = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert settings["target_parameters"] == ["mlp.experts.down_proj",
                                             "mlp.experts.gate_up_proj"]
    assert (settings["r"], settings["lora_alpha"]) == (2, 4.0)
    assert settings["rank_pattern"] == {"mlp.experts.gate_up_proj": 4}
    assert settings["alpha_pattern"] == {"mlp.experts.gate_up_proj": 8.0}
    files = TensorFiles(tmp_path / "adapter")
    params = convert.flat_paths(checkpoint.load_params(run))
    n_experts, d_model, rank = params[("blocks", "1", "moe", "w1_lora_a")].shape

    def ours(weight):  # [E, out, in], as transformers stores the experts
        a = params[("blocks", "1", "moe", f"{weight}_lora_a")]
        b = params[("blocks", "1", "moe", f"{weight}_lora_b")]
        return np.swapaxes(4.0 / rank * (a @ b), 1, 2)

    def peft_delta(prefix, rank, alpha):  # peft's ParamWrapper.get_delta_weight
        a, b = files[f"{prefix}.lora_A.weight"], files[f"{prefix}.lora_B.weight"]
        a = a.reshape(n_experts, rank, a.shape[-1])
        b = b.reshape(b.shape[0], rank, n_experts).transpose(2, 0, 1)
        return alpha / rank * (b @ a)

    experts = "base_model.model.model.layers.1.mlp.experts"
    # Both parameters wrapped: gate_up_proj's wrapper is the inner one, peft's `base_layer`.
    assert files.shape(f"{experts}.base_layer.lora_A.weight") == (n_experts * 2 * rank, d_model)
    np.testing.assert_allclose(peft_delta(f"{experts}.base_layer", 2 * rank, 8.0),
                               np.concatenate([ours("w1"), ours("w2")], axis=1), atol=1e-6)
    np.testing.assert_allclose(peft_delta(experts, rank, 4.0), ours("w3"), atol=1e-6)


def test_epochs_set_the_steps_from_the_examples(tmp_path):
    records = [{"instruction": "Say it.", "input": "", "output": str(i)} for i in range(50)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    config = tiny_config(model=dict(vocab_size=259, max_seq_len=48),
                         data=dict(source="jsonl", path=str(tmp_path / "data.jsonl")),
                         train=dict(epochs=2.0, batch_size=4))
    run = Trainer(config)
    rows = len(run.source.rows["train"])  # the examples less the held-out ones
    assert 40 <= rows < 50
    assert run.config.optim.total_steps == -(-2 * rows // 4)
    with pytest.raises(ConfigError, match=r"train.epochs=2.0 counts passes over instruction"):
        Trainer(tiny_config(train=dict(epochs=2.0)))  # random tokens have no examples


def test_adapter_dropout_drops_the_adapters_input_at_its_rate_while_training_only():
    from minids_jax.model import layers

    # kernel 0 and identity adapters: the layer's output is what the adapter reads.
    projection = layers.linear(64, 64, (None, None), rngs=nnx.Rngs(0), dtype="float32",
                               param_dtype="float32")
    projection.kernel[...] = np.zeros((64, 64), np.float32)
    projection.lora_a, projection.lora_b = nnx.LoRAParam(np.eye(64)), nnx.LoRAParam(np.eye(64))
    projection.lora_scale = 1.0
    x = np.ones((64, 64), np.float32)
    np.testing.assert_array_equal(projection(x), x)  # outside training: nothing dropped
    with layers.adapter_dropout(jax.random.key(0), 0.25):
        first, second = np.asarray(projection(x)), np.asarray(projection(x))
        features, kernel = projection.as_one_matmul(x)  # the head loss's form: x, drop(x)
    np.testing.assert_allclose(features @ kernel, features[:, 64:], atol=1e-6)
    assert set(np.unique(features[:, 64:])) == {0.0, np.float32(1 / 0.75)}
    assert set(np.unique(first)) == {0.0, np.float32(1 / 0.75)}  # the kept ones scaled up
    assert abs(np.mean(first == 0) - 0.25) < 0.02
    assert np.mean(first != second) > 0.2  # each adapter call draws its own mask
    with layers.adapter_dropout(jax.random.key(0), 0.25):  # the same key: the same masks
        np.testing.assert_array_equal(projection(x), first)


def test_adapter_dropout_masks_do_not_depend_on_scanning_and_are_refused_for_experts():
    from minids_jax.model import layers
    from minids_jax.training import loss as loss_lib
    from tests.factories import compute_config

    config = tiny_config(model=dict(V3_MODEL, n_layers=4, first_k_dense=0, mtp_depth=0),
                         lora=dict(rank=2, targets=("attn.*", "head"), dropout=0.3))
    batch = {"inputs": tokens(0), "targets": tokens(1), "weights": np.ones((2, 16))}

    def loss(scan_layers, rate):
        model = MiniDeepSeek(config.model, compute_config(scan_layers=scan_layers,
                                                             scan_min_repeats=2),
                             rngs=nnx.Rngs(0))
        lora.add_adapters(model, config.lora, nnx.Rngs(1))
        for variable in jax.tree.leaves(nnx.state(model, nnx.LoRAParam),
                                        is_leaf=lambda v: isinstance(v, nnx.Variable)):
            variable[...] = 0.3 * jax.random.normal(jax.random.key(variable.size),
                                                    variable.shape)

        @nnx.jit
        def dropped_loss(model):
            with layers.adapter_dropout(jax.random.key(7), rate):
                return loss_lib.total_loss(model, batch, 16, 0.0)[0]
        return float(dropped_loss(model))

    scanned, looped, undropped = loss(True, 0.3), loss(False, 0.3), loss(True, 0.0)
    assert scanned == pytest.approx(looped, rel=1e-6)  # the same masks, layer by layer
    assert abs(scanned - undropped) > 1e-3
    with pytest.raises(ConfigError, match=r"lora.dropout=0.1 .* routed experts' "
                                          r"\(blocks.1.moe.w1, ...\).*set lora.dropout=0"):
        config = tiny_config(model=SMALL, lora=dict(rank=2, targets=("moe.w1",),
                                                    dropout=0.1))
        lora.add_adapters(MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(0)), config.lora,
                          nnx.Rngs(1))


@pytest.mark.slow  # trains end to end
def test_a_lora_step_with_dropout_draws_its_masks_from_the_seed_and_step():
    def updates(dropout, steps):
        """The adapters after one update from the first state, at each optimizer step."""
        config = tiny_config(model=dict(V3_MODEL, n_layers=2, mtp_depth=0),
                             lora=dict(rank=2, targets=("attn.*", "head"), dropout=dropout),
                             optim=dict(eps=1.0, lr=1.0))
        out = []
        with Trainer(config) as run:
            for step in steps:
                state = jax.tree.map(jax.numpy.copy, run.step_state)  # the step donates it
                state = state._replace(step=jax.numpy.asarray(step, state.step.dtype))
                after, _ = run.train_step(state, run.batch(0))
                out.append({k: v for k, v in convert.flat_paths(jax.device_get(
                    nnx.to_pure_dict(after.model))).items() if lora.is_adapter(k[-1])})
        return out

    (plain,), (dropped, again, later) = updates(0.0, [0]), updates(0.5, [0, 0, 3])
    for path in dropped:  # a resumed step draws what the uninterrupted one drew
        np.testing.assert_array_equal(again[path], dropped[path], err_msg=str(path))
    b = ("blocks", "0", "attn", "q_up", "lora_b")
    assert not np.allclose(dropped[b], plain[b]) and not np.allclose(dropped[b], later[b])


@pytest.mark.parametrize("targets, expected", [
    (("q_proj", "v_proj"), {"attn.attention.q", "attn.attention.v"}),
    (("o_proj", "gate_proj", "down_proj"), {"attn.attention.out", "mlp.w1", "mlp.w3"}),
    (("all-linear",), {f"attn.attention.{p}" for p in ("q", "k", "v", "out")}
     | {f"mlp.w{i}" for i in (1, 2, 3)}),
])
def test_peft_target_names_name_the_same_projections(targets, expected):
    """What a PEFT user writes in target_modules works as lora.targets: transformers' module
    names, and 'all-linear' (every Linear but the head; routed experts are no Linear)."""
    config = tiny_config(model=dict(attn_pattern=("mha",), n_heads=4, n_kv_heads=2,
                                    n_layers=2, first_k_dense=2, mtp_depth=0),
                         lora=dict(rank=2, targets=targets))
    model = MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(0))
    adapted = lora.add_adapters(model, config.lora, nnx.Rngs(1))
    assert {path.split(".", 2)[2] for path in adapted} == expected
    assert {path.split(".")[1] for path in adapted} == {"0", "1"}


def test_all_linear_leaves_the_routed_experts_and_the_head_of_a_deepseek_model():
    config = tiny_config(model=dict(V3_MODEL, n_layers=2, mtp_depth=0),
                         lora=dict(rank=2, targets=("all-linear",)))
    model = MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(0))
    adapted = lora.add_adapters(model, config.lora, nnx.Rngs(1))
    assert "blocks.1.attn.kv_up" in adapted and "blocks.1.moe.shared.w1" in adapted
    assert not [p for p in adapted if p == "head" or p.endswith(("moe.w1", "moe.w2", "moe.w3"))]
    with pytest.raises(ConfigError, match=r"\['k_proj'\] match no projection.*'q_proj'"):
        lora.add_adapters(MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(0)),
                          dataclasses.replace(config.lora, targets=("k_proj",)), nnx.Rngs(1))


def test_lora_a_starts_as_peft_does_uniform_within_one_over_root_fan_in():
    """PEFT draws lora_A by kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(in), 1/sqrt(in)), std
    1/sqrt(3 in), `in` the projection's input width (an expert's own, not E times it)."""
    fan_in = 4096
    config = tiny_config(model=dict(SMALL, moe_hidden_dim=fan_in, mtp_depth=0),
                         lora=dict(rank=8, targets=("moe.w3", "shared.w3")))
    model = MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(0))
    lora.add_adapters(model, config.lora, nnx.Rngs(1))
    moe = model.blocks[1].moe
    bound = 1 / np.sqrt(fan_in)
    for a in (moe.w3_lora_a[...], moe.shared.w3.lora_a[...]):
        assert a.shape[-2] == fan_in
        a = np.asarray(a)
        assert np.abs(a).max() <= bound
        assert np.abs(a).max() > 0.99 * bound
        np.testing.assert_allclose(a.std(), bound / np.sqrt(3), rtol=0.03)
        assert abs(a.mean()) < 0.02 * bound
