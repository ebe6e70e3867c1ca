"""Tiny configs shared by the tests (and by mesh_worker.py, which must not import jax first).

`tiny_config(**groups)` is the one small run every trainer test starts from: one MHLA layer (its
three attentions share MHA's projection code) holds every kind of parameter (latents,
attention, router, experts, norms) at the smallest compile time. Tests override what they
need, group by group: `tiny_config(model=dict(n_layers=2), optim=dict(total_steps=3))`.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import subprocess
import sys
import time

from minids_jax import config as config_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# Less LLVM effort in XLA's CPU backend: about half the compile time of the tests' tiny
# programs. Results move only by float rounding (summation order). Set by conftest.py before
# JAX starts, and passed on to every subprocess.
FAST_COMPILE_XLA_FLAGS = ("--xla_backend_optimization_level=0 "
                          "--xla_llvm_disable_expensive_passes=true")

TINY_STEPS = 6  # one compile of the train step serves every run of this length

# MLA's dims at test size (used by "mla" layers only): latent 16, head dims 8 + 4, values 6.
MLA_DIMS = dict(kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)

TINY = dict(
    model=dict(vocab_size=64, max_seq_len=16, d_model=32, n_layers=1, n_heads=2, latent_k=4,
               mlp_mult=2, n_experts=2, attn_pattern=("mhla",), **MLA_DIMS),
    optim=dict(warmup_steps=1, total_steps=TINY_STEPS),
    train=dict(batch_size=4, log_every=1, eval_batches=1),
    data=dict(cache_dir=""),
    checkpoint=dict(every=3),
)


def tiny_config(**groups) -> config_lib.Config:
    merged = {name: dict(values) for name, values in TINY.items()}
    for group, values in groups.items():
        merged.setdefault(group, {}).update(values)
    return config_lib.from_config_dict(merged)


def small_model_config(**overrides) -> config_lib.ModelConfig:
    """Layer tests: two layers (MHA, MHLA), four experts."""
    fields = dict(vocab_size=64, max_seq_len=16, d_model=32, n_layers=2, n_heads=4, latent_k=4,
                  mlp_mult=2, n_experts=4, top_k=1, attn_pattern=("mha", "mhla"), **MLA_DIMS)
    return config_lib.ModelConfig(**{**fields, **overrides})


def compute_config(platform: str = "cpu", **overrides) -> config_lib.ComputeConfig:
    """A compute config with concrete kernels, as a trainer resolves it on `platform`."""
    from minids_jax import kernels

    return kernels.resolve(config_lib.ComputeConfig(**overrides), platform)


def subprocess_env(compile_cache, devices=1):
    """The environment of a subprocess run: CPU, this repository importable, the session's
    compilation cache, `devices` simulated CPU devices."""
    import jax

    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1",
               JAX_COMPILATION_CACHE_DIR=compile_cache,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
    # Same numerics as this process (conftest.py may raise the matmul precision), so results
    # compare bit for bit and compiled programs are shared through the cache.
    precision = jax.config.jax_default_matmul_precision
    if precision is not None:
        env["JAX_DEFAULT_MATMUL_PRECISION"] = str(precision)
    env["XLA_FLAGS"] = FAST_COMPILE_XLA_FLAGS
    if devices > 1:
        env["XLA_FLAGS"] += f" --xla_force_host_platform_device_count={devices}"
    return env


CONFIG_FROM_JSON = """
import json, ml_collections
def get_config():
    return ml_collections.ConfigDict(json.loads(open({path!r}).read()))
"""

# train.py with each step 5 seconds longer: signals then land mid-step, at a known point.
SLOW_TRAIN = """
import runpy, sys, time
from minids_jax.training import steps
make_train_step = steps.make_train_step
def slow(*args, **kwargs):
    step = make_train_step(*args, **kwargs)
    return lambda state, batch: (time.sleep(5), step(state, batch))[1]
steps.make_train_step = slow
sys.argv = ["train.py", *sys.argv[1:]]
runpy.run_path({train!r}, run_name="__main__")
"""


def config_file(directory, config=None, name="run_config.py") -> str:
    """A config file (what train.py's --config takes) holding `config` (default: the tiny
    one), in `directory`."""
    directory = pathlib.Path(directory)
    data = directory / f"{name}.json"
    data.write_text((config or tiny_config()).to_json())
    (directory / name).write_text(CONFIG_FROM_JSON.format(path=str(data)))
    return str(directory / name)


# A DeepSeek-V3-format model small enough for every test: MLA, a dense first layer, grouped
# sigmoid routing with a shared expert, YaRN and one MTP module.
V3_MODEL = dict(attn_pattern=("mla",), n_layers=3, n_heads=2, n_experts=4, top_k=2,
                router_scoring="sigmoid", n_group=2, topk_group=1, n_shared_experts=1,
                moe_hidden_dim=16, first_k_dense=1, dense_hidden_dim=24, mtp_depth=1,
                q_lora_rank=12, rope_yarn_factor=4.0, rope_original_max_len=8,
                rope_mscale_all_dim=1.0)


class Repeating:
    """A token source of one short pattern, each row starting at a random offset: a model
    learns it within tens of steps."""

    PATTERN = (3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8)

    def batch(self, step, batch_size, rows=slice(None), split="train"):
        import numpy as np

        from minids_jax.data import sources

        pattern = np.array(self.PATTERN, np.int32)
        starts = np.random.default_rng(step).integers(0, len(pattern), batch_size)
        windows = np.stack([np.resize(np.roll(pattern, -s), 17) for s in starts])
        return sources.as_batch(windows[rows])


def run_command(args, env=None, timeout=240, **kwargs):
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env or subprocess_env(""), **kwargs)


def assert_user_error(result, *fragments) -> str:
    """The command failed with status 2 and one last `error:` line holding each fragment."""
    output = result.stdout + result.stderr
    assert result.returncode == 2, output
    assert "Traceback" not in output, output
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), output
    for fragment in fragments:
        assert fragment in last, last
    return last


def read_until(process, pattern: str, timeout: float = 240) -> list[str]:
    lines, deadline = [], time.time() + timeout
    while time.time() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line)
        if pattern in line:
            return lines
    process.kill()
    raise AssertionError(f"{pattern!r} never appeared:\n{''.join(lines)}")


def saved_lora_run(tmp_path, targets=("attn.*", "head"), dropout=0.0, model=None,
                   base_quant="none"):
    """(base workdir, LoRA workdir): a random base (DeepSeek-V3-format, or of `model`) and a
    LoRA run on it whose adapters are random (as after training), its base held as
    `base_quant` says."""
    import jax
    from flax import nnx

    from minids_jax import checkpoint
    from minids_jax.checkpoint import base as checkpoint_base
    from minids_jax.model import MiniDeepSeek, lora

    config = tiny_config(model=model or dict(V3_MODEL, n_layers=2, mtp_depth=0))
    model = MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(4))
    checkpoint.save_model(tmp_path / "base", config, nnx.to_pure_dict(nnx.state(model)))
    tuned = dataclasses.replace(
        config, lora=dataclasses.replace(config.lora, rank=2, alpha=4.0, targets=targets,
                                         dropout=dropout, base_quant=base_quant),
        checkpoint=dataclasses.replace(config.checkpoint, init_from=str(tmp_path / "base")))
    lora.add_adapters(model, tuned.lora, nnx.Rngs(5))
    keys = iter(jax.random.split(jax.random.key(6), 200))
    for variable in jax.tree.leaves(nnx.state(model, nnx.LoRAParam),
                                    is_leaf=lambda x: isinstance(x, nnx.Variable)):
        variable[...] = 0.2 * jax.random.normal(next(keys), variable.shape)
    # As a LoRA run saves them: the adapters only, on the base.
    base_dir = tmp_path / "base" / "checkpoints" / "0"
    checkpoint.save_model(tmp_path / "lora", tuned, nnx.to_pure_dict(nnx.state(
        model, nnx.LoRAParam)), base=checkpoint_base.base_reference(base_dir, checkpoint.read_meta(base_dir)))
    return tmp_path / "base", tmp_path / "lora"


def assert_close_logits(ours, theirs):
    """Logits equal to a reference's within 1e-4 of its largest magnitude (float32)."""
    import numpy as np

    scale = np.abs(theirs).max()
    np.testing.assert_allclose(ours / scale, theirs / scale, atol=1e-4)
