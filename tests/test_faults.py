"""Faults around a run: a second run on its workdir, a full disk, a second Ctrl-C."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from minids_jax.checkpoint import store
from minids_jax.workdir import LOCK_FILE, WorkdirError, WorkdirLock, writable_directory
from tests.factories import (REPO, SLOW_TRAIN, assert_user_error, config_file, read_until,
                             run_command, subprocess_env, tiny_config)

pytestmark = pytest.mark.slow  # subprocesses: train.py, or a workdir held by another process

HOLDER = textwrap.dedent("""
    import sys, time
    from minids_jax.workdir import WorkdirError, WorkdirLock
    lock = WorkdirLock(sys.argv[1])
    try:
        lock.acquire()
    except WorkdirError:
        sys.exit("refused")
    print("held", flush=True)
    time.sleep(600)
""")


def hold_in_another_process(workdir) -> subprocess.Popen | None:
    """A process that holds the workdir's lock until killed; None if it was refused."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=REPO,
                              env=subprocess_env(""), stdout=subprocess.PIPE, text=True)
    if holder.stdout.readline().strip() == "held":
        return holder
    holder.wait()
    return None


def test_a_held_workdir_is_refused_and_a_dead_holder_is_taken_over(tmp_path):
    holder = hold_in_another_process(tmp_path)
    try:
        with pytest.raises(WorkdirError) as error:
            WorkdirLock(tmp_path).acquire()
        assert f"process {holder.pid} on host {socket.gethostname()}" in str(error.value)
        assert "another --workdir" in str(error.value)
    finally:
        holder.kill()  # SIGKILL: no clean-up of any kind
        holder.wait()
    with WorkdirLock(tmp_path) as lock:  # taken over, nothing to remove by hand
        assert lock.held
        assert f'"pid": {os.getpid()}' in (tmp_path / LOCK_FILE).read_text()


def test_the_lock_is_reentrant_within_a_process_and_released_after(tmp_path):
    first, second = WorkdirLock(tmp_path), WorkdirLock(tmp_path)
    first.acquire()
    second.acquire()  # e.g. a second Trainer on the same workdir in a notebook
    first.release()
    assert hold_in_another_process(tmp_path) is None  # still held by `second`
    second.release()
    holder = hold_in_another_process(tmp_path)
    assert holder is not None
    holder.kill()


def test_a_second_train_py_is_refused_and_deletes_nothing(tmp_path):
    """Also a resume: it must not clean up the temporary directory of a save in flight."""
    workdir = tmp_path / "run"
    in_flight = workdir / store.CHECKPOINTS / "7.orbax-checkpoint-tmp-1733000000"
    in_flight.mkdir(parents=True)
    (in_flight / "data").write_bytes(b"being written")
    holder = hold_in_another_process(workdir)
    try:
        result = run_command(["train.py", "--config", config_file(tmp_path), "--workdir",
                              str(workdir)])
    finally:
        holder.kill()
        holder.wait()
    assert_user_error(result, f"is in use by process {holder.pid}", "another --workdir")
    assert (in_flight / "data").read_bytes() == b"being written"


def test_writable_directory_names_the_problem(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkdirError, match="is a file, not a directory"):
        writable_directory(tmp_path / "file")
    with pytest.raises(WorkdirError, match="cannot be written"):
        writable_directory(tmp_path / "file" / "below")
    assert writable_directory(tmp_path / "new" / "run").is_dir()


# Runs the command after it with writes past 100 kB failing with EFBIG. (A wrapper that
# exec()s, not a preexec_fn: forking this multithreaded process could deadlock.)
LIMIT_FILE_SIZE = ("import os, resource, signal, sys; "
                   "resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)); "
                   "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                   "os.execv(sys.argv[1], sys.argv[1:])")


def _can_mount_tmpfs(tmp_path) -> bool:
    target = tmp_path / "probe"
    target.mkdir()
    probe = subprocess.run(["unshare", "-rm", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {target}"], capture_output=True)
    return shutil.which("unshare") is not None and probe.returncode == 0


@pytest.mark.parametrize("fault", ["small filesystem", "file size limit"])
def test_a_failed_save_stops_the_run_at_that_save(tmp_path, fault):
    """A small tmpfs gives a real ENOSPC where user namespaces allow a mount; a file size
    limit (EFBIG) works everywhere. Each saved checkpoint is about 600 kB; under the limit,
    the embedding alone is 130 kB (data files of the checkpoint may be smaller than it)."""
    vocab = dict(vocab_size=1024) if fault == "file size limit" else {}
    config = config_file(tmp_path, tiny_config(checkpoint=dict(every=2), model=vocab))
    workdir = tmp_path / "run"
    command = [sys.executable, "train.py", "--config", config, "--workdir", str(workdir)]
    if fault == "small filesystem":
        if not _can_mount_tmpfs(tmp_path):
            pytest.skip("cannot mount a tmpfs here (no user namespaces)")
        disk = workdir / store.CHECKPOINTS
        disk.mkdir(parents=True)
        script = f"mount -t tmpfs -o size=1400k tmpfs {disk} && exec {' '.join(command)}"
        result = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=REPO, text=True,
                                capture_output=True, env=subprocess_env(""), timeout=240)
        failed, reason = 6, "No space left on device"  # two ~600 kB checkpoints fit
    else:
        result = subprocess.run([sys.executable, "-c", LIMIT_FILE_SIZE, *command], cwd=REPO,
                                text=True, capture_output=True, env=subprocess_env(""),
                                timeout=240)
        failed, reason = None, "File too large"  # the first save writing over 100 kB to a file
    last = assert_user_error(result, "saving the checkpoint of step", reason, "MiB free there")
    step = int(re.search(r"saving the checkpoint of step (\d+) to", last).group(1))
    assert step == failed if failed is not None else step in (2, 4, 6), last
    if step > 2:  # the saves before it were complete, and the message points at the last one
        assert f"the last complete checkpoint is {workdir}/checkpoints/{step - 2}" in last
    elif fault == "file size limit" and step == 2:
        assert "no checkpoint was completed" in last
    assert len(result.stderr.strip().splitlines()) < 10, result.stderr  # no log flood
    if fault == "small filesystem":  # gone with the namespace; the last complete one is kept
        assert str(workdir) in last


def test_a_second_ctrl_c_exits_at_once_without_a_traceback(tmp_path):
    runner = tmp_path / "slow_train.py"
    runner.write_text(SLOW_TRAIN.format(train=str(REPO / "train.py")))
    config = config_file(tmp_path, tiny_config(optim=dict(total_steps=50)))
    process = subprocess.Popen([sys.executable, str(runner), "--config", config, "--workdir",
                                str(tmp_path / "run")], cwd=REPO, env=subprocess_env(""),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = read_until(process, "step 1/50")
    time.sleep(0.5)  # into the next step's 5 seconds
    process.send_signal(signal.SIGINT)
    lines += read_until(process, "SIGINT received")
    process.send_signal(signal.SIGINT)  # within the 5-second step: before it could save
    output = "".join(lines) + process.communicate(timeout=60)[0]
    assert process.returncode == 130, output
    assert "Traceback" not in output and "KeyboardInterrupt" not in output, output
    assert output.strip().splitlines()[-1].startswith("error: interrupted"), output
    assert not (tmp_path / "run" / store.CHECKPOINTS).exists() or not any(
        p.name.isdigit() for p in (tmp_path / "run" / store.CHECKPOINTS).iterdir())
