"""The `model` group: the architecture, which a checkpoint's must match (run.py holds the
other groups). The original's fields, then DeepSeek-V3's (MLA, YaRN, DeepSeekMoE, MTP).
"""

from __future__ import annotations

import dataclasses

from minids_jax.config.fields import ARCHITECTURE, Group, check, option

ATTENTION_KINDS = ("mha", "mhla", "mla")
ROUTER_SCORINGS = ("softmax", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")  # DeepSeek-V3's, DeepSeek-V2's group_limited_greedy
ROPE_SCALINGS = ("none", "linear", "llama3")  # besides YaRN (rope_yarn_factor)
DTYPES = ("float32", "bfloat16", "float16")


@dataclasses.dataclass(frozen=True)
class ModelConfig(Group):
    """The architecture: what the parameters are and the function they compute."""

    NAME = "model"
    vocab_size: int = option(32000, "vocabulary size (the byte tokenizer needs 259)",
                             ARCHITECTURE, low=1)
    max_seq_len: int = option(1024, "context length; MHLA's segments are fixed by it",
                              ARCHITECTURE, low=1)
    d_model: int = option(1024, "model width", ARCHITECTURE, low=1)
    n_layers: int = option(6, "blocks", ARCHITECTURE, low=1)
    n_heads: int = option(16, "attention heads; must divide d_model unless head_dim is set",
                          ARCHITECTURE, low=1)
    n_kv_heads: int = option(0, "MHA/MHLA key-value heads (grouped-query attention: query "
                             "head h reads kv head h // (n_heads / n_kv_heads)); 0: n_heads",
                             ARCHITECTURE, low=0)
    head_dim: int = option(0, "MHA/MHLA width of each head; 0: d_model / n_heads",
                           ARCHITECTURE, low=0)
    qkv_bias: bool = option(False, "biases on the MHA/MHLA q, k and v projections (qwen2)",
                            ARCHITECTURE)
    out_bias: bool = option(False, "a bias on the MHA/MHLA output projection (llama's "
                            "attention_bias sets both)", ARCHITECTURE)
    mlp_bias: bool = option(False, "biases on the dense SwiGLUs' projections (llama's "
                            "mlp_bias)", ARCHITECTURE)
    tie_embeddings: bool = option(False, "the head is the embedding, transposed (no head "
                                  "parameters)", ARCHITECTURE)
    latent_k: int = option(64, "learned latents of the MHLA layers; must divide max_seq_len",
                           ARCHITECTURE, low=1)
    mlp_mult: int = option(4, "expert hidden width = mlp_mult * d_model", ARCHITECTURE, low=1)
    n_experts: int = option(2, "experts per MoE layer", ARCHITECTURE, low=1)
    top_k: int = option(1, "experts per token", ARCHITECTURE, low=1)
    router_scoring: str = option("softmax", "routing scores: 'softmax' (the original's) or "
                                 "'sigmoid' (DeepSeek-V3's, with a selection bias)",
                                 ARCHITECTURE, choices=ROUTER_SCORINGS)
    n_group: int = option(1, "expert groups; each token picks experts from topk_group of them",
                          ARCHITECTURE, low=1)
    topk_group: int = option(1, "groups kept per token", ARCHITECTURE, low=1)
    group_score: str = option("top2_sum", "what a group scores: 'top2_sum' of its biased "
                              "scores (DeepSeek-V3) or 'max' (DeepSeek-V2)", ARCHITECTURE,
                              choices=GROUP_SCORES)
    norm_topk_prob: bool = option(True, "divide the chosen weights by their sum (softmax "
                                  "scores: only with top_k > 1)",
                                  ARCHITECTURE)
    routed_scaling_factor: float = option(1.0, "multiplies the routed experts' weights",
                                          ARCHITECTURE, above=0)
    n_shared_experts: int = option(0, "always-on experts of moe_hidden_dim each, beside the "
                                   "routed ones", ARCHITECTURE, low=0)
    moe_hidden_dim: int = option(0, "hidden width of each routed (and shared) expert; 0: "
                                 "mlp_mult * d_model", ARCHITECTURE, low=0)
    first_k_dense: int = option(0, "the first k layers have a dense SwiGLU instead of an MoE; "
                                "-1: every layer (a dense model, as llama and qwen2)",
                                ARCHITECTURE, low=-1)
    dense_hidden_dim: int = option(0, "hidden width of those dense SwiGLUs; 0: mlp_mult * "
                                   "d_model", ARCHITECTURE, low=0)
    mtp_depth: int = option(0, "multi-token prediction modules: module k also predicts the "
                            "token k+1 ahead (DeepSeek-V3: 1)", ARCHITECTURE, low=0)
    attn_pattern: tuple = option(("mha", "mhla"), "layer i uses attn_pattern[i % len]: "
                                 "'mha', 'mhla' or 'mla' (DeepSeek-V3's)", ARCHITECTURE)
    q_lora_rank: int = option(0, "MLA: rank of the query's low-rank projection; 0: one "
                              "direct projection", ARCHITECTURE, low=0)
    kv_lora_rank: int = option(64, "MLA: rank of the cached key-value latent", ARCHITECTURE,
                               low=1)
    qk_nope_head_dim: int = option(32, "MLA: per-head query/key dims without RoPE",
                                   ARCHITECTURE, low=1)
    qk_rope_head_dim: int = option(16, "MLA: query/key dims with RoPE (the key's are shared "
                                   "by all heads); even", ARCHITECTURE, low=2)
    v_head_dim: int = option(32, "MLA: per-head value dims", ARCHITECTURE, low=1)
    rope_theta: float = option(10000.0, "RoPE base", ARCHITECTURE, above=0)
    rope_scaling: str = option("none", "RoPE frequency scaling besides YaRN: 'linear' "
                               "(frequencies / rope_factor) or 'llama3'", ARCHITECTURE,
                               choices=ROPE_SCALINGS)
    rope_factor: float = option(1.0, "linear/llama3: the scaling factor", ARCHITECTURE,
                                low=1.0)
    rope_low_freq_factor: float = option(1.0, "llama3: wavelengths above original_max_len / "
                                         "this are divided by rope_factor", ARCHITECTURE,
                                         above=0)
    rope_high_freq_factor: float = option(4.0, "llama3: wavelengths below original_max_len / "
                                          "this are kept", ARCHITECTURE, above=0)
    rope_yarn_factor: float = option(1.0, "YaRN context extension factor of every RoPE; 1: "
                                     "plain RoPE", ARCHITECTURE, low=1.0)
    rope_original_max_len: int = option(4096, "YaRN and llama3: the context the RoPE was "
                                        "trained for", ARCHITECTURE, low=1)
    rope_beta_fast: float = option(32.0, "YaRN: rotations above which a frequency is kept",
                                   ARCHITECTURE, above=0)
    rope_beta_slow: float = option(1.0, "YaRN: rotations below which a frequency is divided "
                                   "by the factor", ARCHITECTURE, above=0)
    rope_mscale: float = option(1.0, "YaRN: mscale of the cos/sin amplitude; 0: none (with "
                                "rope_mscale_all_dim, the amplitude is mscale(factor, 1))",
                                ARCHITECTURE, low=0)
    rope_mscale_all_dim: float = option(0.0, "YaRN: mscale of the softmax scale (DeepSeek-V3: "
                                        "1.0); 0: none", ARCHITECTURE, low=0)
    norm_eps: float = option(1e-5, "RMSNorm epsilon", ARCHITECTURE, above=0)
    param_dtype: str = option("float32", "dtype the parameters are stored in (the MoE routers' "
                              "gate and bias stay float32)", ARCHITECTURE,
                              choices=DTYPES)

    def validate(self):
        check(self.head_dim or self.d_model % self.n_heads == 0,
              f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
              f"choose n_heads among the divisors of d_model, or set model.head_dim.")
        if not self.head_dim:  # stored resolved: a saved config says what its heads were
            object.__setattr__(self, "head_dim", self.d_model // self.n_heads)
        if not self.n_kv_heads:
            object.__setattr__(self, "n_kv_heads", self.n_heads)
        if self.first_k_dense == -1:  # a dense model keeps being one when n_layers changes
            object.__setattr__(self, "first_k_dense", self.n_layers)
        check(self.head_dim % 2 == 0,
              f"model.head_dim={self.head_dim} must be even for rotary embeddings; change "
              f"model.head_dim (or model.d_model / model.n_heads).")
        check(self.n_heads % self.n_kv_heads == 0,
              f"model.n_kv_heads={self.n_kv_heads} must divide model.n_heads={self.n_heads} "
              f"(each key-value head serves an equal group of query heads).")
        check(self.rope_scaling == "none" or self.rope_yarn_factor == 1,
              f"model.rope_scaling={self.rope_scaling!r} and YaRN (model.rope_yarn_factor="
              f"{self.rope_yarn_factor}) both scale RoPE; use one of them.")
        check(self.rope_scaling != "llama3" or
              self.rope_high_freq_factor > self.rope_low_freq_factor,
              f"model.rope_high_freq_factor={self.rope_high_freq_factor} must exceed "
              f"model.rope_low_freq_factor={self.rope_low_freq_factor}.")
        check(self.top_k <= self.n_experts,
              f"model.top_k={self.top_k} exceeds model.n_experts={self.n_experts}; "
              f"set top_k <= n_experts.")
        experts, groups = self.n_experts, self.n_group
        check(experts % groups == 0 and (groups == 1 or experts // groups >= 2
                                         or self.group_score == "max"),
              f"model.n_group={groups} must divide model.n_experts={experts} into groups of at "
              f"least 2 experts (with model.group_score='top2_sum' a group scores the sum of its top "
              f"2).")
        check(self.topk_group <= groups and self.top_k <= self.topk_group * (experts // groups),
              f"model.topk_group={self.topk_group} must be <= model.n_group={groups}, and its "
              f"groups must hold model.top_k={self.top_k} experts.")
        check(self.first_k_dense <= self.n_layers,
              f"model.first_k_dense={self.first_k_dense} exceeds model.n_layers="
              f"{self.n_layers}; set it to -1 for a dense model (llama, qwen2).")
        check(len(self.attn_pattern) > 0, "model.attn_pattern is empty; use e.g. ('mha', 'mhla').")
        for kind in self.attn_pattern:
            check(kind in ATTENTION_KINDS, f"model.attn_pattern has unknown attention kind "
                                           f"{kind!r}; choose from {ATTENTION_KINDS}.")
        check("mla" not in self.attn_pattern or self.qk_rope_head_dim % 2 == 0,
              f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE turns pairs).")
        check(self.rope_beta_fast > self.rope_beta_slow,
              f"model.rope_beta_fast={self.rope_beta_fast} must exceed model.rope_beta_slow="
              f"{self.rope_beta_slow}.")
        check("mhla" not in self.attn_pattern or self.max_seq_len % self.latent_k == 0,
              f"model.max_seq_len={self.max_seq_len} is not divisible by model.latent_k="
              f"{self.latent_k}: each latent summarizes an equal segment; choose latent_k among "
              f"the divisors of max_seq_len.")

    @property
    def hidden_dim(self) -> int:
        return self.mlp_mult * self.d_model

    @property
    def expert_hidden_dim(self) -> int:
        return self.moe_hidden_dim or self.hidden_dim

    @property
    def dense_mlp_dim(self) -> int:
        return self.dense_hidden_dim or self.hidden_dim

    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense

    def attention_kind(self, layer: int) -> str:
        return self.attn_pattern[layer % len(self.attn_pattern)]


@dataclasses.dataclass(frozen=True)
class LoRAConfig(Group):
    """Low-rank adapters on chosen projections, the rest frozen (minids_jax/model/lora.py)."""

    NAME = "lora"
    rank: int = option(0, "adapter rank; 0: no adapters (every parameter trains)", ARCHITECTURE,
                       low=0)
    alpha: float = option(16.0, "adapters are scaled by alpha / rank (PEFT's lora_alpha)",
                          ARCHITECTURE, above=0)
    targets: tuple = option(("attn.*",), "projections that get adapters: names like 'q_up' or "
                            "'attn.*', 'mlp.*' (dense), 'shared.*', 'moe.w1' (routed experts, "
                            "one adapter each), 'head', fnmatch patterns on the path, or PEFT's "
                            "names ('q_proj', 'k_proj', 'v_proj', 'o_proj', 'gate_proj', "
                            "'up_proj', 'down_proj', 'all-linear', ...)",
                            ARCHITECTURE)
    dropout: float = option(0.0, "share of each adapter's input dropped while training "
                            "(PEFT's lora_dropout); not for routed experts' adapters",
                            low=0.0, below=1.0)
    train_norms: bool = option(False, "also train the RMSNorm gains", ARCHITECTURE)
    base_quant: str = option("none", "store the frozen base quantized: 'int8' (per output "
                             "channel) or 'nf4' (QLoRA's 4-bit NormalFloat, blocks of 64, "
                             "double-quantized scales), every frozen projection but the head "
                             "and the routers (model/quant.py)", ARCHITECTURE,
                             choices=("none", "int8", "nf4"))

    def validate(self):
        check(len(self.targets) > 0 or not self.rank,
              "lora.targets is empty; name the projections to adapt, e.g. ('attn.*',).")
        check(self.base_quant == "none" or self.rank > 0,
              f"lora.base_quant={self.base_quant!r} quantizes the frozen base of a LoRA run, "
              f"and lora.rank=0 trains every parameter; set lora.rank (e.g. 16) or "
              f"lora.base_quant='none'.")
