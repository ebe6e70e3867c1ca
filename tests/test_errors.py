"""A user's mistakes at the entry points: one `error:` line naming the fix, exit status 2, no
traceback, and found before any model is built. Each case runs the real command."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.factories import assert_user_error, config_file, run_command, tiny_config

pytestmark = pytest.mark.slow  # subprocesses: each case runs an entry point


def test_config_file_mistakes_name_the_file(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def get_config(:\n")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    assert_user_error(run_command(["train.py", "--config", "configs/nope.py"]),
                      "configs/nope.py does not exist", "tiny.py")
    assert_user_error(run_command(["train.py", f"--config={broken}"]), str(broken), "line 1")
    assert_user_error(run_command(["train.py", "--config", str(empty)]), str(empty),
                      "get_config()")


@pytest.mark.parametrize("override, fragments", [
    ("--config.model.d_modle=128", ["model has no field 'd_modle'", "did you mean 'd_model'"]),
    ("--config.modle.d_model=128", ["no config group 'modle'", "did you mean 'model'"]),
    ("--config.model.dtype=bfloat16", ["it is now --config.compute.dtype"]),
    ("--config.model.d_model=wide", ["--config.model.d_model", "wide"]),
    ("--config.model.n_heads=3", ["not divisible by model.n_heads=3"]),
    ("--wrkdir=runs/x", ["wrkdir", "--helpshort"]),
])
def test_flag_mistakes(override, fragments):
    assert_user_error(run_command(["train.py", "--config", "configs/tiny.py", override]),
                      *fragments)


def test_flag_mistakes_without_a_config_flag():
    """The default config file is checked as a given one is."""
    assert_user_error(run_command(["train.py", "--config.model.d_modle=128"]),
                      "did you mean 'd_model'")
    assert_user_error(run_command(["-m", "minids_jax.inspect", "--devices", "0"]), "devices")


def test_workdir_mistakes_come_before_the_model(tmp_path):
    config = config_file(tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    result = run_command(["train.py", "--config", config, "--workdir", str(a_file)])
    assert_user_error(result, str(a_file), "is a file")
    assert "parameters" not in result.stdout + result.stderr  # nothing was built

    if os.geteuid() != 0:  # root writes anywhere: only a read-only mount would stop it
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o555)
        assert_user_error(run_command(["train.py", "--config", config, "--workdir",
                                       str(read_only / "run")]), "cannot be written")


def test_data_and_checkpoint_mistakes(tmp_path):
    config = config_file(tmp_path)
    assert_user_error(run_command(["train.py", "--config", "configs/tiny.py",
                                   "--config.data.source=text",
                                   f"--config.data.path={tmp_path / 'missing.txt'}"]),
                      "data.path=", "does not exist")
    assert_user_error(run_command(["train.py", "--config", config, "--workdir",
                                   str(tmp_path / "run"),
                                   f"--config.checkpoint.init_from={tmp_path / 'nothing'}"]),
                      "no such checkpoint or workdir")
    assert_user_error(run_command(["generate.py", "--workdir", str(tmp_path / "nothing")]),
                      "no such checkpoint or workdir")


def test_generate_refuses_bad_sampling_flags(trained_run):
    _, _, workdir = trained_run
    assert_user_error(run_command(["generate.py", "--workdir", str(workdir),
                                   "--max_new_tokens", "-5"]),
                      "max_new_tokens", "not a positive integer")
    assert_user_error(run_command(["generate.py", "--workdir", str(workdir),
                                   "--temperature", "-1"]), "temperature")
    assert_user_error(run_command(["generate.py", "--workdir", str(workdir), "--step", "999"]),
                      "no checkpoint of step 999")


def test_prepare_checks_out_before_reading_the_corpus(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    result = run_command(["-m", "minids_jax.prepare", "--config", "configs/tiny.py",
                          "--out", str(a_file)])
    assert_user_error(result, "--out", "is a file")
    assert "corpus" not in result.stdout + result.stderr


def test_resuming_past_total_steps_is_an_error(trained_run, tmp_path):
    _, _, workdir = trained_run
    config = config_file(tmp_path, tiny_config(optim=dict(total_steps=3)))
    saved = json.loads((workdir / "config.json").read_text())
    shutil.copytree(workdir, tmp_path / "copy")
    assert_user_error(run_command(["train.py", "--config", config, "--workdir",
                                   str(tmp_path / "copy")]),
                      "past optim.total_steps=3", "raise --config.optim.total_steps above 6")
    assert json.loads((tmp_path / "copy" / "config.json").read_text()) == saved  # untouched
