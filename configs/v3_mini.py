"""GPU-sized DeepSeek-V3, about the training FLOPs per token of configs/mini.py (the original's
sizes: d_model 1024, 6 layers, a 1024-token context), on random tokens unless overridden."""

from configs import mini


def get_config():
    config = mini.get_config()
    config.model.update(
        attn_pattern=("mla",),
        q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
        v_head_dim=64,
        router_scoring="sigmoid", n_experts=16, n_group=4, topk_group=2, top_k=2,
        n_shared_experts=1, moe_hidden_dim=768, first_k_dense=1, dense_hidden_dim=4096,
        routed_scaling_factor=1.0, mtp_depth=1,
    )
    config.train.update(aux_loss_coef=0.0, sequence_aux_loss_coef=1e-4, router_bias_rate=1e-3)
    return config
