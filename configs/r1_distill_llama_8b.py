"""DeepSeek-R1-Distill-Llama-8B (Hugging Face `llama`, Llama 3.1 8B's shape): 32 dense layers,
32 query heads sharing 8 key-value heads, llama3 RoPE scaling, 128256 tokens. For inspecting
sizes and sharding plans; import the released weights to fine-tune them."""

from configs import mini


def get_config():
    config = mini.get_config()
    config.model.update(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128,
        max_seq_len=131072, attn_pattern=("mha",), first_k_dense=-1, dense_hidden_dim=14336,
        mtp_depth=0, rope_theta=500000.0, rope_scaling="llama3", rope_factor=8.0,
        rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
        norm_eps=1e-5, param_dtype="bfloat16",
    )
    config.compute.update(dtype="bfloat16")
    return config
