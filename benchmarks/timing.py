"""Shared by the benchmarks: compile a run's train step once, then time steady-state steps."""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import tempfile
import time
from typing import Any

import jax


@dataclasses.dataclass
class StepTiming:
    compiled: Any  # the compiled train step (for memory_analysis())
    compile_s: float
    step_s: float  # mean over the timed steps, after two warm-up steps
    tokens_per_s: float
    metrics: dict  # of the last step


def compiler_options(text: str) -> dict[str, Any]:
    """XLA compiler options from a JSON object, e.g. '{"xla_cpu_scheduler_type":
    "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}' ('{}': the defaults); ValueError if it is not one."""
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{text!r} is not JSON ({error})") from None
    if not isinstance(options, dict):
        raise ValueError(f"{text!r} is not a JSON object of option names and values")
    return options


def compile_with(lowered, options: dict[str, Any] | None = None):
    """`lowered.compile()` with XLA compiler `options`; ValueError (one line) if XLA refuses
    them, e.g. an option this jaxlib does not have."""
    if not options:
        return lowered.compile()
    try:
        return lowered.compile(options)
    except jax.errors.JaxRuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"XLA refused the options {json.dumps(options)}: {reason}") from None


class CompiledStepTimer:
    """Compiles the train step of `run` (a `trainer.Trainer`) ahead of time, with XLA
    `compiler_options` if given, and warms it up with `warmup` steps; `time(steps)` then times
    that many more, each call continuing from the last. (`reporting.StepTimer` is the
    trainer's: tokens/s over the steps between log lines.)"""

    def __init__(self, run, warmup: int = 2, compiler_options: dict[str, Any] | None = None):
        self.run = run
        start = time.perf_counter()
        self.lowered = run.train_step.lower(run.step_state, run.batch(0))  # for its HLO text
        self.compiled = compile_with(self.lowered, compiler_options)
        self.compile_s = time.perf_counter() - start  # tracing and lowering included
        self.next_step = 0
        self.metrics = self._advance(warmup) if warmup else {}

    def _advance(self, steps: int) -> dict:
        state = self.run.step_state
        for step in range(self.next_step, self.next_step + steps):
            state, metrics = self.compiled(state, self.run.batch(step))
        jax.block_until_ready(metrics)
        self.run.step_state, self.next_step = state, self.next_step + steps
        return metrics

    def time(self, steps: int) -> float:
        """Mean seconds per step over `steps` steps."""
        start = time.perf_counter()
        self.metrics = self._advance(steps)
        return (time.perf_counter() - start) / steps

    def tokens_per_s(self, step_s: float) -> float:
        config = self.run.config
        return config.train.batch_size * config.model.max_seq_len / step_s


def describe(config) -> str:
    """One line of the sizes that set a run's speed."""
    m, compute = config.model, config.compute
    return (f"model: d_model {m.d_model}, layers {m.n_layers} {m.attn_pattern}, heads {m.n_heads}, "
            f"seq {m.max_seq_len}, vocab {m.vocab_size}, experts {m.n_experts} top-{m.top_k} "
            f"({compute.moe_dispatch}), mtp_depth {m.mtp_depth}, batch "
            f"{config.train.batch_size}, dtype {compute.dtype}")


def time_train_step(run, steps: int) -> StepTiming:
    """`run` is a `trainer.Trainer`; its state is advanced by 2 + `steps` steps."""
    timer = CompiledStepTimer(run)
    step_s = timer.time(steps)
    return StepTiming(timer.compiled, timer.compile_s, step_s, timer.tokens_per_s(step_s),
                      timer.metrics)


def peer_environment(huge_pages: bool = False, **extra: str) -> dict[str, str]:
    """This process's environment, with `extra`, for a peer's (transformers', the original's):
    without the malloc tunable that startup.use_huge_pages gave this process (the peer as its
    users run it) unless `huge_pages`."""
    from minids_jax.startup import HUGE_PAGES_TUNABLE

    env = dict(os.environ, **extra)
    if not huge_pages and "GLIBC_TUNABLES" in env:
        kept = [entry for entry in env.pop("GLIBC_TUNABLES").split(":")
                if entry and entry != HUGE_PAGES_TUNABLE]
        env.update({"GLIBC_TUNABLES": ":".join(kept)} if kept else {})
    return env


def original_environment(config, huge_pages: bool = False, **extra: str) -> dict[str, str]:
    """Environment that runs the PyTorch original on the CPU at the config's sizes (its batch is
    per process; it runs as one process, so that is the same global batch)."""
    m = config.model
    return peer_environment(
        huge_pages, MINIDS_DEVICE="cpu", MINIDS_VOCAB=str(m.vocab_size),
        MINIDS_MAX_SEQ=str(m.max_seq_len), MINIDS_D_MODEL=str(m.d_model),
        MINIDS_N_LAYER=str(m.n_layers), MINIDS_N_HEAD=str(m.n_heads),
        MINIDS_LATENT_K=str(m.latent_k), MINIDS_MLP_MULT=str(m.mlp_mult),
        MINIDS_MOE_EXPERT=str(m.n_experts), MINIDS_BATCH=str(config.train.batch_size), **extra)


def hf_config_file(config) -> str | None:
    """A temporary `config.json` of the run's model in transformers' DeepseekV3 form (for
    benchmarks/hf_peer.py), or None, with the reason printed, if the model has no such form."""
    from minids_jax.hf.config import HFFormatError, to_hf

    try:
        hf_config = to_hf(config.model)
    except HFFormatError as error:
        print(f"--vs_hf skipped: {error}")
        return None
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="hf_peer_",
                                     delete=False) as f:
        json.dump(hf_config, f)
    atexit.register(os.unlink, f.name)
    return f.name
