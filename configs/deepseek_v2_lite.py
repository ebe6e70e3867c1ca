"""DeepSeek-V2-Lite (Hugging Face `deepseek_v2`): 27 MLA layers without query compression, the
first dense, then 64 routed experts (6 per token, softmax scores, no renormalization) beside 2
shared ones; YaRN to 163840 positions. For inspecting sizes and sharding plans."""

from configs import mini


def get_config():
    config = mini.get_config()
    config.model.update(
        vocab_size=102400, d_model=2048, n_layers=27, n_heads=16, max_seq_len=163840,
        attn_pattern=("mla",), q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
        qk_rope_head_dim=64, v_head_dim=128,
        rope_theta=10000.0, rope_yarn_factor=40.0, rope_original_max_len=4096,
        rope_beta_fast=32.0, rope_beta_slow=1.0, rope_mscale=0.707, rope_mscale_all_dim=0.707,
        router_scoring="softmax", n_experts=64, n_group=1, topk_group=1, top_k=6,
        norm_topk_prob=False, routed_scaling_factor=1.0, n_shared_experts=2,
        moe_hidden_dim=1408, first_k_dense=1, dense_hidden_dim=10944, mtp_depth=0,
        norm_eps=1e-6, param_dtype="bfloat16",
    )
    config.compute.update(dtype="bfloat16")
    # V2-Lite's seq_aux=true: its aux_loss_alpha weighs the sequence-wise loss.
    config.train.update(aux_loss_coef=0.0, sequence_aux_loss_coef=0.001)
    return config
