"""Where a train step's time goes, per HLO op and per line of minids_jax, from a trace.

    python benchmarks/step_profile.py --config configs/v3_tiny.py --steps 5 --top 25

Traces `--steps` compiled train steps (after two warm-ups) with `jax.profiler.trace` and its
Perfetto export, then sums each executed op's time (ops inside loop bodies included, the loops
themselves not) and prints the slowest ops with their shapes, and the same times grouped by
the innermost minids_jax source line that emitted each op (from the compiled HLO's stack
frames). Ops run concurrently on a multi-core CPU, so the sums exceed the step time; `busy`
is the time at least one op ran. This is how the layout copy fused into a dense SwiGLU's
backward was found (docs/performance.md).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minids_jax import cli  # noqa: E402  (imports no jax)
from timing import CompiledStepTimer, describe  # noqa: E402  (benchmarks/timing.py)


def define_flags() -> None:
    """Defined when run, not when imported (tests import `source_lines`)."""
    cli.define_config_flag("config", "configs/tiny.py")
    flags.DEFINE_integer("steps", 5, "Traced steps (after two warm-up steps).")
    flags.DEFINE_integer("top", 25, "Rows of each table.")


def source_lines(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> `file.py:line` of the innermost minids_jax frame behind it."""
    def table(name, next_name, pattern):
        section = hlo_text[hlo_text.index(f"\n{name}\n"):hlo_text.index(f"\n{next_name}\n")]
        return {int(m[0]): m[1:] for m in re.findall(pattern, section, re.M)}

    files = table("FileNames", "FunctionNames", r"^(\d+) \"(.*)\"$")
    locations = table("FileLocations", "StackFrames",
                      r"^(\d+) \{file_name_id=(\d+) function_name_id=\d+ line=(\d+)")
    frames = {int(m[0]): (int(m[1]), int(m[2])) for m in re.findall(
        r"^(\d+) \{file_location_id=(\d+) parent_frame_id=(\d+)\}",
        hlo_text[hlo_text.index("\nStackFrames\n"):], re.M)}

    def innermost(frame: int) -> str:
        seen = set()
        while frame in frames and frame not in seen:
            seen.add(frame)
            location, parent = frames[frame]
            file_id, line = locations[location]
            path = files[int(file_id)][0]
            if "/minids_jax/" in path:
                return f"{path.split('/minids_jax/')[-1]}:{line}"
            frame = parent
        return "(outside minids_jax)"

    return {name: innermost(int(frame)) for name, frame in re.findall(
        r"^\s*(?:ROOT )?%(\S+) = .*?stack_frame_id=(\d+)", hlo_text, re.M)}


def main(argv):
    del argv
    from minids_jax import config as config_lib
    from minids_jax import startup

    startup.use_huge_pages(cli.wants_huge_pages(flags.FLAGS["config"]))  # as train.py does
    config = config_lib.from_config_dict(flags.FLAGS.config)
    import jax

    from minids_jax.training import trainer

    print(describe(config))
    timer = CompiledStepTimer(trainer.Trainer(config))
    hlo_text = timer.compiled.as_text()
    shapes = {m[0]: m[1][:70] for m in re.findall(r"^\s*(?:ROOT )?%(\S+) = ([^\n]*)",
                                                    hlo_text, re.M)}
    lines = source_lines(hlo_text)
    steps = flags.FLAGS.steps
    untraced_ms = timer.time(steps) * 1e3
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
            traced_ms = timer.time(steps) * 1e3
        trace_file, = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
        with gzip.open(trace_file) as f:
            events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    ops = [e for e in events if e.get("ph") == "X" and e.get("name") in shapes
           and not e["name"].startswith(("while", "call", "conditional"))]
    by_op, by_line = collections.Counter(), collections.Counter()
    for event in ops:
        by_op[event["name"]] += event["dur"] / steps / 1e3
        by_line[lines.get(event["name"], "(outside minids_jax)")] += event["dur"] / steps / 1e3
    busy, end = 0.0, None
    for begin, finish in sorted((e["ts"], e["ts"] + e["dur"]) for e in ops):
        busy += max(0.0, finish - max(begin, end if end is not None else begin))
        end = finish if end is None else max(end, finish)
    print(f"step {untraced_ms:.1f} ms, {traced_ms:.1f} ms traced | ops {sum(by_op.values()):.1f} ms | busy "
          f"{busy / steps / 1e3:.1f} ms (per step)")
    print("\nslowest ops (ms per step):")
    for name, ms in by_op.most_common(flags.FLAGS.top):
        print(f"{ms:8.2f}  {name:32s} {lines.get(name, ''):24s} {shapes[name]}")
    print("\nby minids_jax line (ms per step):")
    for line, ms in by_line.most_common(flags.FLAGS.top):
        print(f"{ms:8.2f}  {line}")


if __name__ == "__main__":
    define_flags()
    cli.run(main)  # a user error ends in one line
