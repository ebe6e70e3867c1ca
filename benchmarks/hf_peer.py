"""Trains transformers' DeepseekV3ForCausalLM on random tokens and prints its tokens/s: the
peer of `benchmarks/throughput.py --vs_hf`. Runs under a Python with torch and transformers
(it imports neither jax nor minids_jax).

    python benchmarks/hf_peer.py CONFIG_JSON --batch 16 --steps 10

CONFIG_JSON is a `config.json` (minids_jax.hf.config.to_hf of the run's model). The model is
float32 on the CPU with transformers' defaults (sdpa attention, the experts kernel it picks),
trained on [batch, max_position_embeddings] random tokens with its own `labels=` loss, AdamW
(no decay of norm gains and embeddings, as minids_jax/optim.py) and global-norm clipping. Its
forward has no MTP module (transformers drops those weights), so there is none to train.
Two warm-up steps, then `--steps` timed ones; prints `tokens_per_sec X`.

    python benchmarks/hf_peer.py CONFIG_JSON --batch 16 --layers 7

times its layers instead, as benchmarks/layers.py times ours (run by `layers.py --vs_hf`):
forward+backward of the attention, the dense MLP and the MoE of one layer on random
activations, the sum of squares of the output as the loss, best of 7 calls.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config")
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight_decay", type=float, default=0.01)
    parser.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999))
    parser.add_argument("--eps", type=float, default=1e-8)
    parser.add_argument("--clip_norm", type=float, default=1.0)
    parser.add_argument("--profile", type=int, default=0,
                        help="also profile this many steps and print torch.profiler's table")
    parser.add_argument("--layers", type=int, default=0,
                        help="time single layers instead, best of this many calls")
    args = parser.parse_args()
    try:
        import torch
        import transformers
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    except ImportError as error:
        sys.exit(f"hf_peer: {sys.executable} cannot run transformers' DeepseekV3ForCausalLM "
                 f"({error}); pass --hf_python a Python with torch and transformers.")

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    with open(args.config) as f:
        config = DeepseekV3Config(**json.load(f))
    model = DeepseekV3ForCausalLM(config).to(torch.float32).train()
    if args.layers:
        return time_layers(model, config, args.batch, args.layers)
    params = dict(model.named_parameters())
    print(f"hf parameters {sum(p.numel() for p in params.values())} | attention "
          f"{model.config._attn_implementation} | experts "
          f"{model.config._experts_implementation} | torch {torch.__version__} | "
          f"transformers {transformers.__version__} | threads {torch.get_num_threads()}",
          flush=True)
    no_decay = [p for n, p in params.items() if "norm" in n or "embed_tokens" in n or p.ndim < 2]
    decay = [p for n, p in params.items() if not any(p is q for q in no_decay)]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=tuple(args.betas), eps=args.eps)
    shape = (args.batch, config.max_position_embeddings)
    generator = torch.Generator().manual_seed(0)

    def step():
        tokens = torch.randint(0, config.vocab_size, shape, generator=generator)
        loss = model(input_ids=tokens, labels=tokens).loss  # shifted inside
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip_norm)
        optimizer.step()
        return loss.detach()

    for _ in range(2):  # warm-up
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    seconds = (time.perf_counter() - start) / args.steps
    print(f"hf step_ms {seconds * 1e3:.1f} loss {float(loss):.3f}")
    print(f"tokens_per_sec {args.batch * config.max_position_embeddings / seconds:.1f}",
          flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.profile):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def time_layers(model, config, batch: int, iters: int) -> None:
    """Prints `transformers NAME MS` per layer kind: forward+backward, best of `iters`."""
    import torch

    length = config.max_position_embeddings
    x_BxLxD = torch.randn(batch, length, config.hidden_size)
    positions_BxL = torch.arange(length)[None].expand(batch, length)
    rope = model.model.rotary_emb(x_BxLxD, positions_BxL)
    layers = model.model.layers
    moe_layer = layers[min(config.first_k_dense_replace, len(layers) - 1)]
    kinds = {"MLA (sdpa, causal)": lambda x: moe_layer.self_attn(
        hidden_states=x, position_embeddings=rope, attention_mask=None)[0]}
    if config.first_k_dense_replace:
        kinds[f"MLP (dense, {config.intermediate_size} wide)"] = layers[0].mlp
    kinds[f"MoE ({model.config._experts_implementation})"] = moe_layer.mlp
    for name, layer in kinds.items():
        times = []
        for _ in range(iters + 2):  # two warm-ups
            x = x_BxLxD.clone().requires_grad_(True)
            start = time.perf_counter()
            layer(x).square().sum().backward()
            times.append(time.perf_counter() - start)
        print(f"transformers {name:27s} {min(times[2:]) * 1e3:8.1f} ms", flush=True)


if __name__ == "__main__":
    main()
