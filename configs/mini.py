"""The seed's model and schedule, on the seed's random tokens."""

import ml_collections

from minids_jax import config as config_lib


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()

    config.model = ml_collections.ConfigDict(dict(
        vocab_size=32000,
        max_seq_len=1024,
        d_model=1024,
        n_layers=6,
        n_heads=16,
        latent_k=64,  # MHLA latents; max_seq_len must be a multiple
        mlp_mult=4,  # expert hidden width = mlp_mult * d_model
        n_experts=2,
        top_k=1,
        attn_pattern=("mha", "mhla"),  # layer i uses attn_pattern[i % len(attn_pattern)]
        aux_loss_coef=0.01,  # Switch load-balancing loss weight
        rope_theta=10000.0,
        norm_eps=1e-5,
        dtype="float32",  # compute dtype; "bfloat16" on GPUs
        param_dtype="float32",
        # auto (fused on CPU, dot_product_attention elsewhere) | fused | dot_product_attention
        attention_kernel="auto",
        # dropless (blocked on CPU, ragged elsewhere) | ragged | blocked | capacity | dense
        moe_dispatch="dropless",
        capacity_factor=1.25,  # capacity dispatch only
    ))
    config.optim = ml_collections.ConfigDict(dict(
        lr=3e-4,
        warmup_steps=100,
        total_steps=1000,
        weight_decay=0.01,  # AdamW; not on norms, embeddings, latents
        b1=0.9,
        b2=0.999,
        eps=1e-8,
        clip_norm=1.0,  # global gradient norm; 0 disables
    ))
    config.train = ml_collections.ConfigDict(dict(
        batch_size=8,  # global, over all devices: the seed's 4 per GPU on 2 GPUs
        seed=42,
        log_every=50,
        eval_every=0,  # 0: evaluate at the end only
        eval_batches=4,  # held-out batches per evaluation
        peak_flops=0.0,  # per-device peak FLOP/s for MFU; 0 = data sheet (bf16 GPUs) or measured
        wandb=False,  # also log to Weights & Biases, if the wandb package is installed
        wandb_project="minids_jax",  # W&B project name
    ))
    config.data = ml_collections.ConfigDict(dict(
        source="random",  # random | builtin | text | jsonl | json | tokens
        path="",  # text: file, dir or glob; jsonl/json: instruction file; tokens: .bin or dir
        tokenizer="byte",  # byte | bpe (trained on the corpus with model.vocab_size tokens)
        val_fraction=0.02,  # held-out tail of the corpus, or share of instruction examples
        max_bytes=0,  # builtin/text: cap on corpus bytes, 0 = all
        pack=False,  # jsonl/json: several examples per row instead of one padded
        overlong="truncate",  # jsonl/json examples over max_seq_len+1 tokens: truncate | drop
        token_dtype="auto",  # tokens: uint16 | uint32 | auto (from meta.json, else uint16)
        bpe_train_bytes=0,  # bpe: characters of the corpus to train on, 0 = all
        cache_dir="~/.cache/minids_jax",  # tokenized corpora and tokenizers; "" = no cache
    ))
    config.mesh = ml_collections.ConfigDict(dict(
        data=-1,  # data parallel; -1 = the devices left over
        fsdp=1,  # parameter + optimizer-state sharding (ZeRO-3)
        tensor=1,  # heads / hidden / vocab split
        expert=1,  # experts split
        axis_rules=config_lib.DEFAULT_AXIS_RULES,  # logical axis -> mesh axes
    ))
    config.devices = ml_collections.ConfigDict(dict(
        num_gpus=0,  # the N GPUs with most free memory; 0 = all visible (the seed used 2)
        distributed="auto",  # jax.distributed: auto (from SLURM/MPI/K8s env) | on | off
        coordinator_address="",  # "host:port" of process 0; "" = from the environment
        num_processes=0,  # 0 = from the environment
        process_id=-1,  # -1 = from the environment
        init_timeout_s=300,  # seconds the processes wait for each other at start-up
        reuse_host_memory=True,  # keep freed host memory mapped: no page faults each CPU step
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(
        every=100,  # save every N steps and at the end; 0 = only at the end
        max_to_keep=3,  # older checkpoints are deleted
        async_save=True,  # write in the background; the loop does not wait on disk
        init_from="",  # workdir or step dir: start from its parameters with a fresh optimizer
        fallback=False,  # if the latest checkpoint is unreadable, resume from the previous one
    ))
    return config
