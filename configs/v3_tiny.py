"""CPU-sized DeepSeek-V3: MLA, shared and fine-grained routed experts with sigmoid group
routing balanced by the bias update, a dense first layer and multi-token prediction, on the
built-in corpus (the sizes and schedule of configs/tiny.py otherwise)."""

from configs import tiny


def get_config():
    config = tiny.get_config()
    config.model.update(
        attn_pattern=("mla",),
        q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
        v_head_dim=32,
        router_scoring="sigmoid", n_experts=8, n_group=2, topk_group=2, top_k=2,
        n_shared_experts=1, moe_hidden_dim=128, first_k_dense=1, dense_hidden_dim=512,
        mtp_depth=1,
    )
    # Balanced by the bias update, with the paper's small sequence-wise loss beside it.
    config.train.update(aux_loss_coef=0.0, sequence_aux_loss_coef=1e-4, router_bias_rate=1e-3)
    return config
