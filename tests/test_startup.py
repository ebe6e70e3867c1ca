"""GPU choice through a fake pynvml, and when jax.distributed is started (and with what)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

from minids_jax import startup
from minids_jax.config import ConfigError, DevicesConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GiB = 1024 ** 3


class FakeNvml:
    """The slice of the pynvml API the picker uses; can fail like a machine without a driver."""

    def __init__(self, free_gib=(), fail: bool = False):
        self.free = [int(g * GiB) for g in free_gib]
        self.fail, self.calls = fail, []

    def nvmlInit(self):
        self.calls.append("init")
        if self.fail:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlDeviceGetCount(self):
        return len(self.free)

    def nvmlDeviceGetHandleByIndex(self, index):
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(free=self.free[handle], total=80 * GiB)

    def nvmlShutdown(self):
        self.calls.append("shutdown")


def test_picks_the_gpus_with_the_most_free_memory():
    environ, nvml = {}, FakeNvml([10, 50, 30, 40, 5])
    choice = startup.select_gpus(DevicesConfig(num_gpus=2), environ, nvml)
    assert environ["CUDA_VISIBLE_DEVICES"] == "1,3"  # 50 and 40 GiB, listed in bus order
    assert environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"  # CUDA numbers GPUs like NVML
    assert choice.count == 2 and "most free memory" in choice.reason
    assert nvml.calls == ["init", "shutdown"]


def test_ties_go_to_the_lower_index():
    choice = startup.choose_gpus(3, {}, FakeNvml([20, 20, 20, 20]))
    assert choice.visible == "0,1,2"


def test_zero_means_every_visible_gpu():
    environ = {}
    choice = startup.select_gpus(DevicesConfig(num_gpus=0), environ, FakeNvml([1, 2, 3]))
    assert "CUDA_VISIBLE_DEVICES" not in environ and choice.count == 3


def test_falls_back_to_the_first_gpus_when_nvml_fails():
    environ = {}
    choice = startup.select_gpus(DevicesConfig(num_gpus=3), environ, FakeNvml(fail=True))
    assert environ["CUDA_VISIBLE_DEVICES"] == "0,1,2"
    assert "NVML unavailable" in choice.reason and "Shared Library" in choice.reason


def test_falls_back_when_pynvml_is_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` fail
    choice = startup.choose_gpus(2, {})
    assert choice.visible == "0,1" and "NVML unavailable" in choice.reason


def test_more_gpus_than_exist_is_an_error():
    with pytest.raises(ConfigError, match=r"devices.num_gpus=5 .* has 4 GPU\(s\).*at most 4"):
        startup.choose_gpus(5, {}, FakeNvml([1, 2, 3, 4]))


def test_the_users_cuda_visible_devices_wins():
    environ, nvml = {"CUDA_VISIBLE_DEVICES": "2,3"}, FakeNvml([80, 80, 1, 1])
    choice = startup.select_gpus(DevicesConfig(num_gpus=2), environ, nvml)
    assert environ == {"CUDA_VISIBLE_DEVICES": "2,3"} and nvml.calls == []
    assert choice.count == 2 and "as is" in choice.reason
    with pytest.raises(ConfigError, match="lists 2 GPU"):
        startup.choose_gpus(3, environ, nvml)


def test_fewer_devices_than_asked_is_an_error_once_jax_starts():
    cpu = types.SimpleNamespace(platform="cpu")
    startup.check_local_devices(DevicesConfig(num_gpus=1), [cpu])
    with pytest.raises(ConfigError, match="num_gpus=2 but JAX found only 1 local device"):
        startup.check_local_devices(DevicesConfig(num_gpus=2), [cpu])


# What a two-node `srun --ntasks-per-node=1` sets.
SLURM = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_TASKS_PER_NODE": "1(x2)"}


def test_a_lone_process_does_not_start_jax_distributed():
    assert startup.distributed_arguments(DevicesConfig(), None, {}) is None
    lone_slurm = {**SLURM, "SLURM_NTASKS": "1"}  # e.g. an interactive one-task allocation
    assert startup.distributed_arguments(DevicesConfig(), None, lone_slurm) is None


def test_slurm_with_one_task_per_node_drives_every_local_gpu():
    gpus = startup.GpuChoice("0,1,2,3", 4, "test")
    kwargs = startup.distributed_arguments(DevicesConfig(), gpus, SLURM)
    # JAX's SLURM detection alone would give each process only GPU SLURM_LOCALID.
    assert kwargs == {"initialization_timeout": 300, "local_device_ids": [0, 1, 2, 3]}
    one_per_gpu = {**SLURM, "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_NTASKS": "8"}
    # Every task sees all 4 GPUs: JAX picks the one of its local rank.
    assert "local_device_ids" not in startup.distributed_arguments(DevicesConfig(), gpus,
                                                                   one_per_gpu)
    # SLURM bound one GPU per task (CUDA_VISIBLE_DEVICES=<its GPU>): it is device 0 here,
    # whatever the local rank.
    bound = startup.choose_gpus(0, {"CUDA_VISIBLE_DEVICES": "3"})
    assert startup.distributed_arguments(DevicesConfig(), bound, one_per_gpu)[
        "local_device_ids"] == [0]
    assert startup.distributed_arguments(DevicesConfig(distributed="off"), gpus, SLURM) is None


def test_explicit_coordinator_and_other_launchers():
    cfg = DevicesConfig(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=1)
    assert startup.distributed_arguments(cfg, None, {}) == {
        "initialization_timeout": 300, "coordinator_address": "10.0.0.1:1234",
        "num_processes": 2, "process_id": 1}
    for environ, name in [({"JAX_COORDINATOR_ADDRESS": "h:1"}, "JAX_COORDINATOR_ADDRESS"),
                          ({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "2"}, "Open MPI"),
                          ({"KUBERNETES_SERVICE_HOST": "k", "JOB_COMPLETION_INDEX": "0"},
                           "Kubernetes")]:
        assert startup.cluster_in_environment(environ) == name
        assert startup.distributed_arguments(DevicesConfig(), None, environ) is not None
    assert startup.distributed_arguments(DevicesConfig(distributed="on"), None, {}) == {
        "initialization_timeout": 300}


@pytest.mark.parametrize("fields, message", [
    (dict(num_gpus=-1), "devices.num_gpus"),
    (dict(distributed="yes"), "devices.distributed='yes'"),
    (dict(coordinator_address="10.0.0.1"), "needs a port"),
    (dict(num_processes=2, process_id=2), "devices.process_id=2 must be < devices.num_processes"),
])
def test_bad_devices_config_is_rejected(fields, message):
    with pytest.raises(ConfigError, match=message):
        DevicesConfig(**fields)


@pytest.mark.slow
def test_train_py_sets_cuda_visible_devices_before_jax_is_imported(tmp_path):
    """Runs train.py with a fake pynvml; an import hook records the environment at the moment
    jax is first imported, then ends the process (no training needed)."""
    (tmp_path / "pynvml.py").write_text(textwrap.dedent("""
        import types
        FREE = [10, 50, 30, 40]
        def nvmlInit(): pass
        def nvmlShutdown(): pass
        def nvmlDeviceGetCount(): return len(FREE)
        def nvmlDeviceGetHandleByIndex(i): return i
        def nvmlDeviceGetMemoryInfo(h): return types.SimpleNamespace(free=FREE[h] * 2**30)
    """))
    record = tmp_path / "at_jax_import.json"
    (tmp_path / "driver.py").write_text(textwrap.dedent(f"""
        import importlib.abc, json, os, runpy, sys

        class RecordJaxImport(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "jax":
                    with open({str(record)!r}, "w") as f:
                        json.dump({{k: os.environ.get(k) for k in
                                   ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}}, f)
                    sys.stdout.flush()
                    os._exit(0)
                return None

        sys.meta_path.insert(0, RecordJaxImport())
        sys.argv = ["train.py", "--config", "configs/tiny.py", "--config.devices.num_gpus=2"]
        runpy.run_path("train.py", run_name="__main__")
    """))
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), ROOT])
    proc = subprocess.run([sys.executable, str(tmp_path / "driver.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert record.exists(), "train.py never imported jax"
    assert json.loads(record.read_text()) == {"CUDA_VISIBLE_DEVICES": "1,3",
                                              "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert "GPUs: CUDA_VISIBLE_DEVICES=1,3: the 2 with the most free memory" in proc.stderr


def test_huge_pages_environment_adds_the_tunable_only_where_it_can_work():
    THP = "always [madvise] never\n"
    run_again = startup.huge_pages_environment({"PATH": "/bin"}, ("glibc", "2.36"), THP)
    assert run_again == {"PATH": "/bin", "GLIBC_TUNABLES": startup.HUGE_PAGES_TUNABLE}
    # The user's own tunables are kept; a hugetlb setting of theirs wins (and ends the loop).
    assert startup.huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
                                          ("glibc", "2.39"), THP)["GLIBC_TUNABLES"] == \
        "glibc.malloc.arena_max=2:" + startup.HUGE_PAGES_TUNABLE
    for environ, libc, thp in [
            ({"GLIBC_TUNABLES": startup.HUGE_PAGES_TUNABLE}, ("glibc", "2.36"), THP),
            ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, ("glibc", "2.36"), THP),
            ({}, ("glibc", "2.34"), THP),  # before the tunable existed
            ({}, ("", ""), THP),  # musl
            ({}, ("glibc", "2.36"), "always madvise [never]\n"),  # the kernel's are off
            ({}, ("glibc", "2.36"), "")]:  # no such setting to read
        assert startup.huge_pages_environment(environ, libc, thp) is None, (environ, libc, thp)


def _huge_pages_available() -> bool:
    import platform
    return startup.huge_pages_environment({}, platform.libc_ver(),
                                          startup.kernel_huge_pages()) is not None


_RUN_AGAIN_SCRIPT = textwrap.dedent("""
    import os, sys
    print("start", os.getpid(), os.environ.get("GLIBC_TUNABLES", ""), sys.argv[1:], sep="|",
          flush=True)
    from minids_jax import startup
    print("in effect", startup.use_huge_pages(), flush=True)
""")


@pytest.mark.skipif(not _huge_pages_available(), reason="glibc >= 2.35 and huge pages needed")
@pytest.mark.slow
def test_use_huge_pages_runs_the_process_again_once_with_the_tunable():
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    result = subprocess.run([sys.executable, "-c", _RUN_AGAIN_SCRIPT, "--flag", "x"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    starts = [line.split("|")[1:] for line in result.stdout.splitlines()
              if line.startswith("start")]
    # The same process, run again once, with its arguments, and the tunable the second time.
    pid = starts[0][0]
    assert starts == [[pid, "", "['--flag', 'x']"],
                      [pid, startup.HUGE_PAGES_TUNABLE, "['--flag', 'x']"]], result.stdout
    assert result.stdout.splitlines()[-1] == "in effect True"


# Steps a function whose temporaries (52 MB) exceed glibc's largest mmap threshold (32 MB), as
# a CPU train step's do, and prints the minor page faults of each call and the temporaries' size.
_FAULTS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    import jax, jax.numpy as jnp

    def step(x):
        return jnp.sum(jnp.cumsum(jnp.sin(x), axis=0) * jnp.cumsum(jnp.cos(x), axis=1), axis=0)

    x = jnp.ones((2048, 2048))
    compiled = jax.jit(step).lower(x).compile()
    faults = []
    for _ in range(30):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        compiled(x).block_until_ready()
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"faults": faults[10:],
                      "temp_bytes": compiled.memory_analysis().temp_size_in_bytes}))
""")


def _step_faults(tunables: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "GLIBC_TUNABLES")}
    result = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT], cwd=ROOT,
                            capture_output=True, text=True, timeout=300,
                            env={**env, "JAX_PLATFORMS": "cpu",  # optimized code: quick calls
                                 **({"GLIBC_TUNABLES": tunables} if tunables else {})})
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _median(values: list[int]) -> int:
    return sorted(values)[len(values) // 2]


@pytest.mark.skipif(not _huge_pages_available(), reason="glibc >= 2.35 and huge pages needed")
@pytest.mark.slow
def test_huge_pages_fault_each_steps_memory_in_far_fewer_pages():
    default = _step_faults(None)
    pages = default["temp_bytes"] / 4096
    assert default["temp_bytes"] > 40e6  # larger than any block glibc would keep by itself
    if _median(default["faults"]) < pages / 2:
        pytest.skip(f"this kernel does not fault the temporaries in again "
                    f"({default['faults']} faults a call)")
    # By default every call maps its temporaries afresh and faults each 4 KiB page in; with
    # huge pages advised, a fault brings in 2 MiB (a fallback to small pages now and then,
    # where the kernel found no free huge page, is why the bound is not 512 times fewer).
    huge = _step_faults(startup.HUGE_PAGES_TUNABLE)
    assert _median(huge["faults"]) < pages / 20, (huge, default)


def test_the_compile_cache_directory():
    home = os.path.expanduser("~")
    resolve = lambda setting, **environ: startup.compile_cache_dir(  # noqa: E731
        DevicesConfig(compile_cache=setting), environ)
    assert resolve("auto") == os.path.join(home, ".cache", "minids_jax", "xla")
    assert resolve("auto", XDG_CACHE_HOME="/x") == "/x/minids_jax/xla"
    # JAX's own setting, where the user made one, wins over the default.
    assert resolve("auto", XDG_CACHE_HOME="/x", JAX_COMPILATION_CACHE_DIR="/j") == "/j"
    assert resolve("~/c", JAX_COMPILATION_CACHE_DIR="/j") == os.path.join(home, "c")
    assert resolve("off") is None and resolve("") is None


def test_a_jax_cache_of_the_users_own_is_left_as_they_set_it(tmp_path):
    import jax

    before = (jax.config.jax_compilation_cache_dir,
              jax.config.jax_persistent_cache_min_compile_time_secs)
    environ = {"JAX_COMPILATION_CACHE_DIR": str(tmp_path)}
    assert startup.keep_compiled_programs(DevicesConfig(), environ) == str(tmp_path)
    assert (jax.config.jax_compilation_cache_dir,
            jax.config.jax_persistent_cache_min_compile_time_secs) == before


def test_an_unusable_compile_cache_warns_and_the_run_compiles_as_usual(tmp_path, capsys):
    (tmp_path / "a_file").write_text("")
    cfg = DevicesConfig(compile_cache=str(tmp_path / "a_file" / "cache"))
    assert startup.keep_compiled_programs(cfg) is None
    warning = capsys.readouterr().err
    assert "devices.compile_cache: cannot use" in warning and "\n" == warning[-1]
    assert warning.count("\n") == 1


# Compiles one function in a fresh process with the compile cache in argv[1], and prints how
# many programs came from the cache and how many were compiled, and the result.
_CACHE_SCRIPT = textwrap.dedent("""
    import json, sys
    from minids_jax import startup
    from minids_jax.config import DevicesConfig
    kept = startup.keep_compiled_programs(DevicesConfig(compile_cache=sys.argv[1]))
    import jax, jax.numpy as jnp
    from jax import monitoring
    counts = {"hits": 0, "misses": 0}
    def count(event, **kwargs):
        for name in counts:
            counts[name] += event == f"/jax/compilation_cache/cache_{name}"
    monitoring.register_event_listener(count)
    x = jax.jit(lambda x: jnp.sin(x) @ x.T)(jnp.arange(12.0).reshape(3, 4))
    print(json.dumps({"kept": kept, **counts, "sum": float(x.sum())}))
""")


@pytest.mark.slow
def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    cache = str(tmp_path / "xla")

    def run(setting: str, **environ) -> dict:
        result = subprocess.run([sys.executable, "-c", _CACHE_SCRIPT, setting], cwd=ROOT,
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, "JAX_PLATFORMS": "cpu", **environ})
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    first, second = run(cache), run(cache)
    assert first["kept"] == cache
    assert first["misses"] >= 1 and first["hits"] == 0, first
    assert any((tmp_path / "xla").iterdir())
    assert second["hits"] >= 1 and second["misses"] == 0, second
    assert second["sum"] == first["sum"]
    # off is off, even where JAX's own variable names a cache that holds the program.
    off = run("off", JAX_COMPILATION_CACHE_DIR=cache)
    assert off["kept"] is None and off["hits"] == 0, off


def test_the_compile_cache_a_run_saved_is_read_back_or_auto(tmp_path):
    from minids_jax.workdir import saved_compile_cache

    assert saved_compile_cache(tmp_path) == "auto"  # no config.json: an imported run
    (tmp_path / "config.json").write_text(json.dumps({"devices": {"compile_cache": "off"}}))
    assert saved_compile_cache(tmp_path) == "off"
    (tmp_path / "config.json").write_text("{not json")
    assert saved_compile_cache(tmp_path) == "auto"
