"""A run -> `model.gguf` for llama.cpp and Ollama, with an Ollama `Modelfile` beside it
(docs/serving.md).

    export_gguf(workdir, out_dir, step=None, dtype="f16")

llama.cpp's architectures: `llama` (a dense model with no biases, or llama's on all four
attention projections), `qwen2` (q, k and v biases) and `deepseek2` (MLA models: DeepSeek-V2
and V3). LoRA adapters are merged as the Hugging Face export merges them. The header is built
from the tensors' shapes first; each tensor is then converted and written on its own, so the
writer never holds more than one.

The tensors are the Hugging Face export's ([out, in], routed experts stacked [E, out, in]),
renamed, except:

- q and k rows. llama.cpp's `llama` turns adjacent pairs of a head's dims, the order they are
  stored in here already (its converter permutes transformers' halves into it); `qwen2` turns
  halves, so its rows go out in transformers' order, as in the Hugging Face export.
- deepseek2's `kv_b_proj` [H(dn+dv), R], which llama.cpp wants split per head into
  `attn_k_b` [H, R, dn] (transposed) and `attn_v_b` [H, dv, R].
- llama3 RoPE, which is a tensor: `rope_freqs.weight`, each pair's divisor of its frequency.

Norms, 1-D tensors and the router stay float32 whatever `dtype` (llama.cpp's converter does
the same); q8_0 needs rows of a multiple of 32 values, and a tensor whose rows are not goes out
as f16 (logged).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
from typing import Any, Callable

import numpy as np

try:  # an optional extra: the core install exports Hugging Face directories only
    import gguf
except ImportError:
    gguf = None

from minids_jax.checkpoint import store
from minids_jax.checkpoint.loading import SavedParams
from minids_jax.config import Config
from minids_jax.config.model import ModelConfig
from minids_jax.data import pipeline as data_lib
from minids_jax.data.tokenization import HFTokenizer
from minids_jax.errors import UserError
from minids_jax.hf import config as hf_config
from minids_jax.hf import dense, modelfile, weights
from minids_jax.hf.config import HFFormatError
from minids_jax.hf.weights import Tensor
from minids_jax.model import rotary

GGUF_FILE = "model.gguf"
DTYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA, QWEN2, DEEPSEEK2 = "llama", "qwen2", "deepseek2"
Q8_0_BLOCK = 32

# Hugging Face tensor names -> llama.cpp's (gguf-py's MODEL_TENSOR names).
TOP_LEVEL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                   "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}
BLOCK_NAMES = {  # within model.layers.N. -> within blk.N.
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{hf}_proj.{kind}": f"attn_{ours}.{kind}"
       for hf, ours in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
       for kind in ("weight", "bias")},
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    **{f"mlp.{part}_proj.{kind}": f"ffn_{part}.{kind}"
       for part in ("gate", "up", "down") for kind in ("weight", "bias")},
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    **{f"mlp.experts.{{e}}.{part}_proj.weight": f"ffn_{part}_exps.weight"
       for part in ("gate", "up", "down")},
    **{f"mlp.shared_experts.{part}_proj.weight": f"ffn_{part}_shexp.weight"
       for part in ("gate", "up", "down")},
}
KV_B = "self_attn.kv_b_proj.weight"  # split into attn_k_b / attn_v_b
ROPE_FREQS = "rope_freqs.weight"
# Kept float32: llama.cpp's converter does, and the router's choice is sensitive to rounding.
F32_SUFFIXES = ("_norm.weight", "ffn_gate_inp.weight", ".bias", ROPE_FREQS)

# The pre-tokenizer names llama.cpp knows for each family's published tokenizer (its
# `tokenizer.ggml.pre`), used when the tokenizer's own split rules are not recognised.
FAMILY_PRE_TOKENIZERS = {LLAMA: "llama-bpe", QWEN2: "qwen2", "deepseek_v2": "deepseek-llm",
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
class Planned:
    """One GGUF tensor: its name, numpy shape (GGUF's dims reversed: [out, in] for a matrix)
    and how to make its float32 data, called only when it is written."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


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


def architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture of `cfg`: llama, qwen2, deepseek2 (refusals: `refusals`)."""
    family = dense.family_of(cfg)
    if family is not None:
        return family
    return DEEPSEEK2


def refusals(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` out of GGUF, one fix per entry ([] if nothing)."""
    kinds = set(cfg.attn_pattern)
    if kinds not in ({"mha"}, {"mla"}):
        return [f"model.attn_pattern={cfg.attn_pattern}: llama.cpp has MHA (llama, qwen2) or "
                f"MLA (deepseek2) models, not a mix or MHLA; use ('mha',) or ('mla',)"]
    if kinds == {"mha"}:
        problems = dense.inexpressible(cfg)
        if dense.family_of(cfg) == QWEN2 and cfg.rope_scaling == "llama3":
            problems.append("model.rope_scaling='llama3': llama.cpp's qwen2 has no llama3 "
                            "RoPE; use 'none' or 'linear'")
        return problems
    problems = hf_config.inexpressible(cfg)
    if hf_config.is_v2(cfg) and cfg.n_group > 1:
        problems.append(f"model.n_group={cfg.n_group}: DeepSeek-V2's group_limited_greedy "
                        f"scores a group by its best expert, llama.cpp by the sum of its top 2; "
                        f"use 1 (greedy routing)")
    if cfg.rope_yarn_factor > 1:
        problems += _yarn_refusals(cfg)
    return problems


def _yarn_refusals(cfg: ModelConfig) -> list[str]:
    """llama.cpp's deepseek2 YaRN keeps the rotated dims' amplitude at 1 (mscale equal to
    mscale_all_dim, as DeepSeek publishes it) and its ramp at betas 32 and 1."""
    problems = []
    if not cfg.rope_mscale_all_dim or cfg.rope_mscale != cfg.rope_mscale_all_dim:
        problems.append(f"model.rope_mscale={cfg.rope_mscale} and model.rope_mscale_all_dim="
                        f"{cfg.rope_mscale_all_dim}: llama.cpp's deepseek2 YaRN needs them "
                        f"equal and non-zero")
    if (cfg.rope_beta_fast, cfg.rope_beta_slow) != (32.0, 1.0):
        problems.append(f"model.rope_beta_fast={cfg.rope_beta_fast}, model.rope_beta_slow="
                        f"{cfg.rope_beta_slow}: llama.cpp's deepseek2 uses 32 and 1")
    return problems


# ---------------------------------------------------------------------------------- tensors


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[hf_name]
    _, _, layer, within = hf_name.split(".", 3)  # model.layers.N.within
    return f"blk.{layer}.{BLOCK_NAMES[within]}"


def _hf_shape(tensor: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    if tensor.kind == weights.EXPERTS:  # [E, in, out] -> [E, out, in]
        return (shape[0], shape[2], shape[1])
    return weights.hf_shape(tensor, shape)


def _hf_layout(tensor: Tensor, array: np.ndarray) -> np.ndarray:
    if tensor.kind == weights.EXPERTS:
        return array.transpose(0, 2, 1)
    return next(weights.to_hf(tensor, array))[1]


def plan(cfg: ModelConfig, arch: str, shape_of: Callable[[tuple], tuple[int, ...]],
         read: Callable[[tuple], np.ndarray]) -> list[Planned]:
    """The GGUF tensors of the model, from our parameters' shapes (`shape_of(path)`) and
    float32 arrays (`read(path)`, called only as each tensor is written). MTP modules are
    left out: llama.cpp's deepseek2 does not run DeepSeek-V3's."""
    out = []
    for tensor in weights.layout(cfg, with_mtp=False):
        if arch == LLAMA:  # our pairs order is what llama.cpp's llama turns
            tensor = dataclasses.replace(tensor, rope_head_dim=0)
        shape = tuple(shape_of(tensor.path))
        if tensor.name.endswith(KV_B):
            out += _split_kv_b(cfg, tensor, read)
            continue
        out.append(Planned(gguf_name(tensor.name), _hf_shape(tensor, shape),
                           lambda t=tensor: _hf_layout(t, read(t.path))))
    if arch == LLAMA and cfg.rope_scaling == "llama3":
        out.append(Planned(ROPE_FREQS, (cfg.head_dim // 2,), lambda: rope_divisors(cfg)))
    return out


def _split_kv_b(cfg: ModelConfig, tensor: Tensor, read) -> list[Planned]:
    heads, nope, value, rank = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim,
                                cfg.kv_lora_rank)
    block = gguf_name(tensor.name.replace(KV_B, "input_layernorm.weight")).rsplit(".", 2)[0]

    def per_head():  # [H, dn + dv, R]: each head's k_nope rows, then its v rows
        return read(tensor.path).T.reshape(heads, nope + value, rank)

    return [Planned(f"{block}.attn_k_b.weight", (heads, rank, nope),
                    lambda: per_head()[:, :nope].transpose(0, 2, 1)),
            Planned(f"{block}.attn_v_b.weight", (heads, value, rank),
                    lambda: per_head()[:, nope:])]


def rope_divisors(cfg: ModelConfig) -> np.ndarray:
    """llama3 RoPE as llama.cpp takes it: each pair's plain frequency / its llama3 one."""
    plain = rotary.yarn_inv_freq(cfg.head_dim, cfg.rope_theta, 1.0, 1, 2.0, 1.0)
    return (plain / rotary.inv_freq(cfg, cfg.head_dim)).astype(np.float32)


def storage_type(name: str, shape: tuple[int, ...], dtype: str):
    """The GGML type a tensor is stored in (q8_0 that cannot be: f16)."""
    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith(F32_SUFFIXES):
        return types.F32
    chosen = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[dtype]
    if chosen == types.Q8_0 and shape[-1] % Q8_0_BLOCK:
        return types.F16
    return chosen


# --------------------------------------------------------------------------------- metadata


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


def _run_tokenizer(config: Config, workdir: pathlib.Path):
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


# ----------------------------------------------------------------------------------- export


def _family(cfg: ModelConfig, arch: str) -> str:
    if arch != DEEPSEEK2:
        return arch
    return "deepseek_v2" if hf_config.is_v2(cfg) else "deepseek_v3"


def export_gguf(workdir: str | os.PathLike, out_dir: str | os.PathLike, *,
                step: int | None = None, dtype: str = "f16",
                log: Callable[[str], None] = print) -> list[str]:
    """Writes the run's model as `out_dir/model.gguf` and an Ollama `out_dir/Modelfile`;
    returns their names. A model GGUF cannot express is an HFFormatError naming the field."""
    if gguf is None:
        raise UserError("GGUF export needs the gguf package: pip install 'gguf>=0.19'.")
    if dtype not in DTYPES:
        raise HFFormatError(f"--dtype={dtype!r} is not a GGUF dtype; use one of "
                            f"{', '.join(DTYPES)}.")
    workdir, out_dir = pathlib.Path(workdir).expanduser(), pathlib.Path(out_dir).expanduser()
    config = store.read_config(workdir, step)
    cfg = config.model
    problems = refusals(cfg)
    arch = architecture(cfg)
    if problems:
        raise HFFormatError(f"this model cannot be written as GGUF ({arch}): "
                            + "; ".join(problems) + ".")
    existing = [name for name in (GGUF_FILE, modelfile.MODELFILE) if (out_dir / name).exists()]
    if existing:
        raise UserError(f"{out_dir} already holds {' and '.join(existing)}; export into an "
                        f"empty --out directory (nothing was overwritten).")
    if cfg.mtp_depth:
        log(f"leaving out the {cfg.mtp_depth} MTP module(s): llama.cpp's deepseek2 does not "
            f"run DeepSeek-V3's multi-token prediction")
    vocab = vocab_of(_run_tokenizer(config, workdir), workdir, cfg, _family(cfg, arch), log)

    # Read a tensor at a time, LoRA adapters merged into their weights as they are read.
    params = SavedParams(workdir, step, merge=config.lora if config.lora.rank else None)
    planned = plan(cfg, arch, params.shape, lambda path: np.asarray(params[path], np.float32))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_file(out_dir / GGUF_FILE, planned, arch, dtype, cfg, vocab, workdir.name, log)
    modelfile.write_modelfile(out_dir, chat_template=vocab.chat_template,
                              bos_text=vocab.bos_text, add_bos=vocab.add_bos,
                              eos_text=vocab.eos_text, num_ctx=cfg.max_seq_len, log=log)
    written = [GGUF_FILE, modelfile.MODELFILE]
    log(f"wrote {out_dir}: {', '.join(written)} ({arch}, {dtype})")
    return written


def _write_file(path: pathlib.Path, planned: list[Planned], arch: str, dtype: str,
                cfg: ModelConfig, vocab: Vocab, name: str, log) -> None:
    """Header from the shapes, then each tensor converted and written in turn; the file
    appears under its name only once complete."""
    partial = path.with_name(path.name + ".partial")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file plan lines
    writer = gguf.GGUFWriter(partial, arch)
    try:
        write_model_keys(writer, cfg, arch, dtype, name)
        write_tokenizer_keys(writer, vocab)
        types = [storage_type(p.name, p.shape, dtype) for p in planned]
        for tensor, kind in zip(planned, types):
            size = int(np.prod(gguf.quants.quant_shape_to_byte_shape(tensor.shape, kind)))
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), size,
                                   raw_dtype=kind)
        widened = [p.name for p, kind in zip(planned, types)
                   if dtype == "q8_0" and kind == gguf.GGMLQuantizationType.F16]
        if widened:
            log(f"q8_0 needs rows of a multiple of {Q8_0_BLOCK} values; written as f16: "
                f"{', '.join(widened[:6])}{f' and {len(widened) - 6} more' if len(widened) > 6 else ''}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, kind in zip(planned, types):
            data = tensor.make()
            assert data.shape == tensor.shape, (tensor.name, data.shape, tensor.shape)
            writer.write_tensor_data(gguf.quants.quantize(
                np.ascontiguousarray(data, np.float32), kind))
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def read_back(path: str | os.PathLike) -> dict[str, Any]:
    """{tensor name: float32 array in numpy shape} of a GGUF file (dequantized)."""
    reader = gguf.GGUFReader(path)
    return {tensor.name: gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
        tuple(int(n) for n in reversed(tensor.shape)))
        for tensor in reader.tensors}
