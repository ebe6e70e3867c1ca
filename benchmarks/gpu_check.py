"""The GPU check's measuring side (benchmarks/gpu_check.sh runs it; docs/gpu.md explains it).

One config per process, so that peak device memory is that config's alone:

    python benchmarks/gpu_check.py --config configs/mini.py --config.compute.dtype=bfloat16 \
        --steps 20 --row_out /tmp/rows/mini.json
    python benchmarks/gpu_check.py --rows /tmp/rows/mini.json,/tmp/rows/v3_mini.json --out x.json

The first compiles the config's train step, times it (compile time, median step time over
`--repeats` rounds of `--steps` steps after two warm-ups, tokens/s, MFU against the data-sheet
peak, peak device memory) and reads the step's HLO for the kernels it really runs; the second
prints the rows as a table and writes them as JSON.

Which kernels ran is read from the HLO text, on any platform (`hlo_kernels`):
  cuDNN attention  a custom call whose target names cuDNN's fused attention
                   (`__cudnn$fmhaSoftmax`, `__cudnn$fmhaSoftmaxBackward`, ...) in the compiled step.
  ragged_dot       `ragged-dot` instructions: how many the lowered program has (what the model
                   asked for), and how many the compiled one still has, inside a cuDNN fusion
                   (`__cudnn$fusion`) or left to XLA, or as a grouped-GEMM custom call. XLA may
                   instead expand a ragged dot into dense dots over zero-padded operands (no
                   grouped GEMM at all): those are counted as `dense`, and are not a yes.
Names and metadata (`ragged_dot_general.9 = ... dot(...)`, `op_name=".../ragged_dot_general"`)
are not instructions and are never counted.
"""

from __future__ import annotations

import json
import os
import re
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # timing.py, beside this file

# custom_call_target="..." of cuDNN's fused attention, forward and backward (XLA's
# cublas_cudnn.cc: "__cudnn$fmhaSoftmax", "__cudnn$fmhaScaleBiasSoftmaxBackward", ...; older
# XLA spelled them "__cudnn$fhma...").
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_ATTENTION = re.compile(r"cudnn.*f(mh|hm)a", re.IGNORECASE)
# A grouped GEMM behind a custom call: cuBLASLt's/hipBLASLt's, or one of ragged_dot's name.
_GROUPED_TARGET = re.compile(r"grouped_?matmul|ragged", re.IGNORECASE)
_TRITON_TARGETS = ("__gpu$xla.gpu.triton", "triton_kernel_call")  # Pallas kernels
# The opcode of an instruction is followed by its operands' "(": a name (`ragged-dot.3`), an
# operand reference or metadata (`op_name=".../ragged_dot_general"`) never is.
_RAGGED_OP = re.compile(r"(?<![\w.-])ragged-dot\(")
_CUDNN_FUSION = "__cudnn$fusion"
_CALLS = re.compile(r"\b(?:calls|to_apply|body|condition)=%?([\w.\-]+)")
_CALLS_MANY = re.compile(r"\b(?:calls|branch_computations)=\{([^}]*)\}")


def _computations(hlo: str) -> dict[str, list[str]]:
    """Computation name -> its instruction lines, from HLO text (one module)."""
    bodies: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in hlo.splitlines():
        stripped = line.strip()
        if current is None:
            if stripped.endswith("{") and not line[:1].isspace() and not stripped.startswith(
                    "HloModule"):
                words = stripped.split()
                name = words[1] if words[0] == "ENTRY" and len(words) > 1 else words[0]
                current = bodies.setdefault(name.lstrip("%").split("(")[0], [])
            continue
        if stripped == "}" and not line[:1].isspace():
            current = None
        else:
            current.append(line)
    if not bodies:  # a snippet of instructions without a computation around them
        bodies[""] = hlo.splitlines()
    return bodies


def _callees(line: str) -> list[str]:
    names = _CALLS.findall(line)
    for group in _CALLS_MANY.findall(line):
        names += [name.strip().lstrip("%") for name in group.split(",") if name.strip()]
    return names


def count_ragged_dots(hlo: str) -> int:
    """`ragged-dot` instructions in HLO text."""
    return len(_RAGGED_OP.findall(hlo))


def hlo_kernels(compiled_hlo: str, lowered_hlo: str | None = None) -> dict:
    """Which kernels a step runs, from its compiled HLO text (and its lowered, pre-optimization
    HLO, to tell what the model asked for from what XLA made of it). No device needed.

    Returns cudnn_attention (bool), attention_calls ({custom-call target: count}), ragged_dot
    (bool: a grouped GEMM is left in the compiled step), ragged_dot_lowered (ragged-dot
    instructions before optimization, None without `lowered_hlo`), ragged_dot_compiled
    ({'cuDNN' | 'XLA' | custom-call target: count}) and ragged_dot_dense (lowered ragged dots
    no longer there: expanded into dense dots)."""
    attention: dict[str, int] = {}
    grouped: dict[str, int] = {}
    bodies = _computations(compiled_hlo)
    cudnn_fused: set[str] = set()  # computations a cuDNN fusion runs
    for lines in bodies.values():
        for line in lines:
            target = _TARGET.search(line)
            if target and _ATTENTION.search(target.group(1)):
                attention[target.group(1)] = attention.get(target.group(1), 0) + 1
            elif target and (_GROUPED_TARGET.search(target.group(1)) or (
                    target.group(1) in _TRITON_TARGETS and "ragged" in line.lower())):
                grouped[target.group(1)] = grouped.get(target.group(1), 0) + 1
            if _CUDNN_FUSION in line:
                cudnn_fused.update(_callees(line))
    # A computation called from one that a cuDNN fusion runs belongs to that fusion too.
    frontier = list(cudnn_fused)
    while frontier:
        for line in bodies.get(frontier.pop(), []):
            for callee in _callees(line):
                if callee not in cudnn_fused:
                    cudnn_fused.add(callee)
                    frontier.append(callee)
    for name, lines in bodies.items():
        found = sum(len(_RAGGED_OP.findall(line)) for line in lines)
        if found:
            where = "cuDNN" if name in cudnn_fused else "XLA"
            grouped[where] = grouped.get(where, 0) + found
    lowered = None if lowered_hlo is None else count_ragged_dots(lowered_hlo)
    compiled = sum(grouped.values())
    return dict(cudnn_attention=bool(attention), attention_calls=attention,
                ragged_dot=compiled > 0, ragged_dot_lowered=lowered,
                ragged_dot_compiled=grouped,
                ragged_dot_dense=max(0, (lowered or 0) - compiled))


def kernel_summary(kernels: dict) -> tuple[str, str]:
    """('yes (4 calls)' | 'no', 'yes (cuDNN 6, dense 3)' | 'no (9 made dense)' | 'no') for the
    table's cuDNN-attention and ragged_dot columns."""
    calls = sum(kernels["attention_calls"].values())
    attention = f"yes ({calls} calls)" if calls else "no"
    parts = [f"{where} {count}" for where, count in sorted(kernels["ragged_dot_compiled"].items())]
    if kernels["ragged_dot_dense"]:
        parts.append(f"dense {kernels['ragged_dot_dense']}")
    if kernels["ragged_dot"]:
        ragged = f"yes ({', '.join(parts)})"
    elif kernels["ragged_dot_dense"]:
        ragged = f"no ({kernels['ragged_dot_dense']} made dense)"
    else:
        ragged = "no"
    return attention, ragged


def peak_memory_bytes(devices) -> int | None:
    """The largest `peak_bytes_in_use` over `devices` (None where a backend keeps no stats)."""
    peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use") for device in devices]
    peaks = [peak for peak in peaks if peak is not None]
    return max(peaks) if peaks else None


def measure(config, steps: int, repeats: int = 3, hlo_dir: str | None = None) -> dict:
    """Compiles and times `config`'s train step on this process's devices; the row of the
    table (see `COLUMNS`) plus the details behind it."""
    import jax
    from timing import CompiledStepTimer

    from minids_jax import kernels
    from minids_jax.training import flops, memory, trainer

    run = trainer.Trainer(config)
    config = run.config  # as the memory plan settled it (compute.remat='auto', ...)
    compute = kernels.resolve(config.compute, run.platform)  # what the model was built with
    timer = CompiledStepTimer(run)
    rounds = [timer.time(steps) for _ in range(repeats)]
    step_s = statistics.median(rounds)
    tokens_per_s = timer.tokens_per_s(step_s)
    devices = run.mesh.devices.flatten().tolist()
    peak, peak_source = flops.peak_flops_per_device(config.compute.dtype, config.train.peak_flops,
                                                    devices[0])
    flops_per_token = flops.train_flops_per_token(config.model, frozen_base=config.lora.rank > 0)
    compiled_hlo, lowered_hlo = timer.compiled.as_text(), timer.lowered.as_text("hlo")
    if hlo_dir:
        Path(hlo_dir).mkdir(parents=True, exist_ok=True)
        Path(hlo_dir, "lowered.hlo.txt").write_text(lowered_hlo)
        Path(hlo_dir, "compiled.hlo.txt").write_text(compiled_hlo)
    kernels = hlo_kernels(compiled_hlo, lowered_hlo)
    analysis = timer.compiled.memory_analysis()
    loss = timer.metrics.get("loss")
    return dict(
        platform=devices[0].platform, device=devices[0].device_kind, devices=len(devices),
        jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""), dtype=compute.dtype,
        attention_kernel=compute.attention_kernel, moe_dispatch=compute.moe_dispatch,
        batch_size=config.train.batch_size, seq_len=config.model.max_seq_len,
        steps=steps, repeats=repeats, compile_s=timer.compile_s, step_s=step_s,
        step_s_rounds=rounds, tokens_per_s=tokens_per_s, flops_per_token=flops_per_token,
        peak_flops_per_device=peak, peak_flops_source=peak_source,
        mfu=flops_per_token * tokens_per_s / (peak * len(devices)),
        peak_memory_bytes=peak_memory_bytes(devices),
        compiled_temp_bytes=getattr(analysis, "temp_size_in_bytes", None),
        loss=None if loss is None else float(loss), kernels=kernels,
        lora=(dict(rank=config.lora.rank, targets=list(config.lora.targets),
                   base_quant=config.lora.base_quant) if config.lora.rank else None),
        memory_plan=dict(bytes=memory.plan(config, len(devices), platform=run.platform).total,
                         remat=config.compute.remat, scan_layers=config.compute.scan_layers,
                         microbatches=config.train.grad_accum_steps))


# (heading, how a row shows it); a row that failed shows its error instead.
COLUMNS = (
    ("config", lambda r: r["config"]),
    ("compile s", lambda r: f"{r['compile_s']:.1f}"),
    ("step ms", lambda r: f"{r['step_s'] * 1e3:.1f}"),
    ("tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
    ("MFU", lambda r: f"{r['mfu']:.1%}"),
    ("peak mem GiB", lambda r: "n/a" if r["peak_memory_bytes"] is None
     else f"{r['peak_memory_bytes'] / 2 ** 30:.2f}"),
    ("plan GiB", lambda r: f"{r['memory_plan']['bytes'] / 2 ** 30:.2f}" if r.get("memory_plan")
     else "n/a"),
    ("cuDNN attention", lambda r: kernel_summary(r["kernels"])[0]),
    ("ragged_dot", lambda r: kernel_summary(r["kernels"])[1]),
)


def _flop_rate(flops_per_s: float) -> str:
    return (f"{flops_per_s / 1e12:.0f} TFLOP/s" if flops_per_s >= 1e12
            else f"{flops_per_s / 1e9:.0f} GFLOP/s")


def _setup(row: dict) -> str:
    """The LoRA and memory-plan part of a row's note ('' for a row without them)."""
    lora, plan = row.get("lora"), row.get("memory_plan")
    text = (f", LoRA rank {lora['rank']} on {','.join(lora['targets'])}, base "
            f"{lora['base_quant']}" if lora else "")
    if plan:
        text += (f", memory plan: remat {plan['remat']}, {plan['microbatches']} "
                 f"microbatch(es), scan {'on' if plan['scan_layers'] else 'off'}")
    return text


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table, then one line per row on where it ran."""
    cells = [[heading for heading, _ in COLUMNS]]
    notes = []
    for row in rows:
        if row.get("error"):
            cells.append([row["config"], f"failed: {row['error']}"])
            continue
        cells.append([show(row) for _, show in COLUMNS])
        notes.append(f"{row['config']}: {row['devices']} x {row['device']}, {row['dtype']}, "
                     f"batch {row['batch_size']} x {row['seq_len']}, attention "
                     f"{row['attention_kernel']}, MoE {row['moe_dispatch']}, median of "
                     f"{row['repeats']} x {row['steps']} steps, MFU against "
                     f"{_flop_rate(row['peak_flops_per_device'])} per device "
                     f"({row['peak_flops_source']}){_setup(row)}")
    widths = [max(len(line[i]) for line in cells if i == 0 or len(line) == len(COLUMNS))
              for i in range(len(COLUMNS))]
    lines = []
    for line in cells:
        if len(line) != len(COLUMNS):  # a failed row: its error takes the rest of the line
            lines.append(f"{line[0]:<{widths[0]}}  {line[1]}")
        else:
            lines.append("  ".join(cell.ljust(width) if i == 0 else cell.rjust(width)
                                   for i, (cell, width) in enumerate(zip(line, widths))))
    return "\n".join(lines + [""] + notes)


def read_rows(paths: list[str]) -> list[dict]:
    """The rows the measuring runs wrote; a missing or unreadable one becomes a failed row
    named after its file."""
    rows = []
    for path in paths:
        try:
            rows.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError):
            rows.append(dict(config=Path(path).stem,
                             error="no result (its run failed or timed out; see above)"))
    return rows


def report(paths: list[str], out: str | None = None) -> int:
    """Prints the table of the rows at `paths` and writes them to `out` as JSON; 1 if a row
    failed, else 0."""
    rows = read_rows(paths)
    print(format_table(rows), flush=True)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(rows, indent=2) + "\n")
        print(f"wrote {out}")
    return int(any(row.get("error") for row in rows))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Config file to measure.")
    flags.DEFINE_integer("steps", 20, "Timed steps per round (after two warm-up steps).",
                         lower_bound=1)
    flags.DEFINE_integer("repeats", 3, "Rounds of timing; the table shows the median.",
                         lower_bound=1)
    flags.DEFINE_string("row_out", None, "Write this config's row here as JSON.")
    flags.DEFINE_string("hlo_dir", None, "Also write the step's lowered and compiled HLO "
                        "text here.")
    flags.DEFINE_list("rows", None, "Instead of measuring: print these rows' table.")
    flags.DEFINE_string("out", None, "With --rows: also write the rows here as JSON.")


def main(argv):
    del argv
    from absl import flags as absl_flags

    flags = absl_flags.FLAGS
    if flags.rows:
        return report(flags.rows, flags.out)
    if flags.config is None:
        print("gpu_check.py: give --config FILE to measure, or --rows ROW,... to report",
              file=sys.stderr)
        return 1
    from minids_jax import config as config_lib
    from minids_jax import startup

    name = Path(flags["config"].config_filename.split(":")[0]).stem
    row = dict(config=name)
    try:
        from minids_jax import cli

        startup.use_huge_pages(cli.wants_huge_pages(flags["config"]))  # may run this again
        config = config_lib.from_config_dict(flags.config)
        gpus = startup.select_gpus(config.devices)  # before JAX starts a backend, as train.py
        from timing import describe

        print(f"{name}: {describe(config)}\n{name}: devices: {gpus.reason}", flush=True)
        row.update(measure(config, flags.steps, flags.repeats, flags.hlo_dir),
                   device_choice=gpus.reason)
    except Exception as error:  # one line for the table; the traceback above it
        if not isinstance(error, config_lib.ConfigError):
            import traceback

            traceback.print_exc()
        first_line = (str(error).strip().splitlines() or [""])[0]
        row["error"] = f"{type(error).__name__}: {first_line}"
    if flags.row_out:
        Path(flags.row_out).parent.mkdir(parents=True, exist_ok=True)
        Path(flags.row_out).write_text(json.dumps(row, indent=2) + "\n")
    if row.get("error"):
        print(f"{name}: failed: {row['error']}", file=sys.stderr)
        return 1
    attention, ragged = kernel_summary(row["kernels"])
    print(f"{name}: compile {row['compile_s']:.1f} s | step {row['step_s'] * 1e3:.1f} ms | "
          f"{row['tokens_per_s']:,.0f} tokens/s | MFU {row['mfu']:.1%} | peak memory "
          + ("n/a" if row["peak_memory_bytes"] is None
             else f"{row['peak_memory_bytes'] / 2 ** 30:.2f} GiB")
          + f" | cuDNN attention {attention} | ragged_dot {ragged}", flush=True)
    return 0


if __name__ == "__main__":
    from absl import app

    _define_flags()
    app.run(main)
