"""The published DeepSeek-V3 shape (671B parameters, about 37B active per token), for
inspecting sizes and layouts; training it needs a large cluster. The values are those of its
Hugging Face config.json."""

from configs import mini


def get_config():
    config = mini.get_config()
    config.model.update(
        vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, max_seq_len=4096,
        attn_pattern=("mla",),
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128,
        rope_theta=10000.0, rope_yarn_factor=40.0, rope_original_max_len=4096,
        rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=1.0, rope_mscale_all_dim=1.0,
        router_scoring="sigmoid", n_experts=256, n_group=8, topk_group=4, top_k=8,
        norm_topk_prob=True, routed_scaling_factor=2.5, n_shared_experts=1,
        moe_hidden_dim=2048, first_k_dense=3, dense_hidden_dim=18432, mtp_depth=1,
        norm_eps=1e-6, param_dtype="bfloat16",
    )
    config.compute.update(dtype="bfloat16")
    config.train.update(aux_loss_coef=0.0, sequence_aux_loss_coef=1e-4, router_bias_rate=1e-3)
    return config
