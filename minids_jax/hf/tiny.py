"""`python -m minids_jax.hf make-tiny --family F --out DIR`: a small random Hugging Face model
of a family, with a tokenizer and the family's published chat template, to practise the
fine-tuning recipe on (docs/finetuning.md) before downloading gigabytes.

The model is made here (random weights) and written by `export`, so it is exactly what the
import reads back; the tokenizer is a byte-level BPE trained on the Python standard library's
sources (no download), with DeepSeek's special tokens.
"""

from __future__ import annotations

import json
import pathlib
import tempfile
from typing import Callable

import tokenizers
from flax import nnx
from tokenizers import decoders, models, pre_tokenizers, trainers

from minids_jax import checkpoint
from minids_jax import config as config_lib
from minids_jax.config import ConfigError
from minids_jax.data.corpus import builtin_corpus_files, read_text_corpus
from minids_jax.hf import convert
from minids_jax.model import build, count_params

BOS, EOS, PAD = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"
USER, ASSISTANT = "<｜User｜>", "<｜Assistant｜>"

# The chat templates of the published models' tokenizer_config.json: DeepSeek-R1-Distill's
# (its Qwen and Llama releases share it; the reasoning of past answers is cut, and the
# generation prompt opens a think block), deepseek-llm-7b-chat's (DeepSeek-V2-Chat's too), and
# DeepSeek-V3's (without its tool-call branches).
R1_DISTILL_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, "
    "system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}"
    "{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}"
    "{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}"
    "{%- if message['role'] == 'assistant' and message['content'] is not none %}"
    "{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + "
    "'<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}"
    "{% set content = message['content'] %}{% if '</think>' in content %}"
    "{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}"
    "{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}"
    "{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜><think>\\n'}}"
    "{% endif %}")
DEEPSEEK_LLM_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ 'User: ' + message['content'] + '\\n\\n' }}{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}{% elif message['role'] == 'system' %}"
    "{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "{{ 'Assistant:' }}{% endif %}")
DEEPSEEK_V3_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}"
    "{% endif %}{% set ns = namespace(system_prompt='') %}{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{% set ns.system_prompt = message['content'] %}"
    "{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}"
    "{%- endfor -%}{% if add_generation_prompt %}{{'<｜Assistant｜>'}}{% endif %}")

_SMALL = dict(d_model=64, n_layers=2, n_heads=4, max_seq_len=256, norm_eps=1e-6, mtp_depth=0)
_MLA = dict(attn_pattern=("mla",), kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
            v_head_dim=16, first_k_dense=1, dense_hidden_dim=128, n_experts=8, top_k=2,
            moe_hidden_dim=32)
# Each family's features at a small size: (model fields, chat template).
FAMILIES = {
    # R1-Distill-Llama: grouped-query attention, llama3 RoPE.
    "llama": (dict(attn_pattern=("mha",), n_kv_heads=2, first_k_dense=-1, dense_hidden_dim=128,
                   rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0,
                   rope_original_max_len=64), R1_DISTILL_TEMPLATE),
    # R1-Distill-Qwen: grouped-query attention, q/k/v biases.
    "qwen2": (dict(attn_pattern=("mha",), n_kv_heads=2, qkv_bias=True, first_k_dense=-1,
                   dense_hidden_dim=128, rope_theta=10000.0), R1_DISTILL_TEMPLATE),
    # DeepSeek-V2-Lite: MLA without query compression, softmax group-limited routing.
    "deepseek_v2": (dict(_MLA, q_lora_rank=0, n_shared_experts=2, router_scoring="softmax",
                         n_group=4, topk_group=2, group_score="max", norm_topk_prob=False),
                    DEEPSEEK_LLM_TEMPLATE),
    # DeepSeek-V3: low-rank queries, sigmoid routing with a selection bias, one MTP module.
    "deepseek_v3": (dict(_MLA, q_lora_rank=32, n_shared_experts=1, router_scoring="sigmoid",
                         n_group=4, topk_group=2, routed_scaling_factor=2.5, mtp_depth=1),
                    DEEPSEEK_V3_TEMPLATE),
}
VOCAB_SIZE = 1024
TRAINING_BYTES = 4 << 20  # of the standard library's sources: enough for 1024 tokens


def train_tokenizer(directory: pathlib.Path, template: str) -> int:
    """Writes tokenizer.json and tokenizer_config.json (with `template`); returns the
    vocabulary size."""
    corpus = read_text_corpus(builtin_corpus_files(), "the builtin corpus", TRAINING_BYTES,
                              expect_skips=True)
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator(corpus.documents, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=[BOS, EOS, PAD, USER, ASSISTANT],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token=BOS, eos_token=EOS,
        pad_token=PAD, add_bos_token=False, model_max_length=_SMALL["max_seq_len"],
        chat_template=template), indent=2, ensure_ascii=False) + "\n")
    return tokenizer.get_vocab_size()


def make_tiny(family: str, out: str | pathlib.Path, seed: int = 0,
              log: Callable[[str], None] = print) -> list[str]:
    """Writes a random `family` model with its tokenizer to `out`; returns the files."""
    if family not in FAMILIES:
        raise ConfigError(f"--family={family!r} is unknown; choose from "
                          f"{', '.join(FAMILIES)}.")
    fields, template = FAMILIES[family]
    with tempfile.TemporaryDirectory() as scratch:
        run = pathlib.Path(scratch)
        vocab_size = train_tokenizer(run, template)
        config = config_lib.from_config_dict(dict(
            model=dict(_SMALL, **fields, vocab_size=vocab_size), data=dict(tokenizer="hf")))
        model = build(config, "cpu", nnx.Rngs(seed))
        checkpoint.save_model(run, config, nnx.to_pure_dict(nnx.state(model)))
        written = convert.export_run(run, out, dtype="float32", log=lambda _: None)
    log(f"wrote a random {family} model ({count_params(model):,} parameters) and its tokenizer "
        f"to {out}: {', '.join(written)}")
    return written
