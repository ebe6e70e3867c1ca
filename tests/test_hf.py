"""Hugging Face DeepSeek-V3 checkpoints: export then import is bitwise, the layout and config
mappings, and clear errors for directories that cannot be imported or models that cannot be
exported. (test_hf_fixture.py compares against transformers' numbers.)"""

from __future__ import annotations

import json
import shutil
import math
import pathlib

import jax
import numpy as np
import pytest
from flax import nnx

from minids_jax import checkpoint
from minids_jax.errors import UserError
from minids_jax.hf import config as hf_config
from minids_jax.hf import convert, weights
from minids_jax.hf.files import TensorFiles
from minids_jax.model import MiniDeepSeek
from minids_jax.model.rotary import Rope
from tests.factories import V3_MODEL, compute_config, small_model_config, tiny_config

def saved_run(workdir: pathlib.Path, **model) -> dict:
    """A run directory holding a random model whose norms and router biases are not their
    initial values (a mapping that mixes them up shows); returns its flat parameters."""
    config = tiny_config(model={**V3_MODEL, **model})
    state = nnx.to_pure_dict(nnx.state(MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(0))))
    keys = iter(jax.random.split(jax.random.key(1), 1000))
    state = jax.tree_util.tree_map_with_path(
        lambda path, x: x + 0.1 * jax.random.normal(next(keys), x.shape)
        if str(path[-1].key) in ("scale", "bias") else x, state)
    checkpoint.save_model(workdir, config, state)
    return convert.flat_paths(state)


def test_export_then_import_is_bitwise(tmp_path):
    params = saved_run(tmp_path / "run")
    convert.export_run(tmp_path / "run", tmp_path / "hf", dtype="float32", log=lambda _: None)
    files = TensorFiles(tmp_path / "hf")
    assert files.shape("model.layers.1.mlp.experts.3.down_proj.weight") == (32, 16)  # [D, F]
    assert files.shape("model.layers.3.eh_proj.weight") == (32, 64)  # the MTP layer's
    assert "model.layers.3.shared_head.head.weight" in files  # as the hub files have it
    config = convert.import_dir(tmp_path / "hf", tmp_path / "back", tiny_config(),
                                log=lambda _: None)
    # Equal in every field the format has (MHLA's latent_k, say, is not one).
    assert hf_config.to_hf(config.model) == hf_config.to_hf(tiny_config(model=V3_MODEL).model)
    back = convert.flat_paths(checkpoint.load_params(tmp_path / "back"))
    assert back.keys() == params.keys()
    for path, array in params.items():
        np.testing.assert_array_equal(back[path], array, err_msg=str(path))


def test_large_exports_are_sharded_with_an_index(tmp_path):
    saved_run(tmp_path / "run", mtp_depth=0)
    written = convert.export_run(tmp_path / "run", tmp_path / "hf", dtype="bfloat16",
                                 max_shard_bytes=20_000, log=lambda _: None)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and all(name in written for name in shards)
    files = TensorFiles(tmp_path / "hf")
    assert str(files["model.layers.0.self_attn.o_proj.weight"].dtype) == "bfloat16"
    # The router stays float32, as transformers keeps it.
    assert files["model.layers.1.mlp.gate.weight"].dtype == np.float32
    convert.import_dir(tmp_path / "hf", tmp_path / "back", tiny_config(), log=lambda _: None)


def test_the_streamed_shards_are_what_the_safetensors_library_reads(tmp_path):
    """files.save writes the format by hand (a tensor at a time); the library must agree."""
    import ml_dtypes
    from safetensors import safe_open

    from minids_jax.hf import files

    rng = np.random.default_rng(0)
    tensors = {"a": rng.normal(size=(3, 5)).astype(np.float32),
               "b": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16),
               "c": np.arange(6, dtype=np.int32).reshape(2, 3),
               "d": rng.normal(size=(2, 2)).astype(np.float16), "e": np.zeros((0,), np.float32)}
    written = files.save(tensors.items(), tmp_path, max_shard_bytes=64)
    assert written[-1] == files.INDEX_FILE and len(written) > 2
    for name in written[:-1]:
        assert oct((tmp_path / name).stat().st_mode & 0o044) == oct(0o044)  # others may read
        with safe_open(tmp_path / name, framework="flax") as opened:
            assert opened.metadata() == {"format": "pt"}
            for key in opened.keys():
                np.testing.assert_array_equal(np.asarray(opened.get_tensor(key)), tensors[key])
    index = json.loads((tmp_path / files.INDEX_FILE).read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert not list(tmp_path.glob("*.spool")) and not list(tmp_path.glob(".shard-*"))


def test_fused_expert_tensors_load_like_per_expert_ones(tmp_path):
    from safetensors.numpy import save_file

    params = saved_run(tmp_path / "run", mtp_depth=0)
    convert.export_run(tmp_path / "run", tmp_path / "hf", dtype="float32", log=lambda _: None)
    files = TensorFiles(tmp_path / "hf")
    tensors = {name: np.array(files[name]) for name in files.names()}
    for layer in (1, 2):
        prefix = f"model.layers.{layer}.mlp.experts."
        experts = [[tensors.pop(f"{prefix}{e}.{part}.weight") for e in range(4)]
                   for part in ("gate_proj", "up_proj", "down_proj")]
        tensors[prefix + "gate_up_proj"] = np.stack(
            [np.concatenate([g, u]) for g, u in zip(experts[0], experts[1])])  # [E, 2F, D]
        tensors[prefix + "down_proj"] = np.stack(experts[2])  # [E, D, F]
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_file(tensors, str(tmp_path / "hf" / "model.safetensors"))
    convert.import_dir(tmp_path / "hf", tmp_path / "back", tiny_config(), log=lambda _: None)
    back = convert.flat_paths(checkpoint.load_params(tmp_path / "back"))
    for path, array in params.items():
        np.testing.assert_array_equal(back[path], array, err_msg=str(path))


@pytest.mark.parametrize("scaling, amplitude", [
    # transformers: without both mscale and mscale_all_dim, attention_factor = mscale(f, 1).
    (dict(mscale_all_dim=0.707), 0.1 * math.log(40) + 1),
    (dict(mscale=0.707, mscale_all_dim=0.707), 1.0),
    (dict(mscale=1.0, mscale_all_dim=0.5), (0.1 * math.log(40) + 1) / (0.05 * math.log(40) + 1)),
    (dict(), 0.1 * math.log(40) + 1),
])
def test_yarn_fields_a_config_leaves_out_mean_what_they_mean_to_transformers(scaling, amplitude):
    hf = hf_config.to_hf(small_model_config(**V3_MODEL))
    hf["rope_scaling"] = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 8,
                          **scaling}
    fields = hf_config.from_hf(hf, "config.json")
    cfg = small_model_config(**{**V3_MODEL, **fields})
    assert Rope.of(cfg, cfg.qk_rope_head_dim).amplitude == pytest.approx(amplitude, rel=1e-6)
    # Written back, a field left out stays out: the same function for transformers.
    again = hf_config.to_hf(cfg)["rope_scaling"]
    assert ("mscale" in again) == ("mscale" in scaling)
    assert hf_config.from_hf({**hf, "rope_scaling": again}, "config.json") == fields


def test_fp8_blocks_dequantize_with_their_own_scale():
    weight = np.arange(5 * 3, dtype=np.float32).reshape(5, 3)
    scale = np.array([[1.0, 10.0], [100.0, 1000.0]], np.float32)  # blocks of 4 x 2
    expected = weight * np.array([[1, 1, 10]] * 4 + [[100, 100, 1000]])
    np.testing.assert_array_equal(weights.dequantize(weight, scale, (4, 2)), expected)


def test_models_outside_the_format_are_refused_by_name(tmp_path):
    config = tiny_config()  # the original's MHLA layers and softmax routing
    with pytest.raises(hf_config.HFFormatError, match=r"attn_pattern.*router_scoring"):
        hf_config.to_hf(config.model)


def exported(tmp_path, **model) -> pathlib.Path:
    saved_run(tmp_path / "run", **{"mtp_depth": 0, **model})
    convert.export_run(tmp_path / "run", tmp_path / "hf", dtype="float32", log=lambda _: None)
    return tmp_path / "hf"


def edit_config(directory: pathlib.Path, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


@pytest.mark.parametrize("breakage, message", [
    (lambda d: (d / "config.json").unlink(), r"has no config.json"),
    (lambda d: edit_config(d, model_type="mistral"), r"model_type is 'mistral'; the families "
                                                      r"that can be imported are llama, qwen2"),
    (lambda d: edit_config(d, hidden_act="gelu"), r"hidden_act='gelu' is not supported"),
    (lambda d: edit_config(d, num_key_value_heads=1), r"num_key_value_heads=1"),
    (lambda d: edit_config(d, rope_scaling={"type": "linear", "factor": 2.0}),
     r"rope type 'linear'"),
    (lambda d: edit_config(d, n_group=3), r"n_group=3 must divide"),
    (lambda d: edit_config(d, moe_intermediate_size=8),
     r"experts.0.gate_proj.weight has shape \(16, 32\) but config.json implies \(8, 32\)"),
    (lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes()[:-100]), r"is truncated"),
    (lambda d: (d / "model.safetensors").unlink(), r"has no \*.safetensors files"),
    (lambda d: (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-2.safetensors"}})),
     r"names tensor files that are not in"),
    (lambda d: edit_config(d, num_hidden_layers=2), r"tensors this model would not use"),
    (lambda d: (d / "tokenizer.json").write_text("{not json"), r"tokenizer cannot be used"),
])
def test_directories_that_cannot_be_imported_say_why(tmp_path, breakage, message):
    directory = exported(tmp_path)
    breakage(directory)
    with pytest.raises(UserError, match=message):
        convert.import_dir(directory, tmp_path / "back", tiny_config(), log=lambda _: None)
    assert not (tmp_path / "back" / "checkpoints").exists()  # nothing half-written


@pytest.mark.slow  # trains end to end
def test_an_imported_run_resumes_with_a_fresh_optimizer_and_trains(tmp_path):
    from minids_jax.training.trainer import Trainer

    directory = exported(tmp_path, n_layers=2)
    base = tiny_config(optim=dict(total_steps=2), checkpoint=dict(every=1))
    workdir = tmp_path / "imported"
    config = convert.import_dir(directory, workdir, base, log=lambda _: None)
    assert (workdir / "config.py").is_file()
    imported = convert.flat_paths(checkpoint.load_params(workdir))
    history = Trainer(config, str(workdir)).train()  # resumes step 0: a fresh optimizer
    assert np.isfinite([r["loss"] for r in history if "loss" in r][-1])
    trained = convert.flat_paths(checkpoint.load_params(workdir))
    assert not np.array_equal(trained[("head", "kernel")], imported[("head", "kernel")])


@pytest.mark.slow
def test_the_command_line_reports_mistakes_in_one_line(tmp_path):
    import subprocess
    import sys

    from tests.factories import REPO, subprocess_env

    def run(*args):
        return subprocess.run([sys.executable, "-m", "minids_jax.hf", *args], cwd=REPO,
                              env=subprocess_env(str(tmp_path / "cache")), capture_output=True,
                              text=True, timeout=300)

    for args, message in [
        (("import", str(tmp_path / "absent"), "--workdir", str(tmp_path / "w")),
         "is not a directory"),
        (("export", "--workdir", str(tmp_path / "w")), "export needs --out"),
        (("convert", "x"), "usage: python -m minids_jax.hf import"),
        (("make-tiny", "--family", "mistral", "--out", str(tmp_path / "t")),
         "--family='mistral' is unknown; choose from llama, qwen2, deepseek_v2, deepseek_v3"),
    ]:
        result = run(*args)
        assert result.returncode == 2, result.stderr
        assert result.stderr.startswith("error: ") and message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
    # A refused import leaves no half-made run behind (and keeps a directory it did not make).
    broken = tmp_path / "broken"
    shutil.copytree(REPO / "tests" / "fixtures" / "llama_tiny", broken)
    (broken / "config.json").write_text(json.dumps(
        {**json.loads((broken / "config.json").read_text()), "hidden_act": "gelu"}))
    result = run("import", str(broken), "--workdir", str(tmp_path / "new_run"))
    assert result.returncode == 2 and "hidden_act='gelu'" in result.stderr, result.stderr
    assert not (tmp_path / "new_run").exists()
    (tmp_path / "mine").mkdir()
    assert run("import", str(broken), "--workdir", str(tmp_path / "mine")).returncode == 2
    assert (tmp_path / "mine").is_dir()
