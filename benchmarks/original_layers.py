"""The PyTorch original's layers, timed as benchmarks/layers.py times ours (run by it).

    python benchmarks/original_layers.py PATH/TO/mini_ds_torch.py ITERS

Sizes come from the MINIDS_* environment variables the original reads; the layers are the
original's own classes, imported from its file, each timed forward+backward on random
activations (best of ITERS calls), then AdamW over the whole model.
"""

import importlib.util
import os
import sys
import time

import torch


def best_of(iters: int, fn) -> float:
    times = []
    for _ in range(iters + 2):  # two warm-ups
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times[2:])


def main(script: str, iters: int) -> None:
    spec = importlib.util.spec_from_file_location("original", script)
    original = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(original)  # defines the classes; its training runs only as __main__
    cfg = original.CFG
    model = original.MiniDeepSeek()
    x0 = torch.randn(cfg.batch, cfg.max_seq, cfg.d_model)
    positions = torch.arange(cfg.max_seq)
    targets = torch.randint(0, cfg.vocab, (cfg.batch * cfg.max_seq,))
    mha_block, mhla_block = model.blocks[0], model.blocks[1]

    def mha(x):
        q = original.rope(x, positions)
        mask = mha_block.causal_mask[:cfg.max_seq, :cfg.max_seq]
        return mha_block.attn(q, q, q, need_weights=False, attn_mask=mask)[0].square().sum()

    layers = {
        "MHA": mha,
        "MHLA": lambda x: mhla_block.attn(original.rope(x, positions), positions).square().sum(),
        "MoE": lambda x: mha_block.ffn(x).square().sum(),
        "head + loss": lambda x: torch.nn.functional.cross_entropy(
            model.head(x).reshape(-1, cfg.vocab), targets),
    }
    for name, loss_fn in layers.items():
        def step():
            loss_fn(x0.clone().requires_grad_(True)).backward()
        print(f"original {name:31s} {best_of(iters, step) * 1e3:8.1f} ms", flush=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    print(f"original {'AdamW update (whole model)':31s} "
          f"{best_of(iters, optimizer.step) * 1e3:8.1f} ms")


if __name__ == "__main__":
    os.environ.setdefault("MINIDS_DEVICE", "cpu")
    main(sys.argv[1], int(sys.argv[2]))
