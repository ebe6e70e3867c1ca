"""Shared by the benchmarks: compile a run's train step once, then time steady-state steps."""

from __future__ import annotations

import dataclasses
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


def time_train_step(run, steps: int) -> StepTiming:
    """`run` is a `trainer.Trainer`; its state is advanced by 2 + `steps` steps."""
    start = time.perf_counter()
    compiled = run.train_step.lower(run.train_state.state, run.batch(0)).compile()
    compile_s = time.perf_counter() - start
    state = run.train_state.state
    for step in range(2):  # warm-up
        state, metrics = compiled(state, run.batch(step))
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for step in range(2, 2 + steps):
        state, metrics = compiled(state, run.batch(step))
    jax.block_until_ready(metrics)
    step_s = (time.perf_counter() - start) / steps
    run.train_state.state = state
    config = run.config
    tokens_per_s = config.train.batch_size * config.model.max_seq_len / step_s
    return StepTiming(compiled, compile_s, step_s, tokens_per_s, metrics)
