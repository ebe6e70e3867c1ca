"""Training throughput: compile time, step time, tokens/s and MFU, optionally against the seed.

    python benchmarks/throughput.py --config configs/tiny.py --steps 10
    python benchmarks/throughput.py --config configs/mini.py --config.model.d_model=256 \
        --config.model.vocab_size=8192 --config.model.max_seq_len=256 \
        --config.model.n_layers=4 --config.model.n_heads=8 --config.model.latent_k=16 \
        --vs-seed ../shared/seed/mini_ds_torch.py --seed-python /path/to/python-with-torch

MFU = analytic training FLOPs per token (minids_jax/flops.py: active experts only) x tokens/s,
divided by a peak measured here: the best of several square matmuls in the compute dtype
(`flops.measure_matmul_flops`).
The seed runs as a subprocess at the same sizes (its batch is per process; here there is one
process, so the same global batch), timed over the same number of steps after two warm-ups.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import time_train_step  # noqa: E402  (benchmarks/timing.py, beside this file)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps (after two warm-up steps).")
_VS_SEED = flags.DEFINE_string("vs_seed", None, "Path to the PyTorch seed script to compare.")
_SEED_PYTHON = flags.DEFINE_string("seed_python", sys.executable, "Python that has torch.")
_PEAK_SIZE = flags.DEFINE_integer("peak_matmul_size", 2048, "Square matmul size for the peak.")
_DISPATCHES = flags.DEFINE_list("dispatches", None,
                                "MoE dispatches to compare, e.g. dropless,capacity,dense "
                                "(default: the config's).")


def benchmark_jax(config, steps: int) -> dict[str, float]:
    import jax

    from minids_jax import flops, trainer

    timing = time_train_step(trainer.Trainer(config), steps)
    tokens_per_s = timing.tokens_per_s
    peak = flops.measure_matmul_flops(config.model.dtype, _PEAK_SIZE.value)
    flops_per_token = flops.train_flops_per_token(config.model)
    return {
        "devices": jax.device_count(), "compile_s": timing.compile_s, "step_s": timing.step_s,
        "tokens_per_s": tokens_per_s, "train_flops_per_token": flops_per_token,
        "peak_flops": peak, "mfu": flops_per_token * tokens_per_s / (peak * jax.device_count()),
    }


def benchmark_seed(config, steps: int, script: str, python: str) -> float | None:
    m = config.model
    env = dict(os.environ, MINIDS_DEVICE="cpu", MINIDS_VOCAB=str(m.vocab_size),
               MINIDS_MAX_SEQ=str(m.max_seq_len), MINIDS_D_MODEL=str(m.d_model),
               MINIDS_N_LAYER=str(m.n_layers), MINIDS_N_HEAD=str(m.n_heads),
               MINIDS_LATENT_K=str(m.latent_k), MINIDS_MLP_MULT=str(m.mlp_mult),
               MINIDS_MOE_EXPERT=str(m.n_experts), MINIDS_BATCH=str(config.train.batch_size),
               MINIDS_TOTAL_STEP=str(steps + 2), MINIDS_WARMUP="1")
    result = subprocess.run([python, script], env=env, capture_output=True, text=True)
    found = re.search(r"tokens_per_sec ([\d.]+)", result.stdout)
    if result.returncode or not found:
        print(f"seed run failed (does {python} have torch?):\n{result.stderr[-1500:]}")
        return None
    return float(found.group(1))


def main(argv):
    del argv
    from minids_jax import config as config_lib

    config = config_lib.from_config_dict(_CONFIG.value)
    m = config.model
    print(f"model: d_model {m.d_model}, layers {m.n_layers} {m.attn_pattern}, heads {m.n_heads}, "
          f"seq {m.max_seq_len}, vocab {m.vocab_size}, experts {m.n_experts} top-{m.top_k} "
          f"({m.moe_dispatch}), batch {config.train.batch_size}, dtype {m.dtype}")
    tokens_per_s = {}
    for dispatch in _DISPATCHES.value or [m.moe_dispatch]:
        variant = dataclasses.replace(config, model=dataclasses.replace(m, moe_dispatch=dispatch))
        result = benchmark_jax(variant, _STEPS.value)
        print(f"minids_jax ({dispatch}): compile {result['compile_s']:.1f} s"
              f" | step {result['step_s'] * 1e3:.1f} ms"
              f" | {result['tokens_per_s']:,.0f} tokens/s on {result['devices']} device(s)"
              f" | {result['train_flops_per_token'] / 1e6:.1f} MFLOP/token"
              f" | peak {result['peak_flops'] / 1e9:.0f} GFLOP/s | MFU {result['mfu']:.1%}")
        tokens_per_s[dispatch] = result["tokens_per_s"]
    if _VS_SEED.value:
        seed_tokens_per_s = benchmark_seed(config, _STEPS.value, _VS_SEED.value, _SEED_PYTHON.value)
        if seed_tokens_per_s:
            ratios = ", ".join(f"{d} {t / seed_tokens_per_s:.2f}x" for d, t in tokens_per_s.items())
            print(f"seed (PyTorch): {seed_tokens_per_s:,.0f} tokens/s | minids_jax / seed: {ratios}")


if __name__ == "__main__":
    app.run(main)
