"""benchmarks/step_profile.py's reading of compiled HLO: each op is named by the minids_jax
line that emitted it (the stack-frame tables of XLA's text format, which can change)."""

from __future__ import annotations

import inspect
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from tests.factories import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import step_profile  # noqa: E402  (benchmarks/step_profile.py)

from minids_jax.model import layers  # noqa: E402


def test_ops_are_attributed_to_the_minids_jax_line_that_emitted_them():
    with nnx.use_eager_sharding(False):
        linear = layers.Linear(8, 4, (None, None), rngs=nnx.Rngs(0), dtype="float32",
                               param_dtype="float32")
    graphdef, state = nnx.split(linear)
    forward = jax.jit(lambda state, x: jnp.tanh(nnx.merge(graphdef, state)(x)))
    hlo_text = forward.lower(state, jnp.ones((2, 3, 8))).compile().as_text()
    lines = step_profile.source_lines(hlo_text)
    source, first = inspect.getsourcelines(layers.Linear.__call__)
    matmul_line = first + next(i for i, text in enumerate(source) if "@ self.kernel" in text)
    dots = [name for name in lines if "dot" in name or "fusion" in name]
    assert f"model/layers.py:{matmul_line}" in {lines[name] for name in dots}, lines
    # The tanh was written here, outside minids_jax.
    assert "(outside minids_jax)" in lines.values(), lines
