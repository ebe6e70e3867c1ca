"""Mesh layouts on 8 simulated CPU devices: same step as one device, sharded state, memory.

The 8-device work runs once, in a subprocess (tests/mesh_worker.py), so this pytest process
keeps its single device; the validation tests build meshes from fake device lists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from minids_jax import sharding
from minids_jax.config import ConfigError, MeshConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
import mesh_worker  # noqa: E402  (the configs the worker uses)


@pytest.fixture(scope="module")
def mesh_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("meshes")
    env = {**os.environ, "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "mesh_worker.py"),
                           "meshes", str(out)], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    states = {name: dict(np.load(out / f"{name}.npz")) for name in report}
    return report, states


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", list(mesh_worker.MESHES))
def test_one_step_matches_one_device(mesh_runs, mesh_name):
    report, states = mesh_runs
    ref, run = states["one_device"], states[mesh_name]
    np.testing.assert_allclose(report[mesh_name]["loss"], report["one_device"]["loss"], rtol=1e-5)
    assert set(run) == set(ref)
    params = [p for p in ref if p.startswith(".model") and not p.endswith("['bias']")]
    moments = [p for p in ref if "['mu']" in p or "['nu']" in p]
    assert len(params) > 10 and len(moments) == 2 * len(params)  # the router biases have none
    for path in ref:
        np.testing.assert_allclose(run[path], ref[path], rtol=1e-5, atol=1e-6, err_msg=path)
    # The step really moved the parameters (a step that dropped the update would also "match").
    assert int(ref[".optimizer['step']"]) == 1
    assert report[mesh_name]["mesh"] == {**{"data": 1, "fsdp": 1, "tensor": 1, "expert": 1},
                                         **mesh_worker.MESHES[mesh_name]}


@pytest.mark.slow
@pytest.mark.parametrize("mesh_name", mesh_worker.LORA_MESHES)
def test_a_lora_step_matches_one_device_and_fsdp_shards_the_frozen_base(mesh_runs, mesh_name):
    report, states = mesh_runs
    ref, run = states["lora_one_device"], states[f"lora_{mesh_name}"]
    np.testing.assert_allclose(report[f"lora_{mesh_name}"]["loss"],
                               report["lora_one_device"]["loss"], rtol=1e-5)
    assert set(run) == set(ref)
    for path in ref:
        np.testing.assert_allclose(run[path], ref[path], rtol=1e-5, atol=1e-6, err_msg=path)
    # The optimizer holds the adapters' moments only; the step moved them.
    moments = [p for p in ref if "['mu']" in p]
    assert moments and all("lora" in p for p in moments)
    assert any(np.abs(ref[p]).max() > 0 for p in ref if p.endswith("lora_b']"))
    if mesh_name == "fsdp8":  # the frozen base weights are split like a trained model's
        shards = report["lora_fsdp8"]["shards"]
        base = [p for p in shards if p.startswith(".model") and "lora" not in p
                and shards[p]["spec"].count("'fsdp'") == 1]
        assert len(base) > 10
        assert all(shards[p]["device_size"] * 8 == shards[p]["size"] for p in base)


@pytest.mark.slow
def test_a_qlora_step_on_fsdp8_matches_one_device_with_the_nf4_base_split_like_its_weights(
        mesh_runs):
    report, states = mesh_runs
    ref, run = states["qlora_one_device"], states["qlora_fsdp8"]
    np.testing.assert_allclose(report["qlora_fsdp8"]["loss"], report["qlora_one_device"]["loss"],
                               rtol=1e-5)
    assert set(run) == set(ref)
    for path in ref:
        np.testing.assert_allclose(run[path], ref[path], rtol=1e-5, atol=1e-6, err_msg=path)
    shards = report["qlora_fsdp8"]["shards"]
    codes = [p for p in shards if p.endswith("['codes']")]
    assert any("['moe']['w1']" in p for p in codes) and any("['attn']" in p for p in codes)
    # Codes and block maxima are split over fsdp as their weights are.
    split = [p for p in shards if p.endswith(("['codes']", "['absmax']"))
             and "'fsdp'" in shards[p]["spec"]]
    assert len(split) == 2 * len(codes)
    assert all(shards[p]["device_size"] * 8 == shards[p]["size"] for p in split)


@pytest.mark.slow
@pytest.mark.parametrize("family, mesh_name", [
    (family, mesh) for family, meshes in mesh_worker.FAMILY_MESHES.items() for mesh in meshes])
def test_each_family_steps_on_its_meshes_as_on_one_device(mesh_runs, family, mesh_name):
    """GQA's KV heads split over tensor, biases and a tied head split over fsdp, V2's softmax
    group-limited routing over expert: each mesh gives one device's loss and update."""
    report, states = mesh_runs
    ref, run = states[f"{family}_one_device"], states[f"{family}_{mesh_name}"]
    np.testing.assert_allclose(report[f"{family}_{mesh_name}"]["loss"],
                               report[f"{family}_one_device"]["loss"], rtol=1e-5)
    assert set(run) == set(ref)
    for path in ref:
        np.testing.assert_allclose(run[path], ref[path], rtol=1e-5, atol=1e-6, err_msg=path)
    shards = report[f"{family}_{mesh_name}"]["shards"]
    if family == "llama":
        assert not any("head" in p and "kernel" in p for p in shards)  # tied: no head matrix
        biases = [p for p in ref if p.startswith(".model") and p.endswith("['bias']")]
        assert len(biases) >= 2 * 5 and all(np.abs(ref[p]).max() > 0 for p in biases)
        if mesh_name == "data2_fsdp2_tensor2":  # the 2 KV heads: one per tensor shard
            keys = [p for p in shards if "['k']['kernel']" in p]
            assert keys and all(shards[p]["device_size"] * 4 == shards[p]["size"] for p in keys)
    else:
        assert not any(p.endswith("['moe']['bias']") for p in ref)  # V2: no selection bias
        if mesh_name == "data2_expert4":
            experts = [p for p in shards if "['moe']['w1']" in p and p.startswith(".model")]
            assert experts and all(shards[p]["device_size"] * 4 == shards[p]["size"]
                                   for p in experts)


@pytest.mark.slow
def test_fsdp_holds_one_eighth_of_each_weight_and_moment(mesh_runs):
    report, _ = mesh_runs
    shards = report["fsdp8"]["shards"]
    matrices = {p: s for p, s in shards.items() if s["spec"].count("'fsdp'") == 1}
    # Every weight matrix of the model, and both AdamW moments of each, are split 8 ways.
    weights = [p for p in shards if p.startswith(".model") and "scale" not in p
               and "bias" not in p]
    assert weights and all(p in matrices for p in weights), set(weights) - set(matrices)
    for path in weights:
        inside = path.removeprefix(".model")
        for variant in (path, ".optimizer['opt_state'][1][0]['mu']" + inside,
                        ".optimizer['opt_state'][1][0]['nu']" + inside):
            entry = shards[variant]
            assert entry["device_size"] * 8 == entry["size"], (variant, entry)
    # Norm gains and router biases are tiny and replicated.
    assert any(path.endswith("['bias']") for path in shards)
    for path, entry in shards.items():
        if path.endswith("['scale']") or path.endswith("['bias']"):
            assert entry["device_size"] == entry["size"], path
    # Under pure data parallelism nothing is split.
    assert all(s["device_size"] == s["size"] for s in report["data8"]["shards"].values())


@pytest.mark.slow
def test_fsdp_compiled_state_memory_is_well_below_data_parallel(mesh_runs):
    report, _ = mesh_runs
    data_bytes = report["data8"]["argument_bytes"]
    fsdp_bytes = report["fsdp8"]["argument_bytes"]
    print(f"\nper-device step arguments (model + optimizer state + batch): "
          f"data=8 {data_bytes:,} B, fsdp=8 {fsdp_bytes:,} B")
    # State is ~all of the arguments; only the norm gains and the batch rows are not split.
    assert fsdp_bytes < data_bytes / 6


@pytest.mark.slow
def test_data_parallel_step_keeps_every_token_on_its_device(mesh_runs):
    # Pure data parallelism needs only the gradient all-reduce. An all-gather means some
    # activation (the MoE's global top-k / sort did this) went whole onto every device.
    report, _ = mesh_runs
    assert report["data8"]["all_gathers"] == 0
    assert report["fsdp8"]["all_gathers"] > 0  # FSDP does gather its weights


def _fake_mesh(**sizes):
    """A mesh of the given sizes without devices: the layout checks read only its shape."""
    return jax.sharding.AbstractMesh(
        tuple(sizes.get(a, 1) for a in sharding.MESH_AXES), sharding.MESH_AXES)


def _config(mesh: dict, **overrides):
    return mesh_worker.tiny_config(mesh, **overrides)


@pytest.mark.parametrize("mesh, overrides, message", [
    (dict(data=4, fsdp=2), dict(train=dict(batch_size=12)), "train.batch_size=12"),
    (dict(data=2, tensor=4), dict(model=dict(n_heads=2, d_model=32)), "model.n_heads=2"),
    (dict(data=1, expert=8), {}, "model.n_experts=4"),
])
def test_layout_errors_name_the_field_and_the_fix(mesh, overrides, message):
    config = _config(mesh, **overrides)
    with pytest.raises(ConfigError, match=message) as error:
        sharding.check_layout(config, _fake_mesh(**mesh))
    assert "multiple of" in str(error.value)


def test_layout_accepts_divisible_sizes():
    sharding.check_layout(_config(dict(data=2, fsdp=2, tensor=2)),
                          _fake_mesh(data=2, fsdp=2, tensor=2))


@pytest.mark.parametrize("sizes, devices, message", [
    (dict(data=3, fsdp=2), 8, "has 6 devices but 8 are available"),
    (dict(data=-1, fsdp=3), 8, "does not divide the 8 devices"),
])
def test_mesh_sizes_must_cover_the_devices(sizes, devices, message):
    with pytest.raises(ConfigError, match=message):
        sharding.resolve_axis_sizes(MeshConfig(**sizes), devices)


def test_minus_one_fills_the_remaining_devices():
    assert sharding.resolve_axis_sizes(MeshConfig(data=-1, fsdp=2, tensor=2), 8) == {
        "data": 2, "fsdp": 2, "tensor": 2, "expert": 1}


def test_indivisible_weight_names_the_array():
    # A vocabulary of 63 cannot be split over tensor=2; 32 over fsdp=2 can.
    abstract = {"embedding": jax.ShapeDtypeStruct((63, 32), np.float32)}
    shardings = {"embedding": jax.sharding.NamedSharding(
        _fake_mesh(tensor=2, fsdp=2), jax.sharding.PartitionSpec("tensor", "fsdp"))}
    with pytest.raises(ConfigError, match=r"embedding.*dimension 0 \(size 63\).*mesh.tensor=2"):
        sharding.check_divisible(abstract, shardings)
