"""What a user sees in the first hour: how long a fine-tune is and whether that is enough, a
quiet start, a practice model of each family."""

from __future__ import annotations

import json
import logging

import pytest

from minids_jax import cli
from minids_jax.training.trainer import steps_for_epochs
from tests.factories import tiny_config


class Examples:
    def __init__(self, count):
        self.count = count

    def __len__(self):
        return self.count


class FakeSource:
    """An instruction source's shape: examples per split and the rows they pack into."""

    def __init__(self, train, val, rows):
        self.splits = {"train": Examples(train), "val": Examples(val)}
        self.rows = {"train": [[i] for i in range(rows)], "val": []}


@pytest.mark.parametrize("train, batch, warmup, steps, warnings", [
    (392, 8, 20, 49, []),
    (40, 8, 20, 5, ["5 steps are too few", "warm-up (optim.warmup_steps=20) takes all of this "
                    "5-step run, so it warms up for 4 steps"]),
    (200, 8, 20, 25, ["warm-up (optim.warmup_steps=20) takes most of this 25-step run"]),
])
def test_a_fine_tune_says_how_long_it_is_and_warns_when_too_short(train, batch, warmup, steps,
                                                                   warnings):
    config = tiny_config(train=dict(epochs=1.0, batch_size=batch),
                         optim=dict(warmup_steps=warmup, total_steps=1000))
    lines = []
    fitted = steps_for_epochs(config, FakeSource(train, 3, train), lines.append)
    assert fitted.optim.total_steps == steps
    assert lines[0] == (f"data: {train} examples to train on (3 held out) in {train} rows; "
                        f"train.epochs=1 in batches of {batch} make {steps} steps "
                        f"(optim.total_steps)")
    said = [line for line in lines if line.startswith("warning: ")]
    assert len(said) == len(warnings)
    for line, fragment in zip(said, warnings):
        assert fragment in line
    assert fitted.optim.warmup_steps == min(warmup, steps - 1)


def test_jax_backend_lines_are_quiet_unless_verbosity_asks(monkeypatch):
    def record(path, level=logging.INFO):
        return logging.LogRecord("jax", level, path, 1, "Unable to initialize backend 'tpu'",
                                 (), None)

    bridge = "/site-packages/jax/_src/xla_bridge.py"
    assert not cli._quiet_backends(record(bridge))
    assert cli._quiet_backends(record(bridge, logging.WARNING))
    assert cli._quiet_backends(record("/work/minids_jax/data/corpus.py"))
    monkeypatch.setattr(cli.absl_logging, "get_verbosity", lambda: 1)
    assert cli._quiet_backends(record(bridge))


@pytest.mark.slow  # models made, imported and run (the llama: tests/test_recipe.py)
@pytest.mark.parametrize("family", ["qwen2", "deepseek_v2", "deepseek_v3"])
def test_make_tiny_writes_a_model_of_its_family_that_imports_and_chats(family, tmp_path):
    import numpy as np

    import minids_jax
    from minids_jax.data import chat, load_tokenizer
    from minids_jax.hf import convert, tiny

    tiny.make_tiny(family, tmp_path / "hf", log=lambda _: None)
    hf = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf["model_type"] == family
    assert (hf["bos_token_id"], hf["eos_token_id"]) == (0, 1)
    convert.import_dir(tmp_path / "hf", tmp_path / "run", tiny_config(), log=lambda _: None)
    model, config = minids_jax.load(tmp_path / "run")
    tokenizer = load_tokenizer(config, str(tmp_path / "run"))
    assert tokenizer.chat_template == tiny.FAMILIES[family][1]
    prompt, _ = chat.encode(tokenizer, [("user", "What is 2 + 3?")], add_generation_prompt=True)
    assert prompt[0] == tokenizer.BOS
    tokens = minids_jax.generate(model, prompt[None], 4)
    assert tokens.shape == (1, 4) and np.all(tokens < config.model.vocab_size)


def test_an_import_without_a_tokenizer_says_its_run_learns_from_random_tokens(tmp_path, capsys):
    import shutil

    from minids_jax.hf import convert
    from minids_jax.training.trainer import Trainer
    from tests.factories import REPO

    shutil.copytree(REPO / "tests" / "fixtures" / "llama_tiny", tmp_path / "hf")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (tmp_path / "hf" / name).unlink()
    lines = []
    config = convert.import_dir(tmp_path / "hf", tmp_path / "run", tiny_config(),
                                log=lines.append)
    assert config.data.source == "random"
    assert any("has no tokenizer.json: the run trains on data.source='random'" in line
               for line in lines), lines
    Trainer(config).close()
    assert "data: random tokens (data.source='random'" in capsys.readouterr().out
