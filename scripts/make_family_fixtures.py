"""Makes tests/fixtures/llama_tiny, qwen2_tiny, deepseek_v2_tiny and deepseek_v2_greedy_tiny:
random tiny LlamaForCausalLM, Qwen2ForCausalLM and DeepseekV2ForCausalLM saved by
transformers, and the numbers transformers computes with them.

    pip install torch==2.13.0 transformers safetensors    # CPU torch, in a venv of its own
    OMP_WAIT_POLICY=PASSIVE python scripts/make_family_fixtures.py

Each has what the import must get right: grouped-query attention (fewer key-value heads than
heads), non-zero q/k/v biases, random norm gains; the llama also heads wider than
hidden_size / heads, an output and MLP bias (attention_bias, mlp_bias) and llama3 RoPE
scaling, and is saved with the legacy `rope_theta` + `rope_scaling` pair; the qwen2 ties its
head to the embedding (no lm_head.weight in the file) and is saved as transformers 5 saves it
(`rope_parameters`). The DeepSeek-V2 models have MLA without query compression, YaRN with
mscale 0.707, a dense first layer, shared and routed experts with softmax scores; one picks
them with group_limited_greedy (8 experts in 4 groups, routed_scaling_factor 16), the other
greedily. All carry hf_tiny's tokenizer with their family's published chat template:
DeepSeek-R1-Distill's (reasoning cut from past answers, a generation prompt that opens
`<think>`) for the llama, saved as `chat_template.jinja` the way transformers 5 saves it, and
for the qwen2 in tokenizer_config.json; deepseek-llm-7b-chat's (DeepSeek-V2-Chat's too) for the
V2 models. `reference.npz` holds transformers' logits (eager attention, float32), greedy
tokens, and the token ids `apply_chat_template` gives for a conversation and for its
generation prompt.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import torch
import transformers

from minids_jax.hf.tiny import DEEPSEEK_LLM_TEMPLATE, R1_DISTILL_TEMPLATE

FIXTURES = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
TOKENIZER = FIXTURES / "hf_tiny"
COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
              rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=2,
              attn_implementation="eager")
TEMPLATES = {"llama_tiny": R1_DISTILL_TEMPLATE, "qwen2_tiny": R1_DISTILL_TEMPLATE,
             "deepseek_v2_tiny": DEEPSEEK_LLM_TEMPLATE,
             "deepseek_v2_greedy_tiny": DEEPSEEK_LLM_TEMPLATE}
CONVERSATION = [
    {"role": "user", "content": "What is 2 + 3?"},
    {"role": "assistant", "content": "<think>\nTwo plus three.\n</think>\n\n5"},
    {"role": "user", "content": "And 4 + 4?"},
    {"role": "assistant", "content": "8, the sum."},
]

FAMILIES = {
    "llama_tiny": (transformers.LlamaConfig, transformers.LlamaForCausalLM, dict(
        head_dim=24, attention_bias=True, mlp_bias=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16})),
    "qwen2_tiny": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM, dict(
        rope_theta=10000.0, tie_word_embeddings=True, use_sliding_window=False)),
}
V2 = dict(num_key_value_heads=4, moe_intermediate_size=16, n_shared_experts=1,
          n_routed_experts=8, num_experts_per_tok=2, first_k_dense_replace=1, q_lora_rank=None,
          kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
          norm_topk_prob=False, rope_theta=10000.0,
          rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707,
                        "mscale_all_dim": 0.707})
FAMILIES.update({
    "deepseek_v2_tiny": (transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                         dict(V2, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                              routed_scaling_factor=16.0)),
    "deepseek_v2_greedy_tiny": (transformers.DeepseekV2Config,
                                transformers.DeepseekV2ForCausalLM,
                                dict(V2, topk_method="greedy", n_group=1, topk_group=1,
                                     routed_scaling_factor=1.0)),
})


def build(name: str, seed: int):
    config_class, model_class, fields = FAMILIES[name]
    torch.manual_seed(seed)
    model = model_class(config_class(**{**COMMON, **fields})).float().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():  # biases, norm gains: none at 0 or 1
            # Routers far from ties, so no expert choice flips between implementations.
            spread = 2.0 if name.endswith("gate.weight") else 0.2
            parameter.copy_(torch.randn_like(parameter) * spread + (
                1.0 if name.endswith("norm.weight") else 0.0))
    return model


def legacy_rope(directory: pathlib.Path) -> None:
    """config.json with `rope_theta` + `rope_scaling`, as the hub's older files have it."""
    path = directory / "config.json"
    hf = json.loads(path.read_text())
    parameters = dict(hf.pop("rope_parameters"))
    hf["rope_theta"] = parameters.pop("rope_theta")
    hf["rope_scaling"] = parameters
    path.write_text(json.dumps(hf, indent=2) + "\n")


def save_tokenizer(out: pathlib.Path, name: str) -> dict[str, np.ndarray]:
    """hf_tiny's tokenizer with the family's template; the ids transformers renders with it."""
    shutil.copyfile(TOKENIZER / "tokenizer.json", out / "tokenizer.json")
    tokenizer_config = json.loads((TOKENIZER / "tokenizer_config.json").read_text())
    if name == "llama_tiny":  # transformers 5's form: the template in a file of its own
        tokenizer_config.pop("chat_template")
        (out / "chat_template.jinja").write_text(TEMPLATES[name])
    else:
        tokenizer_config["chat_template"] = TEMPLATES[name]
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    # (AutoTokenizer would take a qwen2's for a Qwen2Tokenizer and add its own tokens.)
    tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(out)
    assert tokenizer.chat_template == TEMPLATES[name]

    def ids(messages, add_generation_prompt):
        rendered = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                                 add_generation_prompt=add_generation_prompt)
        return np.asarray(rendered["input_ids"], np.int32)

    return dict(chat=ids(CONVERSATION, False), chat_prompt=ids(CONVERSATION[:-1], True))


def main() -> None:
    for seed, name in enumerate(FAMILIES):
        out = FIXTURES / name
        shutil.rmtree(out, ignore_errors=True)
        model = build(name, seed)
        model.save_pretrained(out, safe_serialization=True)
        chat = save_tokenizer(out, name)
        if name == "llama_tiny":
            legacy_rope(out)
        reloaded = type(model).from_pretrained(out, attn_implementation="eager").float().eval()
        tokens = torch.randint(3, COMMON["vocab_size"], (2, 12), generator=torch.Generator()
                               .manual_seed(seed))
        with torch.no_grad():
            logits = reloaded(tokens).logits
            greedy = reloaded.generate(tokens[:, :5], do_sample=False, max_new_tokens=8,
                                       min_new_tokens=8, pad_token_id=2)
        np.savez(out / "reference.npz", tokens=tokens.numpy().astype(np.int32),
                 logits=logits.numpy(), prompt=tokens[:, :5].numpy().astype(np.int32),
                 greedy=greedy.numpy().astype(np.int32), **chat)
        size = sum(f.stat().st_size for f in out.iterdir()) >> 10
        print(f"{out}: {size} KiB; lm_head in file: "
              f"{'lm_head.weight' in open(out / 'model.safetensors', 'rb').read(4096).decode('latin1')}")


if __name__ == "__main__":
    main()
