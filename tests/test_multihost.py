"""A real two-process JAX job on 127.0.0.1 (gloo collectives, 4 simulated devices each)
trains exactly like one process with 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "mesh_worker.py")
STEPS = 3
TIMEOUT_S = 300

pytestmark = pytest.mark.slow  # subprocesses: two JAX processes and an 8-device one


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(args, out_dir, tag):
    log = open(os.path.join(out_dir, f"{tag}.log"), "w")
    proc = subprocess.Popen([sys.executable, WORKER, *map(str, args)], cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": ROOT}, stdout=log,
                            stderr=subprocess.STDOUT, text=True)
    return proc, log


def _wait_all(procs, timeout_s):
    """Waits for every process; on a failure or timeout kills the rest, never leaving any."""
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.poll() is None for p, _ in procs):
            if any(p.poll() not in (None, 0) for p, _ in procs):
                break  # one failed: the others would hang waiting for it
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            log.close()
    return [p.returncode for p, _ in procs]


def test_two_processes_train_like_one_process_with_eight_devices(tmp_path):
    port = _free_port()
    procs = [_start(["process", tmp_path, i, 2, port, 4, STEPS], tmp_path, f"process{i}")
             for i in range(2)]
    procs.append(_start(["single", tmp_path, 8, STEPS], tmp_path, "single"))
    codes = _wait_all(procs, TIMEOUT_S)
    tags = ("process0", "process1", "single")
    logs = {tag: (tmp_path / f"{tag}.log").read_text() for tag in tags}
    assert codes == [0, 0, 0], "\n\n".join(f"--- {t}\n{text[-3000:]}" for t, text in logs.items())

    results = {tag: json.loads((tmp_path / f"{tag}.json").read_text()) for tag in logs}
    for i in range(2):
        job = results[f"process{i}"]
        assert job["process_index"] == i and job["process_count"] == 2
        assert job["local_device_count"] == 4 and job["device_count"] == 8
        assert job["rows"] == [4 * i, 4 * i + 4]  # each process builds only its half
    assert results["single"]["process_count"] == 1 and results["single"]["device_count"] == 8
    assert results["single"]["job"] is None  # no coordinator, no cluster: one process
    assert results["single"]["rows"] == [0, 8]

    single, multi = results["single"], results["process0"]
    assert len(single["losses"]) == STEPS
    np.testing.assert_allclose(multi["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(results["process1"]["losses"], single["losses"], rtol=1e-5)
    np.testing.assert_allclose(multi["eval_loss"], single["eval_loss"], rtol=1e-5)
    # The losses move, so equal lists mean equal training, not two stuck runs.
    assert len(set(np.round(single["losses"], 6))) > 1
    # Only process 0 prints the run's lines: devices, processes, mesh, tokens/s per device.
    assert "devices: 8 in 2 process(es) | mesh: {'data': 8," in logs["process0"]
    assert f"step {STEPS}/{STEPS}" in logs["process0"] and "/device)" in logs["process0"]
    assert "step " not in logs["process1"] and "devices:" not in logs["process1"]
