"""Training throughput: compile time, step time, tokens/s and MFU, optionally vs the original.

    python benchmarks/throughput.py --config configs/tiny.py --steps 10
    python benchmarks/throughput.py --config configs/mini.py --config.model.d_model=256 \
        --config.model.vocab_size=8192 --config.model.max_seq_len=256 \
        --config.model.n_layers=4 --config.model.n_heads=8 --config.model.latent_k=16 \
        --vs_original PATH/TO/mini_ds_torch.py --original_python /path/to/python-with-torch

MFU = analytic training FLOPs per token (minids_jax/flops.py: active experts only) x tokens/s,
divided by a peak measured here: the best of several square matmuls in the compute dtype
(`flops.measure_matmul_flops`). `--dispatches` times one train step per MoE dispatch.
With `--vs_original`, the PyTorch original runs as a subprocess at the same sizes (its batch is
per process; here there is one process, so the same global batch), timed over the same number
of steps after two warm-ups, in `--repeats` rounds that alternate with minids_jax's.
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
# benchmarks/timing.py, beside this file
from timing import CompiledStepTimer, original_environment  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round (after two warm-up steps).")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Rounds of timing, alternating with the original.")
_VS_ORIGINAL = flags.DEFINE_string("vs_original", None,
                                   "Path to the PyTorch original's script, to compare.")
_ORIGINAL_PYTHON = flags.DEFINE_string("original_python", sys.executable,
                                       "Python that has torch, for --vs_original.")
_PEAK_SIZE = flags.DEFINE_integer("peak_matmul_size", 2048, "Square matmul size for the peak.")
_DISPATCHES = flags.DEFINE_list("dispatches", None,
                                "MoE dispatches to compare, e.g. dropless,capacity,dense "
                                "(default: the config's).")


def benchmark_original(config, steps: int, script: str, python: str) -> float | None:
    """The original's tokens/s at the config's sizes, timed over `steps` steps after two
    warm-up steps."""
    env = original_environment(config, MINIDS_TOTAL_STEP=str(steps + 2), MINIDS_WARMUP="1")
    result = subprocess.run([python, script], env=env, capture_output=True, text=True)
    found = re.search(r"tokens_per_sec ([\d.]+)", result.stdout)
    if result.returncode or not found:
        print(f"original run failed (does {python} have torch?):\n{result.stderr[-1500:]}")
        return None
    return float(found.group(1))


def main(argv):
    del argv
    from minids_jax import config as config_lib
    from minids_jax import startup

    config = config_lib.from_config_dict(_CONFIG.value)
    startup.reuse_host_memory(config.devices)  # as train.py does, before the backend starts
    import jax

    from minids_jax import flops, trainer

    m, compute = config.model, config.compute
    print(f"model: d_model {m.d_model}, layers {m.n_layers} {m.attn_pattern}, heads {m.n_heads}, "
          f"seq {m.max_seq_len}, vocab {m.vocab_size}, experts {m.n_experts} top-{m.top_k} "
          f"({compute.moe_dispatch}), batch {config.train.batch_size}, dtype {compute.dtype}")
    timers = {}
    for dispatch in _DISPATCHES.value or [compute.moe_dispatch]:
        variant = dataclasses.replace(
            config, compute=dataclasses.replace(compute, moe_dispatch=dispatch))
        timers[dispatch] = CompiledStepTimer(trainer.Trainer(variant))
    # The dispatch each name runs on this platform (`dropless`: its exact one).
    labels = {dispatch: dispatch if timer.run.compute.moe_dispatch == dispatch
              else f"{dispatch}: {timer.run.compute.moe_dispatch}"
              for dispatch, timer in timers.items()}
    peak = flops.measure_matmul_flops(compute.dtype, _PEAK_SIZE.value) * jax.device_count()
    flops_per_token = flops.train_flops_per_token(m)
    # Rounds alternate minids_jax and the original, so that a slow spell of a shared machine
    # hits both; medians over the rounds, and the median of the per-round ratios.
    step_s = {dispatch: [] for dispatch in timers}
    original_tokens_per_s, ratios = [], {dispatch: [] for dispatch in timers}
    for _ in range(_REPEATS.value):
        for dispatch, timer in timers.items():
            step_s[dispatch].append(timer.time(_STEPS.value))
        if _VS_ORIGINAL.value:
            original = benchmark_original(config, _STEPS.value, _VS_ORIGINAL.value,
                                          _ORIGINAL_PYTHON.value)
            if original is None:
                return
            original_tokens_per_s.append(original)
            for dispatch, timer in timers.items():
                ratios[dispatch].append(timer.tokens_per_s(step_s[dispatch][-1]) / original)
    for dispatch, timer in timers.items():
        step = float(np.median(step_s[dispatch]))
        tokens_per_s = timer.tokens_per_s(step)
        print(f"minids_jax ({labels[dispatch]}): compile {timer.compile_s:.1f} s"
              f" | step {step * 1e3:.1f} ms (median of {len(step_s[dispatch])} x {_STEPS.value})"
              f" | {tokens_per_s:,.0f} tokens/s on {jax.device_count()} device(s)"
              f" | {flops_per_token / 1e6:.1f} MFLOP/token"
              f" | peak {peak / 1e9:.0f} GFLOP/s | MFU {flops_per_token * tokens_per_s / peak:.1%}")
    if original_tokens_per_s:
        rounds = ", ".join(f"{t:,.0f}" for t in original_tokens_per_s)
        print(f"original (PyTorch): {np.median(original_tokens_per_s):,.0f} tokens/s "
              f"(rounds: {rounds})")
        for dispatch, r in ratios.items():
            print(f"minids_jax ({labels[dispatch]}) / original: {np.median(r):.2f}x "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in r)})")


if __name__ == "__main__":
    app.run(main)
