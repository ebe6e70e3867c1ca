"""Training at scale: compile time against depth, memory per remat policy, accumulation.

    python benchmarks/scale.py --what depth --config configs/tiny.py --depths 2,8,32
    python benchmarks/scale.py --what remat --config configs/mini.py --steps 2
    python benchmarks/scale.py --what accum --config configs/v3_tiny.py --accum 1,2,4
    python benchmarks/scale.py --what startup --config configs/v3_tiny.py --depths 4,61
    python benchmarks/scale.py --what startup --config configs/v3_tiny.py --compile_cache warm

depth: the train step's compile time (tracing, lowering and XLA) at each depth, with
compute.scan_layers on and off. remat: for each compute.remat policy, XLA's memory analysis of
the compiled step (temporaries: the activations kept for the backward pass, and the stacked
weights of scanned layers) and the step time. accum: the same global batch in 1, 2, 4
microbatches: temporaries and step time. Every figure comes from one process, side by side.
startup: whole-process start of `train.py` (three steps, each logged) to the start of its
first step, at each depth, in `--repeats` rounds that alternate the depths; the last line is
the deepest against the shallowest, the median of the rounds. The first step's start is its
log line less its own work, taken as the third step's time (the interval of the last two
lines; the second can still be slower than later ones): what a deeper model's step computes
is training, not start-up. The first step's line and the process's end are printed beside
it. `--compile_cache cold` (the default) compiles everything, as a first run does; `warm`
keeps compiled programs in a temporary devices.compile_cache that one unmeasured run of each
depth fills first, as a rerun or a resumed run finds it.
"""

from __future__ import annotations

import dataclasses
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from absl import flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minids_jax import cli  # noqa: E402  (imports no jax)
from timing import CompiledStepTimer, describe  # noqa: E402  (benchmarks/timing.py)

_CONFIG = cli.define_config_flag("config", "configs/tiny.py")
_WHAT = flags.DEFINE_enum("what", "depth", ["depth", "remat", "accum", "startup"],
                          "What to measure.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "startup: rounds, each running every depth.")
_DEPTHS = flags.DEFINE_list("depths", ["2", "8", "32"], "depth: layer counts.")
_ACCUM = flags.DEFINE_list("accum", ["1", "2", "4"], "accum: microbatches per step.")
_COMPILE_CACHE = flags.DEFINE_string("compile_cache", "cold",
                                     "startup: compile everything (cold), or load what an "
                                     "earlier run of the same depth compiled (warm).")
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps (after two warm-up steps); 0: compile "
                              "and memory analysis only.")


def _measure(config, steps: int) -> dict:
    from minids_jax.training import trainer

    with trainer.Trainer(config) as run:
        timer = CompiledStepTimer(run, warmup=2 if steps else 0)
        memory = timer.compiled.memory_analysis()
        step_s = timer.time(steps) if steps else float("nan")
    return {"compile_s": timer.compile_s, "step_s": step_s,
            "temp_mb": memory.temp_size_in_bytes / 2**20 if memory else float("nan"),
            "args_mb": memory.argument_size_in_bytes / 2**20 if memory else float("nan")}


def _startup(depths: list[int], repeats: int, warm: bool) -> None:
    root = Path(__file__).resolve().parents[1]
    overrides = [arg for arg in sys.argv[1:] if arg.startswith("--config.")]
    config_file = config_flags.get_config_filename(flags.FLAGS["config"])
    with tempfile.TemporaryDirectory() as cache:
        def first_step(depth: int) -> tuple[float, float, float]:
            command = [sys.executable, "train.py", "--config", config_file, *overrides,
                       "--config.optim.total_steps=3", "--config.train.log_every=1",
                       f"--config.model.n_layers={depth}",
                       f"--config.devices.compile_cache={cache if warm else 'off'}"]
            start, logged, lines = time.perf_counter(), {}, []
            with subprocess.Popen(command, cwd=root, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True) as process:
                for line in process.stdout:
                    lines.append(line)
                    for step in (1, 2, 3):
                        if step not in logged and line.startswith(f"step {step}/3"):
                            logged[step] = time.perf_counter() - start
            if process.returncode or len(logged) < 3:
                raise SystemExit(f"{' '.join(command)} failed:\n{''.join(lines[-20:])}")
            return logged[1] - (logged[3] - logged[2]), logged[1], time.perf_counter() - start

        if warm:
            for depth in depths:  # fills the cache
                first_step(depth)
        print(f"{'layers':>6} {'start s':>8} {'first step s':>13} {'end s':>7}  "
              f"({'warm' if warm else 'cold'})")
        starts: dict[int, list[float]] = {depth: [] for depth in depths}
        for _ in range(repeats):
            for depth in depths:
                begun, first, end = first_step(depth)
                starts[depth].append(begun)
                print(f"{depth:>6} {begun:>8.1f} {first:>13.1f} {end:>7.1f}", flush=True)
    shallow, deep = depths[0], depths[-1]
    ratios = [d / s for s, d in zip(starts[shallow], starts[deep])]
    print(f"start-up to the first step, {deep} against {shallow} layers: "
          f"{statistics.median(ratios):.2f}x (rounds: {', '.join(f'{r:.2f}' for r in ratios)})")


def _with(config, group: str, **fields):
    return dataclasses.replace(config, **{group: dataclasses.replace(getattr(config, group),
                                                                      **fields)})


def main(argv):
    del argv
    from minids_jax import config as config_lib

    if _WHAT.value == "startup":
        if not all(depth.isdigit() and int(depth) > 0 for depth in _DEPTHS.value) \
                or _REPEATS.value < 1:
            raise SystemExit(f"error: --depths takes layer counts (e.g. --depths 4,61), got "
                             f"{','.join(_DEPTHS.value)}; --repeats at least 1")
        if _COMPILE_CACHE.value not in ("cold", "warm"):
            raise SystemExit(f"error: --compile_cache takes cold or warm, got "
                             f"{_COMPILE_CACHE.value!r}")
        return _startup([int(depth) for depth in _DEPTHS.value], _REPEATS.value,
                        warm=_COMPILE_CACHE.value == "warm")
    base = config_lib.from_config_dict(_CONFIG.value)
    base = _with(base, "data", source="random", path="")
    print(describe(base))
    if _WHAT.value == "depth":
        print(f"{'layers':>6} {'scan':>5} {'compile s':>10}")
        for depth in map(int, _DEPTHS.value):
            config = _with(base, "model", n_layers=depth,
                           first_k_dense=min(base.model.first_k_dense, depth - 1))
            for scan in (True, False):
                figures = _measure(_with(config, "compute", scan_layers=scan), steps=0)
                print(f"{depth:>6} {str(scan):>5} {figures['compile_s']:>10.1f}", flush=True)
        return
    if _WHAT.value == "remat":
        variants = [("compute.remat", policy, _with(base, "compute", remat=policy))
                    for policy in ("none", "full", "save_dots")]
    else:
        variants = [("train.grad_accum_steps", a, _with(base, "train", grad_accum_steps=a))
                    for a in map(int, _ACCUM.value)]
    print(f"{variants[0][0]:>22} {'temp MiB':>9} {'args MiB':>9} {'step s':>8} {'compile s':>10}")
    for _, value, config in variants:
        f = _measure(config, _STEPS.value)
        print(f"{value!s:>22} {f['temp_mb']:>9.1f} {f['args_mb']:>9.1f} {f['step_s']:>8.3f} "
              f"{f['compile_s']:>10.1f}", flush=True)


if __name__ == "__main__":
    cli.run(main)  # a user error ends in one line
