"""DeepSeek's dense releases and DeepSeek-V2 as transformers makes them: random tiny
LlamaForCausalLM, Qwen2ForCausalLM and DeepseekV2ForCausalLM (tests/fixtures/*_tiny, by
scripts/make_family_fixtures.py: grouped-query attention, non-zero biases, llama3 RoPE, a tied
qwen2 head; V2's softmax routing greedy and group-limited, no q-LoRA). Imported here, they
give transformers' logits and greedy tokens, by full forwards and through the cache; exported,
they import again bitwise. Needs neither torch nor transformers."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from flax import nnx

import minids_jax
from minids_jax.data import chat, load_tokenizer
from minids_jax.hf import config as hf_config
from minids_jax.hf import convert
from minids_jax.data.tokenization import HFTokenizer
from minids_jax.hf.files import TensorFiles
from tests.factories import REPO, assert_close_logits, tiny_config

FIXTURES = {name: REPO / "tests" / "fixtures" / f"{name}_tiny"
            for name in ("llama", "qwen2", "deepseek_v2", "deepseek_v2_greedy")}


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def imported(request, tmp_path_factory):
    workdir = tmp_path_factory.mktemp(request.param)
    convert.import_dir(FIXTURES[request.param], workdir, tiny_config(), log=lambda _: None)
    model, config = minids_jax.load(workdir)
    return request.param, workdir, model, config, dict(
        np.load(FIXTURES[request.param] / "reference.npz"))


def test_the_import_is_the_family_it_came_from(imported):
    family, _, model, config, _ = imported
    cfg = config.model
    if family.startswith("deepseek_v2"):
        assert cfg.attn_pattern == ("mla",) and cfg.router_scoring == "softmax"
        assert cfg.q_lora_rank == 0 and not cfg.norm_topk_prob and cfg.first_k_dense == 1
        assert model.blocks[1].moe.bias is None  # no selection bias
        grouped = family == "deepseek_v2"
        assert (cfg.n_group, cfg.topk_group, cfg.routed_scaling_factor) == (
            (4, 2, 16.0) if grouped else (1, 1, 1.0))
        assert cfg.group_score == "max"
        return
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.first_k_dense, cfg.n_layers) == (4, 2, 2, 2)
    assert not any(hasattr(block, "moe") for block in model.blocks)
    if family == "llama":
        assert cfg.head_dim == 24 and cfg.rope_scaling == "llama3" and cfg.rope_factor == 8
        assert cfg.qkv_bias and cfg.out_bias and cfg.mlp_bias and not cfg.tie_embeddings
    else:
        assert cfg.head_dim == 16 and cfg.rope_scaling == "none"
        assert cfg.qkv_bias and not cfg.out_bias and cfg.tie_embeddings and model.head is None
    assert float(np.abs(model.blocks[0].attn.attention.k.bias[...]).max()) > 0


def test_logits_and_greedy_tokens_are_transformers(imported):
    _, _, model, _, reference = imported
    forward = nnx.jit(lambda model, tokens: model(tokens).logits_BxLxV)
    assert_close_logits(np.asarray(forward(model, reference["tokens"])), reference["logits"])
    prompt, greedy = reference["prompt"], reference["greedy"]
    new = greedy.shape[1] - prompt.shape[1]
    # Through the cache...
    np.testing.assert_array_equal(minids_jax.generate(model, prompt, new),
                                  greedy[:, prompt.shape[1]:])
    # ...and by a full forward (causal: each position's argmax is the token greedy chose).
    chosen = np.argmax(forward(model, greedy[:, :-1])[:, prompt.shape[1] - 1:], axis=-1)
    np.testing.assert_array_equal(chosen, greedy[:, prompt.shape[1]:])


def test_export_writes_the_same_family_and_imports_again_bitwise(imported, tmp_path):
    family, workdir, _, config, _ = imported
    convert.export_run(workdir, tmp_path / "hf", dtype="float32", log=lambda _: None)
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    source = json.loads((FIXTURES[family] / "config.json").read_text())
    assert written["model_type"] == source["model_type"]
    assert written["architectures"] == source["architectures"]
    if "topk_method" in source:
        assert written["topk_method"] == source["topk_method"]
    # The tensors are the checkpoint's own (rows of q and k back in transformers' order).
    ours, theirs = TensorFiles(tmp_path / "hf"), TensorFiles(FIXTURES[family])
    assert sorted(ours.names()) == sorted(theirs.names())
    for name in theirs.names():
        np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    convert.import_dir(tmp_path / "hf", tmp_path / "again", tiny_config(), log=lambda _: None)
    before, after = (convert.flat_paths(minids_jax.load_params(w))
                     for w in (workdir, tmp_path / "again"))
    assert before.keys() == after.keys()
    for path in before:
        np.testing.assert_array_equal(before[path], after[path], err_msg=str(path))
    assert minids_jax.read_config(tmp_path / "again").model == config.model


@pytest.mark.parametrize("family, changes, message", [
    ("qwen2", dict(use_sliding_window=True), r"use_sliding_window=true is not supported"),
    ("llama", dict(rope_scaling={"rope_type": "longrope", "factor": 2.0}),
     r"rope type 'longrope' is not supported"),
    ("llama", dict(hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    ("llama", dict(num_key_value_heads=3), r"n_kv_heads=3 must divide model.n_heads=4"),
])
def test_fields_a_family_sets_that_cannot_be_honoured_are_named(family, changes, message,
                                                                 tmp_path):
    shutil.copytree(FIXTURES[family], tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(hf_config.HFFormatError, match=message):
        convert.import_dir(tmp_path / "hf", tmp_path / "run", tiny_config(), log=lambda _: None)


def test_bos_and_eos_come_from_the_tokenizer_files_not_config_json(tmp_path):
    """R1-Distill-Qwen's config.json names its end-of-sentence token as BOS; the tokenizer's
    own files are right, and they are what the run uses and the export writes."""
    shutil.copytree(FIXTURES["qwen2"], tmp_path / "hf")
    path = tmp_path / "hf" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "bos_token_id": 1}))  # = EOS
    convert.import_dir(tmp_path / "hf", tmp_path / "run", tiny_config(), log=lambda _: None)
    tokenizer = load_tokenizer(minids_jax.read_config(tmp_path / "run"), str(tmp_path / "run"))
    assert (tokenizer.BOS, tokenizer.EOS) == (0, 1)  # <｜begin▁of▁sentence｜>, <｜end▁...｜>
    convert.export_run(tmp_path / "run", tmp_path / "out", dtype="float32", log=lambda _: None)
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (written["bos_token_id"], written["eos_token_id"]) == (0, 1)


# The conversation scripts/make_family_fixtures.py rendered with transformers.
CONVERSATION = [("user", "What is 2 + 3?"),
                ("assistant", "<think>\nTwo plus three.\n</think>\n\n5"),
                ("user", "And 4 + 4?"), ("assistant", "8, the sum.")]


def test_each_familys_chat_template_gives_transformers_tokens_and_survives_export(imported,
                                                                                 tmp_path):
    """R1-Distill's template (a llama's in chat_template.jinja, a qwen2's in tokenizer_config)
    and deepseek-llm-7b-chat's (the V2 models'): the run renders transformers' ids for a whole
    conversation and for a generation prompt, scores the answers only, and exports the
    template unchanged."""
    family, workdir, _, config, reference = imported
    tokenizer = load_tokenizer(config, str(workdir))
    tokens, scored = chat.encode(tokenizer, CONVERSATION)
    np.testing.assert_array_equal(tokens, reference["chat"])
    prompt, _ = chat.encode(tokenizer, CONVERSATION[:-1], add_generation_prompt=True)
    np.testing.assert_array_equal(prompt, reference["chat_prompt"])
    answers = tokenizer.hf.decode(tokens[scored].tolist(), skip_special_tokens=False)
    end = "<｜end▁of▁sentence｜>"
    if family in ("llama", "qwen2"):  # R1's template drops the reasoning of past answers
        assert answers == f"\n\n5{end}8, the sum.{end}"
    else:  # deepseek-llm's generation prompt ends at "Assistant:", before the answer's space
        assert answers == f" <think>\nTwo plus three.\n</think>\n\n5{end} 8, the sum.{end}"
    convert.export_run(workdir, tmp_path / "hf", dtype="float32", log=lambda _: None)
    source = HFTokenizer(FIXTURES[family]).chat_template
    assert source and HFTokenizer(tmp_path / "hf").chat_template == source


def test_the_peft_adapter_names_the_hugging_face_model_its_base_came_from(tmp_path):
    """PeftModel.from_pretrained(base, adapter) looks the base up by base_model_name_or_path:
    the directory the base was imported from, not the run directory, which no loader opens."""
    import dataclasses

    from flax import nnx

    from minids_jax import checkpoint
    from minids_jax.checkpoint.base import base_reference
    from minids_jax.hf import adapter
    from minids_jax.model import lora

    convert.import_dir(FIXTURES["llama"], tmp_path / "base", tiny_config(), log=lambda _: None)
    model, config = minids_jax.load(tmp_path / "base")
    tuned = dataclasses.replace(
        config, lora=dataclasses.replace(config.lora, rank=2, targets=("q_proj",)),
        checkpoint=dataclasses.replace(config.checkpoint, init_from=str(tmp_path / "base")))
    lora.add_adapters(model, tuned.lora, nnx.Rngs(1))
    step_dir = tmp_path / "base" / "checkpoints" / "0"
    checkpoint.save_model(tmp_path / "lora", tuned,
                          nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam)),
                          base=base_reference(step_dir, checkpoint.read_meta(step_dir)))

    def base_named(**flags) -> str:
        adapter.export_adapter(tmp_path / "lora", tmp_path / "adapter", log=lambda _: None,
                               **flags)
        return json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
            "base_model_name_or_path"]

    assert base_named() == str(FIXTURES["llama"].resolve())
    assert base_named(base_model="deepseek-ai/DeepSeek-R1-Distill-Llama-8B") == \
        "deepseek-ai/DeepSeek-R1-Distill-Llama-8B"
