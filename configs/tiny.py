"""CPU-sized: a small model on the built-in corpus; the loss falls within minutes."""

from configs import mini


def get_config():
    config = mini.get_config()
    config.model.update(
        vocab_size=259,  # byte tokenizer: 256 bytes + 3 specials
        max_seq_len=128,
        d_model=128,
        n_layers=4,
        n_heads=4,
        latent_k=16,
        n_experts=4,
    )
    config.optim.update(lr=3e-3, warmup_steps=30, total_steps=600)
    config.train.update(batch_size=16, log_every=25, eval_every=200)
    config.data.update(source="builtin")
    return config
