"""What a GGUF file says besides its tensors (to_gguf.py writes those): the model's keys
(`{arch}.*`: sizes, RoPE, deepseek2's experts and MLA) and the tokenizer's
(`tokenizer.ggml.*`, `tokenizer.chat_template`: byte-level BPE tokens, their types and merges,
the special ids, whether BOS is added, and the name of the pre-tokenizer llama.cpp must apply,
read off the tokenizer's own split rules).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

try:  # an optional extra: the core install exports Hugging Face directories only
    import gguf
except ImportError:
    gguf = None

from minids_jax.config import Config
from minids_jax.config.model import ModelConfig
from minids_jax.data import pipeline as data_lib
from minids_jax.data.tokenization import HFTokenizer
from minids_jax.hf.config import HFFormatError

DEEPSEEK2 = "deepseek2"


# ------------------------------------------------------------------------------------ model



def write_model_keys(writer, cfg: ModelConfig, arch: str, dtype: str, name: str) -> None:
    file_types = gguf.LlamaFileType
    writer.add_name(name)
    writer.add_file_type({"f32": file_types.ALL_F32, "f16": file_types.MOSTLY_F16,
                          "bf16": file_types.MOSTLY_BF16, "q8_0": file_types.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.d_model)
    writer.add_block_count(cfg.n_layers)
    writer.add_feed_forward_length(cfg.dense_mlp_dim)
    writer.add_head_count(cfg.n_heads)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_vocab_size(cfg.vocab_size)
    if arch == DEEPSEEK2:
        _write_deepseek2_keys(writer, cfg)
        return
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    if cfg.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_factor)
    # (llama3 RoPE has no key: it is the rope_freqs tensor)


def _write_deepseek2_keys(writer, cfg: ModelConfig) -> None:
    # MLA as llama.cpp runs it: one shared "KV head" of the latent and the rotated key.
    writer.add_head_count_kv(1)
    writer.add_key_length(cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    writer.add_value_length(cfg.kv_lora_rank)
    writer.add_key_length_mla(cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    writer.add_value_length_mla(cfg.v_head_dim)
    writer.add_rope_dimension_count(cfg.qk_rope_head_dim)
    # 0, not absent: llama.cpp requires the key except at V2-Lite's depths, and 0 selects
    # the single q projection.
    writer.add_q_lora_rank(cfg.q_lora_rank)
    writer.add_kv_lora_rank(cfg.kv_lora_rank)
    writer.add_leading_dense_block_count(cfg.first_k_dense)
    writer.add_expert_count(cfg.n_experts)
    writer.add_expert_used_count(cfg.top_k)
    writer.add_expert_shared_count(cfg.n_shared_experts)
    writer.add_expert_feed_forward_length(cfg.expert_hidden_dim)
    writer.add_expert_weights_scale(cfg.routed_scaling_factor)
    writer.add_expert_weights_norm(bool(cfg.norm_topk_prob and cfg.top_k > 1))
    # Written always: without it llama.cpp routes by softmax, which V3 is not.
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID
                                  if cfg.router_scoring == "sigmoid"
                                  else gguf.ExpertGatingFuncType.SOFTMAX)
    writer.add_expert_group_count(cfg.n_group)
    writer.add_expert_group_used_count(cfg.topk_group)
    if cfg.rope_yarn_factor > 1:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(cfg.rope_yarn_factor)
        writer.add_rope_scaling_orig_ctx_len(cfg.rope_original_max_len)
        writer.add_rope_scaling_yarn_beta_fast(cfg.rope_beta_fast)
        writer.add_rope_scaling_yarn_beta_slow(cfg.rope_beta_slow)
        # llama.cpp divides this by 0.1 (its converter's convention).
        writer.add_rope_scaling_yarn_log_mul(0.1 * cfg.rope_mscale_all_dim)


# -------------------------------------------------------------------------------- tokenizer


# The pre-tokenizer names llama.cpp knows for each family's published tokenizer (its
# `tokenizer.ggml.pre`), used when the tokenizer's own split rules are not recognised.
FAMILY_PRE_TOKENIZERS = {"llama": "llama-bpe", "qwen2": "qwen2", "deepseek_v2": "deepseek-llm",
                         "deepseek_v3": "deepseek-v3"}
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# The project's chat template (data/chat.py SimpleTemplate) in Jinja, for llama.cpp's server.
SIMPLE_TEMPLATE_JINJA = (
    "{{ bos_token }}{% set ns = namespace(scaffold='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ ns.scaffold + '### Assistant:\\n' + message['content'] + eos_token }}"
    "{% set ns.scaffold = '' %}"
    "{% else %}"
    "{% set ns.scaffold = ns.scaffold + '### ' + message['role'] | title + ':\\n' "
    "+ message['content'] + '\\n\\n' %}"
    "{% endif %}{% endfor %}"
    "{{ ns.scaffold }}{% if add_generation_prompt %}{{ '### Assistant:\\n' }}{% endif %}")


@dataclasses.dataclass(frozen=True)
class Vocab:
    """What GGUF's tokenizer keys say (`tokenizer.ggml.*`, `tokenizer.chat_template`)."""

    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    bos: int | None
    eos: int
    pad: int | None
    add_bos: bool
    chat_template: str | None  # Jinja; None: none known
    bos_text: str | None
    eos_text: str



def run_tokenizer(config: Config, workdir: pathlib.Path):
    kind = config.data.tokenizer
    if kind == "byte":
        raise HFFormatError("data.tokenizer='byte': GGUF needs a BPE tokenizer (llama.cpp has "
                            "no byte tokenizer); train the run with data.tokenizer='bpe' or "
                            "import a model with its tokenizer.")
    if kind == "bpe":  # the run's saved one as it is (load_tokenizer would train one)
        return data_lib.BpeTokenizer.load(workdir / data_lib.TOKENIZER_FILE)
    return data_lib.load_tokenizer(config, str(workdir))


def _split_regexes(pre_tokenizer: dict | None) -> list[str] | None:
    """The regexes a tokenizer.json pre_tokenizer splits by, in order (None: other rules)."""
    if pre_tokenizer is None:
        return []
    parts = (pre_tokenizer["pretokenizers"] if pre_tokenizer["type"] == "Sequence"
             else [pre_tokenizer])
    out = []
    for part in parts:
        if part["type"] == "Split" and "Regex" in part.get("pattern", {}):
            out.append(part["pattern"]["Regex"])
        elif part["type"] == "ByteLevel":
            if part.get("use_regex", True):
                out.append(GPT2_REGEX)
        else:
            return None
    return out


def pre_tokenizer_name(spec: dict) -> str | None:
    """llama.cpp's name for the split rules of a tokenizer.json (None: not recognised)."""
    regexes = _split_regexes(spec.get("pre_tokenizer"))
    if not regexes:
        return None
    if regexes == [GPT2_REGEX]:
        return "gpt-2"
    if any("[一-龥぀-ゟ゠-ヿ]+" in r for r in regexes):
        return "deepseek-v3"
    if any(r.startswith(r"\s?[A-Za-zµ") for r in regexes):
        return "deepseek-llm"
    if r"\s?\p{L}+" in regexes and r"\s?\p{P}+" in regexes:
        return "deepseek-coder"
    if len(regexes) == 1 and regexes[0].startswith("(?i:'s|'t|'re|'ve|'m|'ll|'d)"):
        if r"\p{N}{1,3}" in regexes[0]:
            return "llama-bpe"
        if r"|\p{N}|" in regexes[0]:
            return "qwen2"  # (llama.cpp runs deepseek-r1-qwen alike)
    return None


def _add_bos(spec: dict, workdir: pathlib.Path, bos_text: str | None) -> bool:
    """Whether the tokenizer puts BOS first: its post-processor says so, else
    tokenizer_config.json's add_bos_token (as transformers and gguf-py read them)."""
    processor = spec.get("post_processor") or {}
    if processor.get("type") == "TemplateProcessing":
        first = processor.get("single", [{}])[0]
        return "SpecialToken" in first and first["SpecialToken"]["id"] == bos_text
    config_path = workdir / HFTokenizer.CONFIG_FILE
    if config_path.is_file():
        return bool(json.loads(config_path.read_text()).get("add_bos_token", False))
    return False


def vocab_of(tokenizer, workdir: pathlib.Path, cfg: ModelConfig, family: str,
             log: Callable[[str], None]) -> Vocab:
    spec = json.loads(tokenizer.hf.to_str())
    model = spec["model"]
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise HFFormatError(f"the run's tokenizer is a {model.get('type')} tokenizer without "
                            f"byte-level pre-tokenization; GGUF export writes byte-level BPE "
                            f"(llama.cpp's 'gpt2' tokenizer) only.")
    added = {token["id"]: token for token in spec.get("added_tokens", [])}
    by_id = {index: token for token, index in model["vocab"].items()}
    by_id.update({index: token["content"] for index, token in added.items()})
    if max(by_id) >= cfg.vocab_size:
        raise HFFormatError(f"the tokenizer has token id {max(by_id)} but model.vocab_size="
                            f"{cfg.vocab_size}; the model cannot emit it.")
    types = gguf.TokenType
    tokens, kinds = [], []
    for index in range(cfg.vocab_size):  # ids the tokenizer lacks are padding, never emitted
        if index in added:
            kinds.append(types.CONTROL if added[index].get("special") else types.USER_DEFINED)
        else:
            kinds.append(types.NORMAL if index in by_id else types.UNUSED)
        tokens.append(by_id.get(index, f"[PAD{index}]"))
    pre = pre_tokenizer_name(spec)
    if pre is None:
        pre = FAMILY_PRE_TOKENIZERS[family]
        log(f"the tokenizer's pre-tokenizer is not one llama.cpp is known to match; wrote "
            f"tokenizer.ggml.pre={pre!r} ({family}'s): check llama.cpp's tokens against ours")
    hf = isinstance(tokenizer, HFTokenizer)
    bos_text = (tokenizer.special_tokens.get("bos_token") if hf
                else by_id[tokenizer.BOS])
    bos = tokenizer.BOS if bos_text is not None else None
    return Vocab(
        tokens=tokens, types=[int(kind) for kind in kinds],
        merges=[m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])],
        pre=pre, bos=bos, eos=tokenizer.EOS, pad=tokenizer.PAD,
        # The project's BPE runs put BOS first in every example (pipeline, SimpleTemplate).
        add_bos=_add_bos(spec, workdir, bos_text) if hf else True,
        chat_template=tokenizer.chat_template if hf else SIMPLE_TEMPLATE_JINJA,
        bos_text=bos_text, eos_text=by_id[tokenizer.EOS])


def write_tokenizer_keys(writer, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos is not None:
        writer.add_bos_token_id(vocab.bos)
    writer.add_eos_token_id(vocab.eos)
    if vocab.pad is not None:
        writer.add_pad_token_id(vocab.pad)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


