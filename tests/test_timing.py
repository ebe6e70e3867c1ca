"""benchmarks/timing.py's XLA compiler options: parsed from JSON, passed to XLA, refused in
one line."""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import pytest

from tests.factories import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import timing  # noqa: E402  (benchmarks/timing.py)


def test_compiler_options_are_a_json_object():
    assert timing.compiler_options('{"xla_cpu_scheduler_type": "X"}') == {
        "xla_cpu_scheduler_type": "X"}
    assert timing.compiler_options("{}") == {}
    for text, problem in (("[1]", "not a JSON object"), ("{nope", "not JSON")):
        with pytest.raises(ValueError, match=problem):
            timing.compiler_options(text)


def test_compile_with_passes_the_options_to_xla():
    lowered = jax.jit(lambda x: jnp.tanh(x) * 2).lower(jnp.ones(4))
    # An option XLA has compiles; the same function, so the same result.
    compiled = timing.compile_with(lowered, {"xla_cpu_scheduler_type":
                                             "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"})
    assert jnp.allclose(compiled(jnp.ones(4)), jnp.tanh(1.0) * 2)
    # One it does not have is refused by XLA (so the options do reach it), in one line.
    with pytest.raises(ValueError, match="XLA refused the options.*xla_no_such_option") as error:
        timing.compile_with(lowered, {"xla_no_such_option": True})
    assert "\n" not in str(error.value)
