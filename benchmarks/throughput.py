"""Training throughput: compile time, step time, tokens/s and MFU, optionally against the seed.

    python benchmarks/throughput.py --config configs/tiny.py --steps 10
    python benchmarks/throughput.py --config configs/mini.py --config.model.d_model=256 \
        --config.model.vocab_size=8192 --config.model.max_seq_len=256 \
        --config.model.n_layers=4 --config.model.n_heads=8 --config.model.latent_k=16 \
        --vs_seed ../shared/seed/mini_ds_torch.py --seed_python /path/to/python-with-torch

MFU = analytic training FLOPs per token (minids_jax/flops.py: active experts only) x tokens/s,
divided by a peak measured here: the best of several square matmuls in the compute dtype
(`flops.measure_matmul_flops`).
The seed runs as a subprocess at the same sizes (its batch is per process; here there is one
process, so the same global batch), timed over the same number of steps after two warm-ups,
in `--repeats` rounds that alternate with minids_jax's.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from timing import StepTimer, seed_environment  # noqa: E402  (benchmarks/timing.py, beside this file)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round (after two warm-up steps).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Rounds of timing, alternating with the seed.")
_VS_SEED = flags.DEFINE_string("vs_seed", None, "Path to the PyTorch seed script to compare.")
_SEED_PYTHON = flags.DEFINE_string("seed_python", sys.executable, "Python that has torch.")
_PEAK_SIZE = flags.DEFINE_integer("peak_matmul_size", 2048, "Square matmul size for the peak.")
_DISPATCHES = flags.DEFINE_list("dispatches", None,
                                "MoE dispatches to compare, e.g. dropless,capacity,dense "
                                "(default: the config's).")


def benchmark_seed(config, steps: int, script: str, python: str) -> float | None:
    env = seed_environment(config, MINIDS_TOTAL_STEP=str(steps + 2), MINIDS_WARMUP="1")
    result = subprocess.run([python, script], env=env, capture_output=True, text=True)
    found = re.search(r"tokens_per_sec ([\d.]+)", result.stdout)
    if result.returncode or not found:
        print(f"seed run failed (does {python} have torch?):\n{result.stderr[-1500:]}")
        return None
    return float(found.group(1))


def main(argv):
    del argv
    from minids_jax import config as config_lib
    from minids_jax import devices

    config = config_lib.from_config_dict(_CONFIG.value)
    devices.reuse_host_memory(config.devices)  # as train.py does, before the backend starts
    import jax

    from minids_jax import flops, trainer

    m = config.model
    print(f"model: d_model {m.d_model}, layers {m.n_layers} {m.attn_pattern}, heads {m.n_heads}, "
          f"seq {m.max_seq_len}, vocab {m.vocab_size}, experts {m.n_experts} top-{m.top_k} "
          f"({m.moe_dispatch}), batch {config.train.batch_size}, dtype {m.dtype}")
    timers = {}
    for dispatch in _DISPATCHES.value or [m.moe_dispatch]:
        variant = dataclasses.replace(config, model=dataclasses.replace(m, moe_dispatch=dispatch))
        timers[dispatch] = StepTimer(trainer.Trainer(variant))
    peak = flops.measure_matmul_flops(m.dtype, _PEAK_SIZE.value) * jax.device_count()
    flops_per_token = flops.train_flops_per_token(m)
    # Rounds alternate minids_jax and the seed, so that a slow spell of a shared machine
    # hits both; medians over the rounds, and the median of the per-round ratios.
    step_s = {dispatch: [] for dispatch in timers}
    seed_tokens_per_s, ratios = [], {dispatch: [] for dispatch in timers}
    for _ in range(_REPEATS.value):
        for dispatch, timer in timers.items():
            step_s[dispatch].append(timer.time(_STEPS.value))
        if _VS_SEED.value:
            seed = benchmark_seed(config, _STEPS.value, _VS_SEED.value, _SEED_PYTHON.value)
            if seed is None:
                return
            seed_tokens_per_s.append(seed)
            for dispatch, timer in timers.items():
                ratios[dispatch].append(timer.tokens_per_s(step_s[dispatch][-1]) / seed)
    for dispatch, timer in timers.items():
        step = float(np.median(step_s[dispatch]))
        tokens_per_s = timer.tokens_per_s(step)
        print(f"minids_jax ({dispatch}): compile {timer.compile_s:.1f} s"
              f" | step {step * 1e3:.1f} ms (median of {len(step_s[dispatch])} x {_STEPS.value})"
              f" | {tokens_per_s:,.0f} tokens/s on {jax.device_count()} device(s)"
              f" | {flops_per_token / 1e6:.1f} MFLOP/token"
              f" | peak {peak / 1e9:.0f} GFLOP/s | MFU {flops_per_token * tokens_per_s / peak:.1%}")
    if seed_tokens_per_s:
        rounds = ", ".join(f"{t:,.0f}" for t in seed_tokens_per_s)
        print(f"seed (PyTorch): {np.median(seed_tokens_per_s):,.0f} tokens/s (rounds: {rounds})")
        for dispatch, r in ratios.items():
            print(f"minids_jax ({dispatch}) / seed: {np.median(r):.2f}x "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in r)})")


if __name__ == "__main__":
    app.run(main)
