import os
import subprocess

from tests.factories import FAST_COMPILE_XLA_FLAGS  # imports no JAX

os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_XLA_FLAGS}".strip()

import jax  # noqa: E402  (after XLA_FLAGS, which JAX reads once)
import pytest  # noqa: E402
from flax import nnx  # noqa: E402

from tests.factories import TINY_STEPS, compute_config, small_model_config, tiny_config  # noqa: E402

# Float32 matmuls at full precision so that equality checks against references are tight.
jax.config.update("jax_default_matmul_precision", "highest")
# Layers built on their own (outside MiniDeepSeek or a mesh) keep their sharding annotations
# as metadata only, as MiniDeepSeek does.
nnx.use_eager_sharding(False)

__all__ = ["TINY_STEPS", "compute_config", "small_model_config", "tiny_config"]


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (pyproject.toml): a worker per core, at most four. Each is a JAX process
    compiling tiny programs, mostly on one thread; more would only add their start-up."""
    return max(1, min(4, os.cpu_count() or 1))


@pytest.fixture
def model_cfg():
    return small_model_config()


@pytest.fixture(scope="session", autouse=True)
def compile_cache(tmp_path_factory):
    """A persistent compilation cache for the whole session and its subprocesses: the many
    trainers of the same tiny config compile its initialization and steps once. Programs
    that compile in under half a second (eager ops) are not worth a file each."""
    directory = str(tmp_path_factory.mktemp("jax_cache"))
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_persistent_cache_min_entry_size_bytes")
    saved = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (directory, 0.5, -1)):
        jax.config.update(name, value)
    yield directory
    for name, value in saved.items():
        jax.config.update(name, value)


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, compile_cache):
    """One uninterrupted tiny run of TINY_STEPS steps, saved every 3: (trainer, history,
    workdir). Tests that only need some trained run share it; none may write into it."""
    from minids_jax.training import trainer as trainer_lib

    workdir = tmp_path_factory.mktemp("trained_run")
    trainer = trainer_lib.Trainer(tiny_config(), str(workdir))
    history = trainer.train()
    return trainer, history, workdir


@pytest.fixture(autouse=True)
def subprocesses_only_in_slow_tests(request, monkeypatch):
    """A test that starts a process (an entry point, a multi-device or multi-process job) is
    marked `slow`, so that `pytest -m "not slow"` stays the quick loop: any other test that
    tries is stopped here and told so."""
    if request.node.get_closest_marker("slow"):
        return

    def refuse(self, args, *unused, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process ({args!r}): mark it "
                             f"@pytest.mark.slow")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
