"""DeepSeek-R1-Distill-Qwen-1.5B (Hugging Face `qwen2`): 28 dense layers, 12 query heads
sharing 2 key-value heads, q/k/v biases, an untied head, 151936 tokens. For inspecting sizes
and sharding plans; import the released weights to fine-tune them."""

from configs import mini


def get_config():
    config = mini.get_config()
    config.model.update(
        vocab_size=151936, d_model=1536, n_layers=28, n_heads=12, n_kv_heads=2, head_dim=128,
        max_seq_len=131072, attn_pattern=("mha",), first_k_dense=-1, dense_hidden_dim=8960,
        qkv_bias=True, mtp_depth=0, rope_theta=10000.0, norm_eps=1e-6, param_dtype="bfloat16",
    )
    config.compute.update(dtype="bfloat16")
    return config
