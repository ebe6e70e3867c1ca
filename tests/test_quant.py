"""A quantized frozen base for LoRA (lora.base_quant): the formats' error bounds against a
numpy reference, what the backward pass keeps, the refusals, and a QLoRA run end to end."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minids_jax
from minids_jax import checkpoint
from minids_jax.checkpoint.loading import SavedParams
from minids_jax.config import ConfigError
from minids_jax.generation import generate
from minids_jax.hf import convert
from minids_jax.model import build, lora, quant
from minids_jax.training import checkpointer
from minids_jax.training.trainer import Trainer
from tests.factories import tiny_config

# Widths in multiples of NF4's block of 64: MLA (latents 64, values 2 x 32) and 4 routed
# experts of width 128.
QUANTIZABLE = dict(d_model=64, n_layers=1, n_heads=2, attn_pattern=("mla",), first_k_dense=0,
                   n_experts=4, top_k=2, mtp_depth=0, kv_lora_rank=64, qk_nope_head_dim=16,
                   qk_rope_head_dim=8, v_head_dim=32)
# A llama shape (grouped-query attention, dense SwiGLU) of the same widths.
LLAMA = dict(d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, attn_pattern=("mha",),
             first_k_dense=-1, dense_hidden_dim=128, mtp_depth=0, vocab_size=259,
             max_seq_len=80)


def nf4_reference(weight_IxO: np.ndarray):
    """The published NF4 code of each weight (nearest level after dividing its block of 64
    inputs by the block's absolute maximum), and those maxima: bitsandbytes' blocking of a
    torch [out, in] weight."""
    d_in, d_out = weight_IxO.shape
    blocks = weight_IxO.reshape(d_in // 64, 64, d_out)
    absmax = np.abs(blocks).max(axis=1)
    normed = blocks / np.where(absmax > 0, absmax, 1)[:, None, :]
    distance = np.abs(normed[..., None] - quant.NF4_LEVELS)
    return distance.argmin(-1).reshape(d_in, d_out), absmax, np.sort(distance, -1)


def test_nf4_picks_the_nearest_published_level_within_each_blocks_bound():
    weight = np.random.default_rng(0).standard_normal((256, 512)).astype(np.float32) * 0.02
    weight[:64, 7] = 0.0  # an all-zero block
    stored = quant.quantize(jnp.asarray(weight), "nf4")
    assert {k: v.dtype for k, v in stored.items()} == {
        "codes": np.uint8, "absmax": np.int8, "absmax_scale": np.float32,
        "absmax_offset": np.float32}
    packed = np.asarray(stored["codes"])
    codes = np.stack([packed >> 4, packed & 15], axis=1).reshape(weight.shape)
    expected, absmax, sorted_distance = nf4_reference(weight)
    clear = (sorted_distance[..., 1] - sorted_distance[..., 0]).reshape(weight.shape) > 1e-6
    np.testing.assert_array_equal(codes[clear], expected[clear])
    # Double quantization: each block's absmax within half a second-level step.
    scale = np.repeat(np.asarray(stored["absmax_scale"]), 256, axis=-1)
    absmax_back = (np.asarray(stored["absmax"]) * scale + np.asarray(stored["absmax_offset"]))
    assert np.all(np.abs(absmax_back - absmax) <= scale / 2 + 1e-7)
    # Each value within half the widest gap between levels of its block's scale, plus the
    # absmax's own error; 4.13 bits per weight in all.
    back = np.asarray(quant.dequantize(stored, jnp.float32))
    half_gap = np.max(np.diff(quant.NF4_LEVELS)) / 2
    bound = np.repeat(absmax * half_gap + scale / 2, 64, axis=0) + 1e-7
    assert np.all(np.abs(back - weight) <= bound)
    assert np.all(back[:64, 7] == 0) or np.abs(back[:64, 7]).max() <= scale[0, 7]
    bits = 8 * sum(v.size * v.dtype.itemsize for v in stored.values()) / weight.size
    assert bits == pytest.approx(4.127, abs=0.001)
    assert quant.stored_bytes(weight.shape, "nf4") * 8 / weight.size == bits


def test_int8_is_within_half_a_step_of_each_output_channel():
    weight = np.random.default_rng(1).standard_normal((3, 96, 40)).astype(np.float32)
    weight[1, :, 5] = 0.0
    stored = quant.quantize(jnp.asarray(weight), "int8")
    step = np.abs(weight).max(axis=1, keepdims=True) / 127
    back = np.asarray(quant.dequantize(stored, jnp.float32))
    assert np.all(np.abs(back - weight) <= step / 2 + 1e-7)
    assert np.all(back[1, :, 5] == 0)
    assert quant.stored_bytes(weight.shape, "int8") == sum(
        v.size * v.dtype.itemsize for v in stored.values())


def test_base_quant_needs_lora_and_nf4_needs_widths_in_blocks_of_64():
    with pytest.raises(ConfigError, match="lora.base_quant='nf4' quantizes the frozen base of a "
                                          "LoRA run, and lora.rank=0"):
        tiny_config(lora=dict(base_quant="nf4"))
    odd = tiny_config(lora=dict(rank=2, base_quant="nf4"))  # d_model 32
    with pytest.raises(ConfigError, match=r"blocks of 64 .* blocks.0.attn.[\w.]+ \(32, \d+\) has 32 "
                                          r"inputs .* use lora.base_quant='int8'"):
        build(odd, "cpu", nnx.Rngs(0))
    build(dataclasses.replace(odd, lora=dataclasses.replace(odd.lora, base_quant="int8")),
          "cpu", nnx.Rngs(0))  # int8 has no blocks


def test_the_backward_pass_keeps_no_dequantized_weight():
    config = tiny_config(model=QUANTIZABLE, lora=dict(rank=2, targets=("attn.*", "moe.w1"),
                                                      base_quant="nf4"))
    model = build(config, "cpu", nnx.Rngs(0))
    full = {tuple(module.shape) for _, module in nnx.iter_modules(model)
            if quant.is_quantized(module)}
    assert (4, 64, 128) in full and (64, 64) in full  # experts and attention are quantized
    assert not quant.is_quantized(model.head.kernel) and not quant.is_quantized(
        model.blocks[0].moe.gate.kernel)
    graphdef, adapters, rest = nnx.split(model, nnx.LoRAParam, ...)
    tokens_BxL = jnp.arange(32).reshape(2, 16) % 64

    def loss(adapters):
        return jnp.mean(nnx.merge(graphdef, adapters, rest)(tokens_BxL).logits_BxLxV ** 2)

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, adapters)
    kept = [line for line in printed.getvalue().splitlines()
            if line.startswith("f32[") and "constant" not in line]
    shapes = {tuple(int(n) for n in line[4:line.index("]")].split(",") if n) for line in kept}
    assert kept and not shapes & full, [line for line in kept if "quant" in line]
    # ... and computes what its weights dequantized compute (lora.merge_lora), while no
    # full-precision random weight was ever drawn for it (the init program holds codes).
    forward = nnx.jit(lambda model: model(tokens_BxL).logits_BxLxV)
    np.testing.assert_allclose(forward(model), forward(lora.merge_lora(model)), rtol=1e-5,
                               atol=1e-5)
    codes = model.blocks[0].moe.w1.codes[...]
    assert len(np.unique(np.asarray(codes))) > 200  # random codes, both nibbles


def logits(model, tokens_BxL):
    return np.asarray(model(jnp.asarray(tokens_BxL)).logits_BxLxV)


@pytest.mark.slow  # imports a model, trains, resumes, exports
def test_a_lora_run_on_an_nf4_base_learns_resumes_bitwise_and_merges_onto_the_full_base(
        tmp_path):
    records = [{"instruction": "Reverse the word.", "input": word, "output": word[::-1]}
               for word in ("stone", "river", "cloud", "tiger") * 8]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    made = tiny_config(model=LLAMA)
    state = nnx.to_pure_dict(nnx.state(build(made, "cpu", nnx.Rngs(3))))
    checkpoint.save_model(tmp_path / "made", made, state)
    quiet = dict(log=lambda _: None)
    convert.export_run(tmp_path / "made", tmp_path / "hf", dtype="float32", **quiet)
    convert.import_dir(tmp_path / "hf", tmp_path / "base", tiny_config(model=dict(
        vocab_size=259)), **quiet)
    imported = checkpoint.read_config(tmp_path / "base")
    tuned = tiny_config(
        model=dataclasses.asdict(imported.model),
        lora=dict(rank=4, targets=("all-linear",), base_quant="nf4"),
        optim=dict(total_steps=8, lr=1e-2), checkpoint=dict(every=4, init_from=str(
            tmp_path / "base")), data=dict(source="jsonl", path=str(tmp_path / "data.jsonl")))
    run = Trainer(tuned, str(tmp_path / "qlora"))
    stored = nnx.to_pure_dict(run.state.model)["blocks"][0]["mlp"]["w1"]["kernel"]
    assert stored["codes"].dtype == np.uint8 and stored["codes"].shape == (32, 128)
    history = run.train()
    losses = [float(r["loss"]) for r in history if "loss" in r]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2]), losses

    # Loading quantizes the base the same way: the trainer's model, bit for bit.
    tokens = np.arange(2 * 24).reshape(2, 24) % 259
    model, _ = minids_jax.load(tmp_path / "qlora")
    np.testing.assert_array_equal(logits(model, tokens), logits(run.model(), tokens))
    # It generates: cached greedy decoding continues as the whole-sequence forward does.
    new = generate(model, tokens[0, :8], 6)[0]
    sequence = np.concatenate([tokens[0, :8], new])[None]
    np.testing.assert_array_equal(logits(model, sequence)[0, 7:-1].argmax(-1), new)

    # Resumed from step 4, the run goes on as if never stopped.
    shutil.copytree(tmp_path / "qlora", tmp_path / "resumed")
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "8")
    resumed = Trainer(tuned, str(tmp_path / "resumed"))
    again = {r["step"]: float(r["loss"]) for r in resumed.train() if "loss" in r}
    assert again == {step: loss for step, loss in zip(range(1, 9), losses) if step > 4}
    for ours, theirs in zip(jax.tree.leaves(jax.device_get(resumed.state)),
                            jax.tree.leaves(jax.device_get(run.state))):
        np.testing.assert_array_equal(ours, theirs)

    # Exported merged onto the full-precision base (and saying so): the same adapters on the
    # unquantized weights, close to what trained on the quantized ones.
    said = []
    convert.export_run(tmp_path / "qlora", tmp_path / "merged_hf", dtype="float32",
                       log=said.append)
    assert any("trained on the base quantized as nf4" in line for line in said), said
    convert.import_dir(tmp_path / "merged_hf", tmp_path / "merged", tiny_config(
        model=dict(vocab_size=259)), **quiet)
    merged, _ = minids_jax.load(tmp_path / "merged")
    base, _ = minids_jax.load(tmp_path / "base")
    ours, theirs, before = (logits(m, tokens) for m in (model, merged, base))

    def relative(a, b):
        return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b ** 2)))

    # Within NF4's error (~10% of each weight; 15% of the logits here, measured), less than
    # what fine-tuning moved, and mostly the same next tokens.
    assert relative(ours, theirs) < min(0.25, relative(theirs, before))
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() > 0.75

    # Without a base to refer to, the checkpoint holds the quantized form, restores as is,
    # and an export dequantizes it (and says so).
    alone = dataclasses.replace(tuned, checkpoint=dataclasses.replace(tuned.checkpoint,
                                                                      init_from=""))
    with checkpointer.Checkpointer(alone, tmp_path / "alone") as whole:
        whole.save(8, run.state)
    params = SavedParams(tmp_path / "alone")
    assert ("blocks", "0", "mlp", "w1", "kernel") in params.dequantized
    assert params.holds(("blocks", "0", "mlp", "w1", "kernel", "codes"))
    assert params.shape(("blocks", "0", "mlp", "w1", "kernel")) == (64, 128)
    (tmp_path / "alone" / "config.json").write_text(alone.to_json())
    shutil.copy(tmp_path / "qlora" / "records.json", tmp_path / "alone")
    restored, _ = minids_jax.load(tmp_path / "alone")
    np.testing.assert_array_equal(logits(restored, tokens), ours)
    said.clear()
    convert.export_run(tmp_path / "alone", tmp_path / "alone_hf", dtype="float32",
                       log=said.append)
    assert any("weights were saved quantized (lora.base_quant=nf4); they are written "
               "dequantized" in line for line in said), said
