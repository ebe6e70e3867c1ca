"""Against transformers live (skipped unless torch and transformers are importable: the `hf`
extra): its random DeepseekV3ForCausalLM and DeepseekV2ForCausalLM models imported here give
its logits and greedy tokens, and a model trained here (V3, V2, llama, qwen2), exported, gives
ours in transformers; PEFT adapters exported here load in peft with our logits."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import minids_jax  # noqa: E402
from minids_jax.generation import generate  # noqa: E402
from minids_jax.hf import adapter, convert  # noqa: E402
from tests.factories import assert_close_logits, tiny_config  # noqa: E402

HF_TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
    n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
    first_k_dense_replace=1, norm_topk_prob=True, kv_lora_rank=16, q_lora_rank=24,
    qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8, max_position_embeddings=64,
    rms_norm_eps=1e-6, num_mtp_layers=0, initializer_range=0.2, tie_word_embeddings=False)


def hf_model(seed: int, **changes):
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**{**HF_TINY, **changes})
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.add_(0.1 * torch.randn_like(tensor))
        for module in model.modules():
            if hasattr(module, "e_score_correction_bias"):
                module.e_score_correction_bias.normal_(0.0, 0.1)
    model.set_experts_implementation("eager")
    return model


HF_V2_TINY = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1,
    n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, norm_topk_prob=False,
    kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
    max_position_embeddings=64, rms_norm_eps=1e-6, initializer_range=0.2,
    topk_method="greedy", n_group=1, topk_group=1, routed_scaling_factor=1.0)


def hf_v2_model(seed: int, **changes):
    torch.manual_seed(seed)
    config = transformers.DeepseekV2Config(**{**HF_V2_TINY, **changes})
    model = transformers.DeepseekV2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            if name.endswith("norm.weight"):
                tensor.add_(0.1 * torch.randn_like(tensor))
            if name.endswith("gate.weight"):  # routers far from ties between the two sides
                tensor.mul_(10.0)
    return model


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def adapted_and_base_logits(run, base, seed: int):
    """(tokens, our adapted run's logits, its base's logits), the adapters asserted to
    matter."""
    tokens = np.random.RandomState(seed).randint(0, 64, (2, 16)).astype(np.int32)
    adapted = np.asarray(minids_jax.load(run)[0](tokens).logits_BxLxV)
    base_logits = np.asarray(minids_jax.load(base)[0](tokens).logits_BxLxV)
    assert np.abs(adapted - base_logits).max() > 1e-2  # the adapters matter
    return tokens, adapted, base_logits


@pytest.mark.parametrize("changes", [
    {},  # low-rank query, group-limited routing
    {"q_lora_rank": None, "n_group": 1, "topk_group": 1},  # one q_proj, no groups
    {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                      "mscale": 1.0, "mscale_all_dim": 1.0}},
])
def test_transformers_models_import_with_their_logits_and_greedy_tokens(tmp_path, changes):
    assert_imports_as_transformers(hf_model(0, **changes), tmp_path)


def assert_imports_as_transformers(model, tmp_path):
    """`model` saved, imported here: its logits and greedy tokens; returns the run's config."""
    model.save_pretrained(tmp_path / "hf")
    convert.import_dir(tmp_path / "hf", tmp_path / "run", tiny_config(), log=lambda _: None)
    ours, config = minids_jax.load(tmp_path / "run")
    tokens = np.random.RandomState(0).randint(0, model.config.vocab_size, (2, 20)).astype(np.int32)
    assert_close_logits(np.asarray(ours(tokens).logits_BxLxV), hf_logits(model, tokens))
    prompt = tokens[:1, :5]
    with torch.no_grad():
        theirs = model.generate(torch.tensor(prompt, dtype=torch.long), do_sample=False,
                                max_new_tokens=8, min_new_tokens=8).numpy()[:, 5:]
    np.testing.assert_array_equal(generate(ours, prompt, 8), theirs)
    return config


@pytest.mark.parametrize("changes", [
    {},  # greedy top-k, one q_proj
    {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2, "q_lora_rank": 24,
     "routed_scaling_factor": 16.0},
    {"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                      "mscale": 0.707, "mscale_all_dim": 0.707}},
], ids=["greedy", "group_limited_q_lora", "yarn"])
def test_transformers_deepseek_v2_models_import_with_their_logits_and_greedy_tokens(tmp_path,
                                                                                    changes):
    config = assert_imports_as_transformers(hf_v2_model(0, **changes), tmp_path)
    assert config.model.router_scoring == "softmax"


def test_a_deepseek_v2_trained_here_exports_as_deepseek_v2_with_our_logits(tmp_path):
    from minids_jax.training.trainer import Trainer

    v2 = dict(attn_pattern=("mla",), n_layers=2, n_heads=4, q_lora_rank=0, first_k_dense=1,
              dense_hidden_dim=24, n_experts=8, top_k=2, moe_hidden_dim=16, n_shared_experts=1,
              router_scoring="softmax", n_group=4, topk_group=2, group_score="max",
              norm_topk_prob=False, routed_scaling_factor=16.0, mtp_depth=0)
    config = tiny_config(model=v2, optim=dict(total_steps=3), checkpoint=dict(every=3))
    Trainer(config, str(tmp_path / "run")).train()
    ours, _ = minids_jax.load(tmp_path / "run")
    convert.export_run(tmp_path / "run", tmp_path / "hf", dtype="float32", log=lambda _: None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (theirs.config.model_type, theirs.config.topk_method) == (
        "deepseek_v2", "group_limited_greedy")
    tokens = np.random.RandomState(1).randint(0, 64, (2, 16)).astype(np.int32)
    assert_close_logits(np.asarray(ours(tokens).logits_BxLxV), hf_logits(theirs, tokens))


def test_a_model_trained_here_exports_to_transformers_with_our_logits(tmp_path):
    from minids_jax.training.trainer import Trainer
    from tests.factories import V3_MODEL

    config = tiny_config(model=dict(V3_MODEL, mtp_depth=0), optim=dict(total_steps=3),
                         checkpoint=dict(every=3))
    config = dataclasses.replace(config, train=dataclasses.replace(config.train,
                                                                   router_bias_rate=0.05))
    Trainer(config, str(tmp_path / "run")).train()
    ours, _ = minids_jax.load(tmp_path / "run")
    assert np.abs(np.asarray(ours.blocks[1].moe.bias[...])).max() > 0  # the biases moved
    convert.export_run(tmp_path / "run", tmp_path / "hf", dtype="float32", log=lambda _: None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    theirs.set_experts_implementation("eager")
    tokens = np.random.RandomState(1).randint(0, 64, (2, 16)).astype(np.int32)
    assert_close_logits(np.asarray(ours(tokens).logits_BxLxV), hf_logits(theirs, tokens))


def test_the_peft_adapter_loads_in_peft_onto_the_exported_base(tmp_path):
    peft = pytest.importorskip("peft")
    from tests.factories import saved_lora_run

    base, run = saved_lora_run(tmp_path, dropout=0.1)  # trained with dropout; none in eval
    convert.export_run(base, tmp_path / "hf_base", dtype="float32", log=lambda _: None)
    adapter.export_adapter(run, tmp_path / "adapter", log=lambda _: None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base")
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    theirs.base_model.model.set_experts_implementation("eager")
    tokens, adapted, _ = adapted_and_base_logits(run, base, seed=2)
    assert_close_logits(adapted, hf_logits(theirs, tokens))


@pytest.mark.parametrize("targets, model", [
    (("attn.*", "moe.w1", "moe.w2", "moe.w3"), None),
    # Gate and down only (gate_up_proj at rank R, its up rows zero), no attention adapters.
    (("moe.w1", "moe.w3"), None),
    # Layer 1's gate and up (gate_up_proj at rank 2R by its full name), every layer's down.
    (("blocks.1.moe.w1", "blocks.1.moe.w2", "moe.w3"), dict(n_layers=3)),
    # DeepSeek-V2 (exported as deepseek_v2): the same fused experts in transformers.
    (("attn.*", "moe.w1", "moe.w2", "moe.w3"),
     dict(n_heads=4, q_lora_rank=0, n_experts=8, router_scoring="softmax", n_group=4,
          topk_group=2, group_score="max", norm_topk_prob=False, routed_scaling_factor=16.0)),
], ids=["attention_and_experts", "gate_and_down", "one_layers_gate_up", "deepseek_v2"])
def test_routed_expert_adapters_load_in_peft_on_the_fused_experts(targets, model, tmp_path):
    """peft's target_parameters on transformers' gate_up_proj and down_proj give our logits."""
    peft = pytest.importorskip("peft", minversion="0.17")
    from tests.factories import V3_MODEL, saved_lora_run

    base, run = saved_lora_run(tmp_path, targets=targets,
                               model={**V3_MODEL, "n_layers": 2, "mtp_depth": 0, **(model or {})})
    convert.export_run(base, tmp_path / "hf_base", dtype="float32", log=lambda _: None)
    adapter.export_adapter(run, tmp_path / "adapter", log=lambda _: None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base")
    assert theirs.config.model_type == ("deepseek_v2" if "q_lora_rank" in (model or {})
                                        else "deepseek_v3")
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    theirs.base_model.model.set_experts_implementation("eager")
    wrapped = {name for name, module in theirs.named_modules()
               if isinstance(module, peft.tuners.lora.ParamWrapper)}
    assert wrapped  # the experts' adapters were placed, not skipped
    tokens, adapted, base_logits = adapted_and_base_logits(run, base, seed=5)
    assert_close_logits(adapted, hf_logits(theirs, tokens))
    with theirs.disable_adapter():  # without the adapters, peft's model is the base again
        assert_close_logits(base_logits, hf_logits(theirs, tokens))


@pytest.mark.parametrize("family, model", [
    ("llama", dict(n_kv_heads=2, head_dim=24, qkv_bias=True, out_bias=True, mlp_bias=True,
                   rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=8)),
    ("qwen2", dict(n_kv_heads=2, qkv_bias=True, tie_embeddings=True)),
])
def test_a_dense_model_trained_here_exports_as_its_family_with_our_logits(family, model,
                                                                         tmp_path):
    from minids_jax.training.trainer import Trainer

    config = tiny_config(model=dict(model, attn_pattern=("mha",), n_heads=4, n_layers=2,
                                    first_k_dense=2, dense_hidden_dim=48, mtp_depth=0),
                         optim=dict(total_steps=3), checkpoint=dict(every=3))
    Trainer(config, str(tmp_path / "run")).train()
    ours, _ = minids_jax.load(tmp_path / "run")
    convert.export_run(tmp_path / "run", tmp_path / "hf", dtype="float32", log=lambda _: None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", attn_implementation="eager").eval()
    assert theirs.config.model_type == family
    tokens = np.random.RandomState(3).randint(0, 64, (2, 16)).astype(np.int32)
    assert_close_logits(np.asarray(ours(tokens).logits_BxLxV), hf_logits(theirs, tokens))


@pytest.mark.parametrize("targets", [("q_proj", "k_proj"), ("attn.*", "mlp.*", "head")],
                         ids=["peft_names_q_k", "attention_mlp_head"])
def test_a_llama_peft_adapter_loads_in_peft_with_our_logits(targets, tmp_path):
    """q and k adapters' B rows go out in transformers' RoPE order; MLP adapters load too."""
    peft = pytest.importorskip("peft")
    from tests.factories import saved_lora_run

    llama = dict(attn_pattern=("mha",), n_heads=4, n_kv_heads=2, head_dim=24, n_layers=2,
                 first_k_dense=2, dense_hidden_dim=48, mtp_depth=0, qkv_bias=True,
                 out_bias=True)
    base, run = saved_lora_run(tmp_path, targets=targets, model=llama)
    convert.export_run(base, tmp_path / "hf_base", dtype="float32", log=lambda _: None)
    adapter.export_adapter(run, tmp_path / "adapter", log=lambda _: None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base",
                                                               attn_implementation="eager")
    assert theirs.config.model_type == "llama"
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    tokens, adapted, _ = adapted_and_base_logits(run, base, seed=4)
    assert_close_logits(adapted, hf_logits(theirs, tokens))


def test_an_adapter_trained_on_an_nf4_base_loads_in_peft_onto_the_full_precision_base(tmp_path):
    """QLoRA's way out: the adapters go onto the unquantized base, in peft as in our merge."""
    peft = pytest.importorskip("peft")
    from tests.factories import saved_lora_run

    llama = dict(attn_pattern=("mha",), d_model=64, n_heads=4, n_kv_heads=2, n_layers=2,
                 first_k_dense=2, dense_hidden_dim=128, mtp_depth=0)
    base, run = saved_lora_run(tmp_path, targets=("all-linear",), model=llama,
                               base_quant="nf4")
    convert.export_run(base, tmp_path / "hf_base", dtype="float32", log=lambda _: None)
    adapter.export_adapter(run, tmp_path / "adapter", log=lambda _: None)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf_base",
                                                               attn_implementation="eager")
    theirs = peft.PeftModel.from_pretrained(theirs, tmp_path / "adapter").eval()
    convert.export_run(run, tmp_path / "merged", dtype="float32", log=lambda _: None)
    merged = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "merged", attn_implementation="eager").eval()
    tokens = np.random.RandomState(5).randint(0, 64, (2, 16)).astype(np.int32)
    assert_close_logits(hf_logits(merged, tokens), hf_logits(theirs, tokens))
    ours = np.asarray(minids_jax.load(run)[0](tokens).logits_BxLxV)  # on the nf4 base
    reference = hf_logits(theirs, tokens)
    assert np.sqrt(np.mean((ours - reference) ** 2) / np.mean(reference ** 2)) < 0.25
