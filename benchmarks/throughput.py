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
of steps after two warm-ups, in `--repeats` rounds that alternate with minids_jax's. With
`--vs_hf` (a DeepSeek-V3-format model, e.g. configs/v3_tiny.py), so does transformers'
DeepseekV3ForCausalLM (benchmarks/hf_peer.py, run by `--hf_python`, a Python with torch and
transformers; OMP_WAIT_POLICY=PASSIVE keeps torch from spinning on a shared machine).
transformers' forward has no MTP module, so with model.mtp_depth > 0 minids_jax is also
timed at mtp_depth=0, and both are compared. Each `--xla_options` (a JSON object of XLA
compiler options; '{}' the defaults) is one more variant of every step above, compiled with
them and timed in the same alternating rounds: in one process, options are compared far
more steadily than across runs (docs/performance.md).

    python benchmarks/throughput.py --config configs/v3_tiny.py --vs_hf --hf_python PYTHON
    python benchmarks/throughput.py --config configs/v3_tiny.py --xla_options '{}' \
        --xla_options '{"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}'
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minids_jax import cli  # noqa: E402  (imports no jax)
# benchmarks/timing.py, beside this file
from timing import (  # noqa: E402
    CompiledStepTimer, compiler_options, describe, hf_config_file, original_environment,
    peer_environment)

_CONFIG = cli.define_config_flag("config", "configs/tiny.py")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per round (after two warm-up steps).",
                              lower_bound=1)
_REPEATS = flags.DEFINE_integer("repeats", 3, "Rounds of timing, alternating with the original.",
                                lower_bound=1)
_VS_ORIGINAL = flags.DEFINE_string("vs_original", None,
                                   "Path to the PyTorch original's script, to compare.")
_ORIGINAL_PYTHON = flags.DEFINE_string("original_python", sys.executable,
                                       "Python that has torch, for --vs_original.")
_VS_HF = flags.DEFINE_bool("vs_hf", False, "Also train transformers' DeepseekV3ForCausalLM "
                            "at the same sizes (benchmarks/hf_peer.py).")
_HF_PYTHON = flags.DEFINE_string("hf_python", sys.executable,
                                 "Python that has torch and transformers, for --vs_hf.")
_PEAK_SIZE = flags.DEFINE_integer("peak_matmul_size", 2048, "Square matmul size for the peak.")
_DISPATCHES = flags.DEFINE_list("dispatches", None,
                                "MoE dispatches to compare, e.g. dropless,capacity,dense "
                                "(default: the config's).")
_PEER_HUGE_PAGES = flags.DEFINE_bool(
    "peer_huge_pages", False, "Run the peers (transformers, the original) with the huge-page "
    "malloc tunable that train.py sets for itself (devices.host_huge_pages), not as their "
    "users run them.")
_XLA_OPTIONS = flags.DEFINE_multi_string(
    "xla_options", [], "XLA compiler options of one more variant, as a JSON object ('{}': "
    "the defaults); repeat the flag to compare several in the same rounds.")


def peer_tokens_per_s(name: str, argv: list[str], env: dict) -> float | None:
    """The `tokens_per_sec X` a peer's run prints (None, with its error, if it fails); its
    other lines that start with `hf ` are passed on once."""
    try:
        result = subprocess.run(argv, env=env, capture_output=True, text=True)
    except OSError as error:
        print(f"{name} run failed: cannot run {argv[0]} ({error})")
        return None
    found = re.search(r"tokens_per_sec ([\d.]+)", result.stdout)
    if result.returncode or not found:
        lines = result.stderr.strip().splitlines()
        if lines and lines[-1].startswith("hf_peer: "):  # its one-line error: no torch, ...
            print(f"{name} run failed: {lines[-1][len('hf_peer: '):]}")
        else:
            print(f"{name} run failed (does {argv[0]} have torch?):\n{result.stderr[-1500:]}")
        return None
    for line in result.stdout.splitlines():
        if line.startswith("hf parameters") and name not in _REPORTED:
            _REPORTED.add(name)
            print(f"{name}: {line[len('hf '):]}", flush=True)
    return float(found.group(1))


_REPORTED: set[str] = set()


def original_argv(config, steps: int):
    """The original's command and environment at the config's sizes: `steps` timed steps
    after two warm-ups."""
    env = original_environment(config, _PEER_HUGE_PAGES.value, MINIDS_TOTAL_STEP=str(steps + 2),
                               MINIDS_WARMUP="1")
    return [_ORIGINAL_PYTHON.value, _VS_ORIGINAL.value], env


def hf_argv(config, steps: int, config_json: str):
    """benchmarks/hf_peer.py's command and environment: the config's batch and optimizer."""
    o = config.optim
    argv = [_HF_PYTHON.value, str(Path(__file__).with_name("hf_peer.py")), config_json,
            "--batch", str(config.train.batch_size), "--steps", str(steps), "--lr", str(o.lr),
            "--weight_decay", str(o.weight_decay), "--betas", str(o.b1), str(o.b2),
            "--eps", str(o.eps), "--clip_norm", str(o.clip_norm)]
    # Idle OpenMP threads sleep instead of spinning, which on a shared machine steals cores.
    return argv, peer_environment(_PEER_HUGE_PAGES.value, OMP_WAIT_POLICY="PASSIVE")


def hf_peer(config, steps: int):
    """(argv, env) of the transformers peer, or None (with the reason printed) if the model
    has no DeepSeek-V3 form."""
    from minids_jax.inspect import sizes

    config_json = hf_config_file(config)
    if config_json is None:
        return None
    counted = sizes(config, 1)
    print(f"minids_jax: parameters {counted['parameters']} in the main model (+ "
          f"{counted['mtp_parameters']} in {config.model.mtp_depth} MTP module(s); "
          f"transformers' forward has no MTP module, so it trains none)")
    return hf_argv(config, steps, config_json)


def main(argv):
    del argv
    from minids_jax import config as config_lib
    from minids_jax import startup

    startup.use_huge_pages(cli.wants_huge_pages(_CONFIG))  # as train.py does, before all else
    config = config_lib.from_config_dict(_CONFIG.value)
    import jax

    from minids_jax import kernels
    from minids_jax.training import flops, trainer

    m, compute = config.model, config.compute
    try:  # each variant's options, parsed before anything is built
        option_sets = {text: compiler_options(text) for text in _XLA_OPTIONS.value}
    except ValueError as error:
        raise SystemExit(f"error: --xla_options {error}") from None
    print(describe(config))
    # Against transformers, which trains no MTP module, also time the run without one.
    mtp_depths = [m.mtp_depth] + ([0] if _VS_HF.value and m.mtp_depth else [])
    timers, labels = {}, {}
    for dispatch in _DISPATCHES.value or [compute.moe_dispatch]:
        for mtp_depth in mtp_depths:
            for options in _XLA_OPTIONS.value or [None]:
                variant = dataclasses.replace(
                    config, compute=dataclasses.replace(compute, moe_dispatch=dispatch),
                    model=dataclasses.replace(m, mtp_depth=mtp_depth))
                try:
                    timer = CompiledStepTimer(trainer.Trainer(variant),
                                              compiler_options=option_sets.get(options))
                except ValueError as error:  # XLA refused the options
                    raise SystemExit(f"error: --xla_options: {error}") from None
                # The dispatch each name runs on this platform (`dropless`: its exact one).
                built = kernels.resolve(variant.compute, timer.run.platform).moe_dispatch
                label = dispatch if built == dispatch else f"{dispatch}: {built}"
                if mtp_depth != m.mtp_depth:
                    label += f", mtp_depth={mtp_depth}"
                if options:
                    label += f", xla {options}"
                timers[label], labels[label] = timer, label
    peak = flops.measure_matmul_flops(compute.dtype, _PEAK_SIZE.value) * jax.device_count()
    peers = {}
    if _VS_ORIGINAL.value:
        peers["original (PyTorch)"] = original_argv(config, _STEPS.value)
    if _VS_HF.value:
        hf = hf_peer(config, _STEPS.value)
        if hf is not None:
            peers["transformers"] = hf
    # Rounds alternate minids_jax and the peers, so that a slow spell of a shared machine
    # hits both; medians over the rounds, and the median of the per-round ratios.
    step_s = {label: [] for label in timers}
    peer_rounds = {name: [] for name in peers}
    ratios = {(name, label): [] for name in peers for label in timers}
    for _ in range(_REPEATS.value):
        for label, timer in timers.items():
            step_s[label].append(timer.time(_STEPS.value))
        for name, (peer_command, env) in peers.items():
            tokens_per_s = peer_tokens_per_s(name, peer_command, env)
            if tokens_per_s is None:
                return
            peer_rounds[name].append(tokens_per_s)
            for label, timer in timers.items():
                ratios[name, label].append(timer.tokens_per_s(step_s[label][-1]) /
                                           tokens_per_s)
    for label, timer in timers.items():
        step = float(np.median(step_s[label]))
        tokens_per_s = timer.tokens_per_s(step)
        flops_per_token = flops.train_flops_per_token(
            timer.run.config.model, frozen_base=timer.run.config.lora.rank > 0)
        print(f"minids_jax ({labels[label]}): compile {timer.compile_s:.1f} s"
              f" | step {step * 1e3:.1f} ms (median of {len(step_s[label])} x {_STEPS.value})"
              f" | {tokens_per_s:,.0f} tokens/s on {jax.device_count()} device(s)"
              f" | {flops_per_token / 1e6:.1f} MFLOP/token"
              f" | peak {peak / 1e9:.0f} GFLOP/s | MFU {flops_per_token * tokens_per_s / peak:.1%}")
    for name, rounds in peer_rounds.items():
        print(f"{name}: {np.median(rounds):,.0f} tokens/s "
              f"(rounds: {', '.join(f'{t:,.0f}' for t in rounds)})")
        for label in timers:
            r = ratios[name, label]
            print(f"minids_jax ({labels[label]}) / {name}: {np.median(r):.2f}x "
                  f"(rounds: {', '.join(f'{x:.2f}' for x in r)})")


if __name__ == "__main__":
    cli.run(main)  # a user error ends in one line
