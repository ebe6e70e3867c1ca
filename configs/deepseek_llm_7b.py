"""deepseek-llm-7b-base/chat (Hugging Face `llama`): 30 dense layers, 32 heads, 102400 tokens.
For inspecting sizes and sharding plans, or a from-scratch run of that shape; to fine-tune the
released weights, import them (`python -m minids_jax.hf import`) and start from that run."""

from configs import mini


def get_config():
    config = mini.get_config()
    config.model.update(
        vocab_size=102400, d_model=4096, n_layers=30, n_heads=32, n_kv_heads=32, head_dim=128,
        max_seq_len=4096, attn_pattern=("mha",), first_k_dense=-1, dense_hidden_dim=11008,
        mtp_depth=0, rope_theta=10000.0, norm_eps=1e-6, param_dtype="bfloat16",
    )
    config.compute.update(dtype="bfloat16")
    return config
