"""Peak memory and step time of a LoRA fine-tune on a full-precision, int8 and NF4 base.

    python benchmarks/qlora.py                       # a ~1B llama (deepseek-llm-7b, narrowed)
    python benchmarks/qlora.py --config configs/deepseek_llm_7b.py --config.model.n_layers=2

A random float32 model of the config is saved first, as an import would save it. Then each
base runs in a process of its own, so that its peak resident memory (`ru_maxrss`) is its own:
a fine-tune from that checkpoint (checkpoint.init_from) with adapters of rank 16 on every
linear layer, its base restored at full precision or quantized as it is read; compile the
train step and take three steps on random tokens. Printed per base: the memory plan's total
(training/memory.py), XLA's memory analysis of the compiled step (arguments + outputs -
aliased + temporaries), the process's peak RSS, and the mean step time.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from absl import flags

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minids_jax import cli  # noqa: E402

_CONFIG = cli.define_config_flag(default=str(REPO / "configs" / "deepseek_llm_7b.py"))
_STEPS = flags.DEFINE_integer("steps", 3, "Timed steps per base.")

# deepseek-llm-7b's shape at a quarter of its width and half its depth: about 1B parameters.
ONE_B = dict(d_model=2048, n_heads=16, n_kv_heads=16, dense_hidden_dim=5504, n_layers=15,
             first_k_dense=-1,
             max_seq_len=256)

SAVE_BASE = """
import sys
sys.path.insert(0, sys.argv[3])
import jax
from flax import nnx
from minids_jax import checkpoint, sharding
from minids_jax import config as config_lib
from minids_jax.model import build
config = config_lib.from_json(open(sys.argv[1]).read())
mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
_, (state,), _ = sharding.create_sharded(lambda: (build(config, "cpu", nnx.Rngs(0)),), mesh,
                                         config.mesh.axis_rules)
checkpoint.save_model(sys.argv[2], config, nnx.to_pure_dict(state))
"""

WORKER = """
import json, resource, sys
sys.path.insert(0, sys.argv[3])
from benchmarks.timing import CompiledStepTimer
from minids_jax import config as config_lib
from minids_jax.model import count_params
from minids_jax.training import memory
from minids_jax.training.trainer import Trainer
config = config_lib.from_json(open(sys.argv[1]).read())
run = Trainer(config)
timer = CompiledStepTimer(run)
analysis = timer.compiled.memory_analysis()
xla = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
       - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
step_s = timer.time(int(sys.argv[2]))
print(json.dumps(dict(parameters=count_params(run.model()), xla=xla,
                      plan=memory.plan(config, 1, platform="cpu").total, step_s=step_s,
                      rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)))
"""


def main(argv):
    del argv
    import dataclasses
    import tempfile

    config = cli.config_from_flag(_CONFIG)
    if _CONFIG.value == _CONFIG.default:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, **ONE_B))
    config = dataclasses.replace(
        config, compute=dataclasses.replace(config.compute, dtype="float32", remat="full"),
        model=dataclasses.replace(config.model, param_dtype="float32"),
        train=dataclasses.replace(config.train, batch_size=1, grad_accum_steps=1, log_every=1),
        data=dataclasses.replace(config.data, source="random"),
        lora=dataclasses.replace(config.lora, rank=16, alpha=32.0, targets=("all-linear",)))
    scratch = tempfile.TemporaryDirectory()
    base = Path(scratch.name) / "base"
    plain = dataclasses.replace(config, lora=dataclasses.replace(config.lora, rank=0))
    run(SAVE_BASE, plain, str(base), "saving the base")
    print(f"{'base':<6}{'params':>8}{'plan GB':>10}{'XLA GB':>9}{'peak RSS GB':>13}"
          f"{'step s':>9}")
    for kind in ("none", "int8", "nf4"):
        tried = dataclasses.replace(
            config, lora=dataclasses.replace(config.lora, base_quant=kind),
            checkpoint=dataclasses.replace(config.checkpoint, init_from=str(base)))
        got = json.loads(run(WORKER, tried, str(_STEPS.value), f"the {kind} run"))
        print(f"{kind:<6}{got['parameters'] / 1e9:>7.2f}B{got['plan'] / 1e9:>10.2f}"
              f"{got['xla'] / 1e9:>9.2f}{got['rss'] / 1e9:>13.2f}{got['step_s']:>9.2f}")


def run(script: str, config, argument: str, what: str) -> str:
    """Runs `script` in a new process with `config` (a file) and `argument`; its last line."""
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        file.write(config.to_json())
        file.flush()
        done = subprocess.run([sys.executable, "-c", script, file.name, argument, str(REPO)],
                              capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"{what} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


if __name__ == "__main__":
    cli.run(main)
