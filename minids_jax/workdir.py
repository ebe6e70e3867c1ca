"""A run's directory, without JAX: checked before anything is built, held by one run at a
time, and read before JAX starts (its complete checkpoints, their saved JSON items).

    path = writable_directory(workdir, "--workdir")   # a WorkdirError now, not after a compile
    with WorkdirLock(path): ... train ...
    complete_steps(checkpoints_dir)                   # [0, 100, ...]: finished saves only

The lock is an advisory `flock` on `<workdir>/run.lock`, which also records who holds it
(host, pid, command, since when). The kernel drops it when its process dies however it dies,
so a run killed with kill -9 leaves nothing to clean up and the next run takes over at once.
Within one process the lock is re-entrant: a notebook or a test may make one trainer after
another on the same workdir. On filesystems without flock support (some network mounts) the
run goes on unlocked, with a warning.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import pathlib
import shlex
import socket
import sys
import threading
import time
import weakref

from absl import logging

from minids_jax.errors import UserError

LOCK_FILE = "run.lock"
CHECKPOINTS = "checkpoints"  # a run's checkpoints: <workdir>/checkpoints/<step>/<item>/
SAVED_ITEM = "metadata"  # the file of an orbax JSON item: <step>/config/metadata
# What kinds of instruction records a run trained on ({"alpaca": n, "chat": m}): generate.py
# --chat warns when a model never saw chat turns.
RECORDS_FILE = "records.json"
CONFIG_FILE = "config.json"  # the run's config as it last ran (training and generate.py read it)


class WorkdirError(UserError):
    """A workdir (or --out directory) is not a writable directory, or another run holds it."""


def write_atomic(path: str | os.PathLike, content: str | bytes) -> None:
    """Writes via a temporary file and a rename, so readers never see half a file."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(content.encode() if isinstance(content, str) else content)
    os.replace(tmp, path)


def read_records(workdir: str | os.PathLike) -> dict[str, int]:
    """The run's RECORDS_FILE ({} when it trained on no instruction data)."""
    path = pathlib.Path(workdir) / RECORDS_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def saved_compile_cache(workdir: str | os.PathLike) -> str:
    """The run's devices.compile_cache, from its CONFIG_FILE: where programs compiled for it
    are kept ('auto' when the run has none)."""
    try:
        saved = json.loads((pathlib.Path(workdir) / CONFIG_FILE).read_text())
        return str(saved["devices"]["compile_cache"])
    except (OSError, ValueError, KeyError, TypeError):
        return "auto"


def complete_steps(directory: str | os.PathLike) -> list[int]:
    """The steps with a finished checkpoint in a local checkpoints directory, ascending (orbax
    names a save's directory by its step only once it is complete); [] if there is none.
    Once JAX is up, orbax's own listing is the authority, and the only one for remote paths."""
    try:
        return sorted(int(p.name) for p in pathlib.Path(directory).iterdir()
                      if p.name.isdigit())
    except OSError:
        return []


def latest_checkpoint(path: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete checkpoint of a workdir, its checkpoints/ directory or a step
    directory (itself); None if there is none."""
    path = pathlib.Path(path)
    if (path / CHECKPOINTS).is_dir():
        path = path / CHECKPOINTS
    if path.name.isdigit() and (path / "config").is_dir():
        return path
    steps = [step for step in complete_steps(path)
             if (path / str(step) / "config" / SAVED_ITEM).exists()]
    return path / str(steps[-1]) if steps else None


def read_saved_item(step_dir: str | os.PathLike, item: str) -> dict:
    """A checkpoint's JSON item (config, meta) read as a file, without orbax. OSError or
    ValueError if it cannot be read."""
    return json.loads((pathlib.Path(step_dir) / item / SAVED_ITEM).read_text())


def is_remote(path) -> bool:
    return "://" in str(path)  # gs://, s3://: checked and locked by nobody here


def writable_directory(path, what: str = "--workdir") -> pathlib.Path:
    """`path` as an absolute directory that exists and can be written, created if missing."""
    if is_remote(path):
        return path
    path = pathlib.Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"{what} {path} is a file, not a directory; pass a directory (it is "
                           f"created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise WorkdirError(f"{what} {path} cannot be written ({error.strerror}); choose a "
                           f"directory you can write to, or fix its permissions.") from error
    return path


def _holder_record() -> dict:
    return {"host": socket.gethostname(), "pid": os.getpid(), "since": time.time(),
            "command": shlex.join([os.path.basename(sys.executable), *sys.argv])}


def _describe(record: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.get("since", 0)))
    return (f"process {record.get('pid', '?')} on host {record.get('host', '?')} (since "
            f"{since}: {record.get('command', '?')})")


class WorkdirLock:
    """Holds `<workdir>/run.lock` from `acquire()` (or `with`) until `release()`."""

    _held: dict[str, list] = {}  # path -> [fd, holders] for the locks this process holds
    _guard = threading.Lock()

    def __init__(self, workdir):
        self.path = os.path.join(os.fspath(workdir), LOCK_FILE)
        self.held = False

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock or raises WorkdirError naming the run that holds it."""
        if self.held:
            return
        with self._guard:
            entry = self._held.get(self.path)
            if entry is None:
                fd = self._lock_file()
                if fd is None:
                    return
                entry = self._held[self.path] = [fd, 0]
            entry[1] += 1
        self.held = True
        self._finalizer = weakref.finalize(self, WorkdirLock._drop, self.path)  # if not released

    def _lock_file(self) -> int | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            holder = self._read_holder(fd)
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EACCES):
                workdir = os.path.dirname(self.path)
                raise WorkdirError(
                    f"workdir {workdir} is in use by {holder}. Wait for that run to finish or "
                    f"stop it (it saves on SIGTERM), or use another --workdir.") from None
            logging.warning("cannot lock %s (%s): this filesystem has no flock; nothing stops "
                            "a second run on this workdir.", self.path, error.strerror)
            return None
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_record()).encode(), 0)
        return fd

    @staticmethod
    def _read_holder(fd: int) -> str:
        try:
            return _describe(json.loads(os.pread(fd, 4096, 0).decode()))
        except (OSError, ValueError):
            return "another process (it has not written its name yet)"

    def release(self) -> None:
        if self.held:
            self.held = False
            self._finalizer()  # runs _drop once

    @classmethod
    def _drop(cls, path: str) -> None:
        with cls._guard:
            entry = cls._held.get(path)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1] == 0:
                del cls._held[path]
                os.close(entry[0])  # closing the last descriptor releases the flock
