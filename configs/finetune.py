"""Fine-tuning a base run on instruction or chat data (jsonl: alpaca records, ShareGPT or
OpenAI messages): LoRA of rank 16 on every attention projection, three epochs, a cosine
schedule after a short warm-up.

    python train.py --config configs/finetune.py --config.checkpoint.init_from=runs/base \
        --config.data.path=my.jsonl --workdir runs/ft

The architecture and the tokenizer are the base's (checkpoint.init_from), so this file sets
no model field. Full fine-tuning: --config.lora.rank=0 --config.optim.lr=2e-5. QLoRA (the
frozen base in 4 bits): --config.lora.base_quant=nf4.
"""

from ml_collections import config_dict

from configs import mini


def get_config():
    config = mini.get_config()
    # Left to the command line: running without them is an error that says to set them.
    config.checkpoint.update(init_from=config_dict.placeholder(str), every=200)
    config.data.update(source="jsonl", path=config_dict.placeholder(str))
    config.lora.update(rank=16, alpha=32.0, targets=("attn.*",))
    # Adapters start at zero and move the model little per step: 2e-4 (full: 2e-5).
    config.optim.update(lr=2e-4, schedule="cosine", min_lr_ratio=0.1, warmup_steps=20)
    config.train.update(epochs=3.0, log_every=10, eval_every=100)
    # Remat and the microbatch from the memory plan (training/memory.py): none and the whole
    # batch where they fit devices.memory, else the least that fits; a run that cannot fit
    # stops before it compiles. A 7B on one 24 GB GPU: add --config.lora.base_quant=nf4.
    config.compute.update(remat="auto")
    config.train.update(grad_accum_steps=0)
    return config
