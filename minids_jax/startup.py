"""Process start-up that must run before JAX starts a backend: GPU choice, multi-process
start-up, and how the C library hands out host memory.

One JAX process drives every GPU of its host. `select_gpus` picks which ones (the N with the
most free memory, via NVML) by setting CUDA_VISIBLE_DEVICES; `initialize_distributed` joins
the hosts of a SLURM, Open MPI or Kubernetes job (or an explicit coordinator) into one JAX job;
`use_huge_pages` has the C library back large host allocations with transparent huge pages,
so that each CPU step faults its working memory in 512 times fewer pages;
`keep_compiled_programs` gives JAX a directory where compiled programs outlive the process.
None imports jax at module level: train.py calls them before anything touches a backend.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import sys
from typing import Any, MutableMapping

from minids_jax.config import ConfigError, DevicesConfig

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class GpuChoice:
    """The outcome of `choose_gpus`: what CUDA_VISIBLE_DEVICES should be, and why."""

    visible: str | None  # value for CUDA_VISIBLE_DEVICES; None: leave the environment alone
    count: int | None  # GPUs this process will see; None: unknown until JAX starts
    reason: str


def nvml_free_memory(nvml: Any = None) -> list[int]:
    """Free bytes of every GPU, in NVML (PCI bus) order. Raises if NVML is missing or fails."""
    if nvml is None:
        import pynvml as nvml  # nvidia-ml-py; imported late so CPU-only installs never need it
    nvml.nvmlInit()
    try:
        handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(nvml.nvmlDeviceGetCount())]
        return [int(nvml.nvmlDeviceGetMemoryInfo(h).free) for h in handles]
    finally:
        nvml.nvmlShutdown()


def _listed(visible: str) -> list[str]:
    return [d.strip() for d in visible.split(",") if d.strip()]


def choose_gpus(num_gpus: int, environ: MutableMapping[str, str] = os.environ,
                nvml: Any = None) -> GpuChoice:
    """The `num_gpus` GPUs with the most free memory (0: all); the user's own choice wins."""
    if "CUDA_VISIBLE_DEVICES" in environ:
        visible = environ["CUDA_VISIBLE_DEVICES"]
        listed = _listed(visible)
        if num_gpus > len(listed):
            raise ConfigError(
                f"devices.num_gpus={num_gpus} but CUDA_VISIBLE_DEVICES={visible!r} lists "
                f"{len(listed)} GPU(s); list more GPUs there, or lower devices.num_gpus "
                f"(0 = every visible GPU).")
        return GpuChoice(None, len(listed),
                         f"CUDA_VISIBLE_DEVICES={visible!r} set in the environment; using it as is")
    try:
        free = nvml_free_memory(nvml)
    except Exception as error:  # ImportError, NVMLError_LibraryNotFound, a driver fault, ...
        if num_gpus == 0:
            return GpuChoice(None, None, f"every visible device (NVML unavailable: {error})")
        chosen = list(range(num_gpus))
        return GpuChoice(",".join(map(str, chosen)), num_gpus,
                         f"NVML unavailable ({error}); falling back to GPUs {chosen}")
    if num_gpus == 0:
        return GpuChoice(None, len(free), f"every visible GPU ({len(free)})")
    if num_gpus > len(free):
        raise ConfigError(
            f"devices.num_gpus={num_gpus} but this machine has {len(free)} GPU(s); lower "
            f"devices.num_gpus to at most {len(free)} (0 = every GPU).")
    # Most free memory first; ties go to the lower index. Listed in index order so device
    # order (and so the mesh layout) follows the PCI bus.
    ranked = sorted(range(len(free)), key=lambda i: (-free[i], i))
    chosen = sorted(ranked[:num_gpus])
    summary = ", ".join(f"GPU {i}: {free[i] / GiB:.1f} GiB" for i in ranked)
    return GpuChoice(",".join(map(str, chosen)), num_gpus,
                     f"the {num_gpus} with the most free memory ({summary})")


def select_gpus(cfg: DevicesConfig, environ: MutableMapping[str, str] = os.environ,
                nvml: Any = None) -> GpuChoice:
    """Applies `choose_gpus` to the environment. Call before JAX initializes a backend."""
    choice = choose_gpus(cfg.num_gpus, environ, nvml)
    if choice.visible is not None:
        # NVML counts GPUs in PCI bus order but CUDA defaults to fastest-first: make them agree.
        environ.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        environ["CUDA_VISIBLE_DEVICES"] = choice.visible
    return choice


def check_local_devices(cfg: DevicesConfig, local_devices: list) -> None:
    """After JAX starts: fails if fewer devices came up than devices.num_gpus asked for.

    Catches the NVML fallback asking for GPUs that do not exist.
    """
    if cfg.num_gpus and len(local_devices) < cfg.num_gpus:
        kinds = sorted({d.platform for d in local_devices})
        raise ConfigError(
            f"devices.num_gpus={cfg.num_gpus} but JAX found only {len(local_devices)} local "
            f"device(s) ({', '.join(kinds)}); lower devices.num_gpus (0 = every device) or "
            f"check the CUDA installation.")


HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb=1"  # glibc >= 2.35: madvise(MADV_HUGEPAGE)
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def kernel_huge_pages() -> str:
    """The kernel's transparent-huge-page setting ('always [madvise] never': the bracketed
    one is in force), '' where there is none to read."""
    try:
        with open(_THP_SETTING) as setting:
            return setting.read()
    except OSError:
        return ""


def huge_pages_environment(environ: MutableMapping[str, str], libc: tuple[str, str],
                           thp_setting: str) -> dict[str, str] | None:
    """The environment to run again with, glibc's malloc advising transparent huge pages for
    what it maps; None where that is in effect already, chosen otherwise by the user (any
    glibc.malloc.hugetlb in GLIBC_TUNABLES), or unavailable: another C library, glibc before
    2.35 (no such tunable), or the kernel's huge pages off (`thp_setting`, the contents of
    /sys/kernel/mm/transparent_hugepage/enabled: '[never]' selected, or '' unreadable)."""
    name, version = libc
    tunables = environ.get("GLIBC_TUNABLES", "")
    if name != "glibc" or "[never]" in thp_setting or "[" not in thp_setting:
        return None
    try:
        if tuple(int(part) for part in version.split(".")[:2]) < (2, 35):
            return None
    except ValueError:
        return None
    if any(entry.startswith("glibc.malloc.hugetlb=") for entry in tunables.split(":")):
        return None
    return {**environ, "GLIBC_TUNABLES": ":".join(filter(None, [tunables,
                                                                 HUGE_PAGES_TUNABLE]))}


def use_huge_pages(enabled: bool = True) -> bool:
    """Has glibc's malloc back the blocks it maps with transparent huge pages, re-executing
    this process (same interpreter, same arguments) with GLIBC_TUNABLES set if it is not yet;
    True if they are in effect. Nothing if not `enabled` (devices.host_huge_pages: read it
    with cli.wants_huge_pages, before the config is checked, whose warnings would otherwise
    be printed twice).

    XLA's CPU runtime allocates each step's temporaries as one block and frees it when the
    step ends; glibc serves blocks that large with a fresh mmap and unmaps them on free, so
    every step faults all of its working memory in again, a 4 KiB page at a time. Advised
    huge pages make that 512 times fewer faults, without holding freed memory or serializing
    the threads' mallocs, as one malloc arena did (docs/performance.md measures both).
    Glibc reads its tunables only when a process starts, hence the re-execution: call it
    first thing in a script's main, before JAX is imported and before anything that should
    not run twice. Where the kernel's huge pages are off, or the C library is not glibc 2.35
    or later, it does nothing (False)."""
    if not enabled or sys.platform != "linux" or not sys.executable:
        return False
    environ = huge_pages_environment(os.environ, platform.libc_ver(), kernel_huge_pages())
    if environ is None:
        return HUGE_PAGES_TUNABLE in os.environ.get("GLIBC_TUNABLES", "").split(":")
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ)
    except OSError:  # (an interpreter that cannot be run again: go on without)
        return False


def compile_cache_dir(cfg: DevicesConfig, environ: MutableMapping[str, str] = os.environ
                      ) -> str | None:
    """The directory `cfg.compile_cache` names (None: off)."""
    setting = cfg.compile_cache.strip()
    if setting in ("", "off"):
        return None
    if setting != "auto":
        return os.path.abspath(os.path.expanduser(setting))
    if environ.get("JAX_COMPILATION_CACHE_DIR"):
        return environ["JAX_COMPILATION_CACHE_DIR"]
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "minids_jax", "xla")


def keep_compiled_programs(cfg: DevicesConfig, environ: MutableMapping[str, str] = os.environ
                           ) -> str | None:
    """Points JAX's persistent compilation cache at `cfg.compile_cache`, so that a later run
    of the same programs (a resumed run, the same config again) loads them instead of
    compiling: the directory, or None if off or not writable (then a warning; the run
    compiles as usual). Every program is kept, however quick to compile: the many small
    ones of a start-up add up (docs/scale.md). With `auto` and JAX_COMPILATION_CACHE_DIR set,
    JAX's cache stays as its JAX_* variables made it. Call before anything compiles."""
    directory = compile_cache_dir(cfg, environ)
    own_jax_cache = bool(environ.get("JAX_COMPILATION_CACHE_DIR"))
    if directory is None:
        if own_jax_cache:  # off means off, whatever JAX's variables say
            import jax

            jax.config.update("jax_enable_compilation_cache", False)
        return None
    if own_jax_cache and cfg.compile_cache.strip() == "auto":
        return directory
    try:
        os.makedirs(directory, exist_ok=True)
        if not os.access(directory, os.W_OK):
            raise PermissionError("not writable")
    except OSError as error:
        print(f"warning: devices.compile_cache: cannot use {directory} ({error}); compiling "
              f"as usual. Set devices.compile_cache to a writable directory, or off.",
              file=sys.stderr)
        return None
    import jax

    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


def _int(environ, name: str, default: int = 0) -> int:
    try:
        return int(environ.get(name, default))
    except ValueError:
        return default


def cluster_in_environment(environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Names the multi-process launcher this process runs under, or None for a lone process."""
    if environ.get("JAX_COORDINATOR_ADDRESS"):
        return "JAX_COORDINATOR_ADDRESS"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID")
    if all(name in environ for name in slurm) and _int(environ, "SLURM_NTASKS") > 1:
        return "SLURM"
    if "OMPI_MCA_orte_hnp_uri" in environ and _int(environ, "OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    # Kubernetes Indexed Jobs / JobSets number their pods; a lone pod is no multi-host job.
    if "KUBERNETES_SERVICE_HOST" in environ and "JOB_COMPLETION_INDEX" in environ:
        return "Kubernetes"
    return None


def _tasks_per_host(environ) -> int:
    """Processes the launcher started on this host (1 if it does not say)."""
    # SLURM_STEP_TASKS_PER_NODE looks like "2(x3),1"; this host's entry is not needed when
    # every host runs the same number, which is the only layout supported here.
    per_node = environ.get("SLURM_STEP_TASKS_PER_NODE") or environ.get("SLURM_TASKS_PER_NODE")
    if per_node:
        return _int({"n": per_node.split("(")[0].split(",")[0]}, "n", 1)
    return _int(environ, "OMPI_COMM_WORLD_LOCAL_SIZE", 1)


def distributed_arguments(cfg: DevicesConfig, gpus: GpuChoice | None,
                          environ: MutableMapping[str, str] = os.environ) -> dict | None:
    """Keyword arguments for `jax.distributed.initialize`, or None when this is one process."""
    cluster = cluster_in_environment(environ)
    explicit = bool(cfg.coordinator_address) or cfg.num_processes > 1
    if cfg.distributed == "off" or (cfg.distributed == "auto" and not (cluster or explicit)):
        return None
    kwargs: dict[str, Any] = {"initialization_timeout": cfg.init_timeout_s}
    if cfg.coordinator_address:
        kwargs["coordinator_address"] = cfg.coordinator_address
    if cfg.num_processes:
        kwargs["num_processes"] = cfg.num_processes
    if cfg.process_id >= 0:
        kwargs["process_id"] = cfg.process_id
    # JAX's SLURM / Open MPI detection gives each process the GPU numbered by its local rank
    # (one process per GPU). With one process per host, this process drives all its GPUs;
    # when the launcher already bound one GPU per task, that GPU is number 0 here.
    if cluster in ("SLURM", "Open MPI") and gpus and gpus.count:
        if _tasks_per_host(environ) == 1:
            kwargs["local_device_ids"] = list(range(gpus.count))
        elif gpus.count == 1:
            kwargs["local_device_ids"] = [0]
    return kwargs


def initialize_distributed(cfg: DevicesConfig, gpus: GpuChoice | None = None,
                           environ: MutableMapping[str, str] = os.environ) -> str | None:
    """Starts jax.distributed when the config or environment asks for it.

    Returns a one-line description of the job it joined, or None for a single process.
    """
    kwargs = distributed_arguments(cfg, gpus, environ)
    if kwargs is None:
        return None
    import jax  # only now: the GPU choice above has already set CUDA_VISIBLE_DEVICES

    try:
        jax.distributed.initialize(**kwargs)
    except (ValueError, RuntimeError) as error:
        raise ConfigError(
            f"jax.distributed.initialize({kwargs}) failed: {error}. Set "
            f"devices.coordinator_address, devices.num_processes and devices.process_id "
            f"(or JAX_COORDINATOR_ADDRESS), or devices.distributed='off' for one process."
        ) from error
    source = cluster_in_environment(environ) or "explicit coordinator"
    return f"process {jax.process_index()} of {jax.process_count()} ({source})"
