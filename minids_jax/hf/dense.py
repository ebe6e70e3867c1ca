"""A Hugging Face `llama` or `qwen2` `config.json` <-> the `model` group: DeepSeek's dense
releases (deepseek-llm-7b is llama, R1-Distill-Llama llama with llama3 RoPE, R1-Distill-Qwen
qwen2) as models of MHA layers and dense SwiGLUs.

qwen2 always has q/k/v biases and no output bias; llama's `attention_bias` puts a bias on all
four projections and `mlp_bias` on the MLP's. A model exports as qwen2 when its biases are
qwen2's, else as llama. A field we cannot honour (sliding-window attention, another RoPE type,
another activation) is an error naming it.
"""

from __future__ import annotations

from typing import Any, Callable

from minids_jax.config.model import ModelConfig

FAMILIES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
RENAMED = (
    ("vocab_size", "vocab_size"), ("d_model", "hidden_size"), ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"), ("dense_hidden_dim", "intermediate_size"),
    ("max_seq_len", "max_position_embeddings"), ("norm_eps", "rms_norm_eps"),
)
ROPE_TYPES = ("default", "linear", "llama3")
LLAMA3 = (("rope_factor", "factor"), ("rope_low_freq_factor", "low_freq_factor"),
          ("rope_high_freq_factor", "high_freq_factor"),
          ("rope_original_max_len", "original_max_position_embeddings"))


def family_of(cfg: ModelConfig) -> str | None:
    """'llama' or 'qwen2' for a dense MHA model, else None."""
    if set(cfg.attn_pattern) != {"mha"} or cfg.first_k_dense < cfg.n_layers:
        return None
    qwen2 = cfg.qkv_bias and not cfg.out_bias and not cfg.mlp_bias
    return "qwen2" if qwen2 else "llama"


def inexpressible(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` out of both dense formats, one fix per entry."""
    problems = []
    if set(cfg.attn_pattern) != {"mha"}:
        problems.append(f"model.attn_pattern={cfg.attn_pattern}: llama and qwen2 have MHA "
                        f"layers only; use ('mha',)")
    if cfg.first_k_dense < cfg.n_layers:
        problems.append(f"model.first_k_dense={cfg.first_k_dense}: llama and qwen2 are dense; "
                        f"use model.n_layers")
    if cfg.mtp_depth:
        problems.append(f"model.mtp_depth={cfg.mtp_depth}: llama and qwen2 have no MTP "
                        f"modules; use 0")
    qwen2 = family_of(cfg) == "qwen2"
    if cfg.qkv_bias != cfg.out_bias and not qwen2:
        problems.append("model.qkv_bias and model.out_bias differ: llama biases all four "
                        "attention projections or none, qwen2 q, k and v only (and no MLP)")
    if qwen2 and cfg.head_dim * cfg.n_heads != cfg.d_model:
        problems.append(f"model.head_dim={cfg.head_dim}: qwen2's heads are d_model / n_heads "
                        f"wide; use {cfg.d_model // cfg.n_heads}")
    if cfg.rope_yarn_factor > 1:
        problems.append("model.rope_yarn_factor > 1: YaRN is not written for llama/qwen2 "
                        "here; use model.rope_scaling")
    return problems


def to_hf(cfg: ModelConfig, family: str, *, dtype: str,
          special_ids: dict[str, int | None]) -> dict[str, Any]:
    hf: dict[str, Any] = {"architectures": [FAMILIES[family]], "model_type": family}
    for ours, theirs in RENAMED:
        hf[theirs] = getattr(cfg, ours)
    hf.update(num_key_value_heads=cfg.n_kv_heads, hidden_act="silu",
              tie_word_embeddings=cfg.tie_embeddings, rope_theta=cfg.rope_theta,
              rope_scaling=None, attention_dropout=0.0, torch_dtype=dtype, use_cache=True,
              initializer_range=0.02)
    if family == "llama":
        hf.update(head_dim=cfg.head_dim, attention_bias=cfg.qkv_bias, mlp_bias=cfg.mlp_bias)
    else:
        hf.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if cfg.rope_scaling == "linear":
        hf["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_factor}
    elif cfg.rope_scaling == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", **{theirs: getattr(cfg, ours)
                                                        for ours, theirs in LLAMA3}}
    for name, value in special_ids.items():
        hf[f"{name}_token_id"] = value
    return hf


def from_hf(hf: dict[str, Any], family: str, fail: Callable[[str], None]) -> dict[str, Any]:
    """The `model` fields of a llama or qwen2 `config.json` (`fail` raises, naming it)."""
    missing = [theirs for _, theirs in RENAMED if theirs not in hf]
    if missing:
        fail(f"lacks the fields {missing}; is it a complete {family} config?")
    fields = {ours: hf[theirs] for ours, theirs in RENAMED}
    if hf.get("hidden_act", "silu") != "silu":
        fail(f"hidden_act={hf['hidden_act']!r} is not supported (only 'silu').")
    if family == "qwen2" and hf.get("use_sliding_window"):
        fail("use_sliding_window=true is not supported (sliding-window attention); only "
             "full attention.")
    heads = hf["num_attention_heads"]
    qwen2 = family == "qwen2"
    fields.update(
        attn_pattern=("mha",), first_k_dense=hf["num_hidden_layers"], mtp_depth=0,
        n_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=(None if qwen2 else hf.get("head_dim")) or hf["hidden_size"] // heads,
        qkv_bias=qwen2 or bool(hf.get("attention_bias", False)),
        out_bias=not qwen2 and bool(hf.get("attention_bias", False)),
        mlp_bias=not qwen2 and bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        norm_eps=float(hf["rms_norm_eps"]), **_rope_fields(hf, fail))
    return fields


def _rope_fields(hf: dict[str, Any], fail) -> dict[str, Any]:
    """Ours from the legacy `rope_theta` + `rope_scaling`, or transformers 5's
    `rope_parameters`."""
    scaling = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    legacy = scaling.pop("type", None)
    kind = scaling.pop("rope_type", None) or legacy or "default"
    if kind not in ROPE_TYPES:
        fail(f"rope type {kind!r} is not supported (only {', '.join(ROPE_TYPES)}).")
    fields = {"rope_theta": theta, "rope_scaling": "none" if kind == "default" else kind}
    if kind == "linear":
        fields["rope_factor"] = float(scaling["factor"])
    elif kind == "llama3":
        absent = [theirs for _, theirs in LLAMA3 if theirs not in scaling]
        if absent:
            fail(f"llama3 rope scaling lacks {absent}.")
        fields.update({ours: int(scaling[theirs]) if ours == "rope_original_max_len"
                       else float(scaling[theirs]) for ours, theirs in LLAMA3})
    return fields
