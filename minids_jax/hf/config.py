"""A Hugging Face DeepSeek-V3 or DeepSeek-V2 `config.json` <-> the `model` group, field by
field (llama and qwen2: dense.py).

Every field the published models use maps to one of ours (docs/huggingface.md has the table);
a value we cannot honour is an error that names it, never a silent difference. The other way,
a model this format cannot express (MHA/MHLA layers, softmax routing) is an error naming the
fields to change.
"""

from __future__ import annotations

from typing import Any

from minids_jax.config.model import ModelConfig
from minids_jax.errors import UserError
from minids_jax.hf import dense

MODEL_TYPE = "deepseek_v3"
ARCHITECTURE = "DeepseekV3ForCausalLM"
# DeepSeek-V2: the same MLA, and routing by softmax scores, `greedy` or with groups scored by
# their best expert (`group_limited_greedy`), weights never renormalized, no selection bias.
V2_TYPE, V2_ARCHITECTURE = "deepseek_v2", "DeepseekV2ForCausalLM"
V2_TOPK = ("greedy", "group_limited_greedy")

# (ours, theirs) for the fields that are the same number under another name.
RENAMED = (
    ("vocab_size", "vocab_size"), ("d_model", "hidden_size"), ("n_layers", "num_hidden_layers"),
    ("n_heads", "num_attention_heads"), ("n_experts", "n_routed_experts"),
    ("top_k", "num_experts_per_tok"), ("n_group", "n_group"), ("topk_group", "topk_group"),
    ("norm_topk_prob", "norm_topk_prob"), ("routed_scaling_factor", "routed_scaling_factor"),
    ("n_shared_experts", "n_shared_experts"), ("moe_hidden_dim", "moe_intermediate_size"),
    ("first_k_dense", "first_k_dense_replace"), ("dense_hidden_dim", "intermediate_size"),
    ("kv_lora_rank", "kv_lora_rank"), ("qk_nope_head_dim", "qk_nope_head_dim"),
    ("qk_rope_head_dim", "qk_rope_head_dim"), ("v_head_dim", "v_head_dim"),
    ("max_seq_len", "max_position_embeddings"), ("norm_eps", "rms_norm_eps"),
)
YARN = (("rope_yarn_factor", "factor"), ("rope_original_max_len",
                                          "original_max_position_embeddings"),
        ("rope_beta_fast", "beta_fast"), ("rope_beta_slow", "beta_slow"),
        ("rope_mscale", "mscale"), ("rope_mscale_all_dim", "mscale_all_dim"))
# HF's defaults for YaRN fields a config may leave out (modeling_rope_utils). An absent mscale
# is 0 here, as transformers tells it apart: without both mscale and mscale_all_dim, the
# amplitude is mscale(factor, 1), not mscale(factor, 1) / mscale(factor, mscale_all_dim).
YARN_DEFAULTS = {"beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.0, "mscale_all_dim": 0.0}


class HFFormatError(UserError):
    """A Hugging Face directory or config this project cannot read, or a model it cannot
    write in that format."""


def inexpressible(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` out of the DeepSeek-V3 format, one fix per entry ([] if nothing)."""
    problems = []
    if set(cfg.attn_pattern) != {"mla"}:
        problems.append(f"model.attn_pattern={cfg.attn_pattern}: DeepSeek-V3 has MLA layers "
                        f"only; use ('mla',)")
    if is_v2(cfg):  # softmax routing: DeepSeek-V2's
        if cfg.n_group > 1 and cfg.group_score != "max":
            problems.append(f"model.group_score={cfg.group_score!r}: DeepSeek-V2 scores a "
                            f"group by its best expert; use 'max'")
        if cfg.norm_topk_prob and cfg.top_k > 1:
            problems.append("model.norm_topk_prob=True: DeepSeek-V2 never renormalizes the "
                            "routing weights; use False")
    else:
        if cfg.router_scoring != "sigmoid":
            problems.append(f"model.router_scoring={cfg.router_scoring!r}: DeepSeek-V3 routes "
                            f"by sigmoid scores (DeepSeek-V2 by softmax, with MLA layers only); "
                            f"use 'sigmoid'")
        if cfg.group_score != "top2_sum":
            problems.append(f"model.group_score={cfg.group_score!r}: DeepSeek-V3 scores a group "
                            f"by its top 2; use 'top2_sum'")
    for name in ("tie_embeddings", "mlp_bias"):
        if getattr(cfg, name):
            problems.append(f"model.{name}=True: DeepSeek-V3 has none; use False")
    if cfg.rope_scaling != "none":
        problems.append(f"model.rope_scaling={cfg.rope_scaling!r}: DeepSeek-V3 scales RoPE by "
                        f"YaRN only; use 'none'")
    return problems


def to_hf(cfg: ModelConfig, *, dtype: str = "float32",
          special_ids: dict[str, int | None] | None = None) -> dict[str, Any]:
    """The `config.json` of `cfg` for transformers and vLLM: a dense MHA model as llama or
    qwen2 (dense.py), an MLA model with softmax routing as DeepSeek-V2, any other as
    DeepSeek-V3."""
    family = dense.family_of(cfg)
    if family is not None:
        problems = dense.inexpressible(cfg)
        if problems:
            raise HFFormatError(f"this model cannot be written as a {family} checkpoint: "
                                + "; ".join(problems) + ".")
        return dense.to_hf(cfg, family, dtype=dtype, special_ids=special_ids or {})
    problems = inexpressible(cfg)
    if problems:
        raise HFFormatError(f"this model cannot be written as a "
                            f"{'DeepSeek-V2' if is_v2(cfg) else 'DeepSeek-V3'} checkpoint: "
                            + "; ".join(problems) + ".")
    v2 = is_v2(cfg)
    hf: dict[str, Any] = {"architectures": [V2_ARCHITECTURE if v2 else ARCHITECTURE],
                          "model_type": V2_TYPE if v2 else MODEL_TYPE}
    for ours, theirs in RENAMED:
        hf[theirs] = getattr(cfg, ours)
    hf.update(
        intermediate_size=cfg.dense_mlp_dim, moe_intermediate_size=cfg.expert_hidden_dim,
        num_key_value_heads=cfg.n_heads, q_lora_rank=cfg.q_lora_rank or None,
        hidden_act="silu", attention_bias=False, attention_dropout=0.0,
        tie_word_embeddings=False, rope_interleave=True, rope_theta=cfg.rope_theta,
        rope_scaling=None, num_nextn_predict_layers=cfg.mtp_depth,
        # Fields transformers ignores but the official code and vLLM read.
        scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1,
        torch_dtype=dtype, use_cache=True, initializer_range=0.02)
    if v2:
        hf.update(topk_method="group_limited_greedy" if cfg.n_group > 1 else "greedy",
                  scoring_func="softmax", norm_topk_prob=False)
        for name in ("rope_interleave", "num_nextn_predict_layers"):
            hf.pop(name)
    if cfg.rope_yarn_factor > 1:  # (an mscale of 0 is one the config leaves out)
        hf["rope_scaling"] = {"type": "yarn", **{theirs: getattr(cfg, ours)
                                                 for ours, theirs in YARN
                                                 if theirs != "mscale" or cfg.rope_mscale}}
    for name, value in (special_ids or {}).items():
        hf[f"{name}_token_id"] = value
    return hf


def is_v2(cfg: ModelConfig) -> bool:
    """Whether an MLA model exports as DeepSeek-V2 (softmax routing) rather than V3."""
    return cfg.router_scoring == "softmax" and set(cfg.attn_pattern) == {"mla"}


def from_hf(hf: dict[str, Any], origin: str) -> dict[str, Any]:
    """The `model` fields of a DeepSeek-V3, DeepSeek-V2, llama or qwen2 `config.json` (read
    from `origin`, for errors)."""
    def fail(message: str):
        raise HFFormatError(f"{origin}: {message}")

    if hf.get("model_type") in dense.FAMILIES:
        return dense.from_hf(hf, hf["model_type"], fail)
    v2 = hf.get("model_type") == V2_TYPE
    if hf.get("model_type") not in (MODEL_TYPE, V2_TYPE):
        fail(f"model_type is {hf.get('model_type')!r}; the families that can be imported are "
             f"{', '.join([*dense.FAMILIES, V2_TYPE, MODEL_TYPE])}.")
    if v2:  # a greedy V2 may leave its groups unset (None)
        hf = dict(hf, n_group=hf.get("n_group") or 1, topk_group=hf.get("topk_group") or 1)
        hf.setdefault("norm_topk_prob", False)
    missing = [theirs for _, theirs in RENAMED if theirs not in hf]
    if missing:
        fail(f"lacks the fields {missing}; is it a complete "
             f"{'DeepSeek-V2' if v2 else 'DeepSeek-V3'} config?")
    fields = {ours: hf[theirs] for ours, theirs in RENAMED}
    # What the format allows but the model here does not compute: refuse, naming the field.
    refused = {
        "num_key_value_heads": (hf.get("num_key_value_heads") or hf["num_attention_heads"],
                                hf["num_attention_heads"]),
        "hidden_act": (hf.get("hidden_act", "silu"), "silu"),
        "attention_bias": (hf.get("attention_bias", False), False),
        "tie_word_embeddings": (hf.get("tie_word_embeddings", False), False),
        "rope_interleave": (hf.get("rope_interleave", True), True),
        "scoring_func": (hf.get("scoring_func", "softmax" if v2 else "sigmoid"),
                         "softmax" if v2 else "sigmoid"),
        "moe_layer_freq": (hf.get("moe_layer_freq", 1), 1),
    }
    for name, (value, supported) in refused.items():
        if value != supported:
            fail(f"{name}={value!r} is not supported (only {supported!r}).")
    topk_method, methods = hf.get("topk_method"), V2_TOPK if v2 else ("noaux_tc",)
    if (topk_method or methods[0]) not in methods:
        fail(f"topk_method={topk_method!r} is not supported (only {', '.join(methods)}).")
    if v2:  # transformers' DeepseekV2 never renormalizes, whatever norm_topk_prob says
        fields.update(router_scoring="softmax", group_score="max", norm_topk_prob=False)
        if hf.get("topk_method", "greedy") == "greedy":
            fields.update(n_group=1, topk_group=1)
    fields.update(
        attn_pattern=("mla",), router_scoring=fields.get("router_scoring", "sigmoid"),
        q_lora_rank=hf.get("q_lora_rank") or 0,
        mtp_depth=int(hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", 0)) or 0),
        **rope_fields(hf, fail))
    fields["routed_scaling_factor"] = float(fields["routed_scaling_factor"])
    fields["norm_eps"] = float(fields["norm_eps"])
    return fields


def rope_fields(hf: dict[str, Any], fail) -> dict[str, Any]:
    """Ours from the legacy `rope_theta` + `rope_scaling`, or v5's `rope_parameters`."""
    scaling = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = float(scaling.pop("rope_theta", hf.get("rope_theta", 10000.0)))
    legacy_kind = scaling.pop("type", None)  # v5 writes both names
    kind = scaling.pop("rope_type", None) or legacy_kind or "default"
    if kind == "default":
        return {"rope_theta": theta, "rope_yarn_factor": 1.0}
    if kind != "yarn":
        fail(f"rope type {kind!r} is not supported (only 'default' and 'yarn').")
    if not scaling.pop("truncate", True):
        fail("YaRN with truncate=false is not supported.")
    unknown = sorted(set(scaling) - {theirs for _, theirs in YARN})
    if unknown:
        fail(f"the YaRN fields {unknown} are not supported.")
    values = {**YARN_DEFAULTS, **scaling}
    if "factor" not in values or "original_max_position_embeddings" not in values:
        fail("YaRN rope scaling needs 'factor' and 'original_max_position_embeddings'.")
    fields = {ours: int(values[theirs]) if ours == "rope_original_max_len"
              else float(values[theirs]) for ours, theirs in YARN}
    if fields["rope_yarn_factor"] < 1:
        fail(f"a YaRN factor of {fields['rope_yarn_factor']} (< 1) is not supported.")
    return {"rope_theta": theta, **fields}
