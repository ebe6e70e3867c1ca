"""Fine-tuning runs started from a base: the architecture and the tokenizer come from the base,
configs/finetune.py names only what it changes, and a mistake is one error line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from flax import nnx

from minids_jax import checkpoint, cli
from minids_jax import config as config_lib
from minids_jax.model import MiniDeepSeek
from tests.factories import REPO, compute_config, subprocess_env, tiny_config

# A base unlike every default and unlike configs/finetune.py: a run that takes anything but
# the base's architecture shows.
BASE_MODEL = dict(vocab_size=259, max_seq_len=32, d_model=32, n_layers=2, n_heads=2,
                  n_experts=2, mlp_mult=2, attn_pattern=("mla",), kv_lora_rank=16,
                  qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def save_base(workdir, **data) -> config_lib.Config:
    """A base run at step 0 (as `hf import` writes one): a random model of BASE_MODEL."""
    config = tiny_config(model=BASE_MODEL, data=data)
    state = nnx.to_pure_dict(nnx.state(MiniDeepSeek(config.model, compute_config(), rngs=nnx.Rngs(0))))
    checkpoint.save_model(workdir, config, state)
    return config


def finetune_values(**sets) -> dict:
    """configs/finetune.py as nested dicts, with `sets` ('group.field': value) applied."""
    from configs import finetune

    values = finetune.get_config().to_dict()
    for name, value in sets.items():
        group, field = name.split(".")
        values[group][field] = value
    return values


def test_a_finetune_run_takes_the_base_architecture_and_tokenizer(tmp_path):
    base = save_base(tmp_path / "base", tokenizer="hf")  # an imported model's tokenizer
    sets = {"checkpoint.init_from": str(tmp_path / "base"), "data.path": "my.jsonl",
            "lora.rank": 8, "optim.lr": 1e-4}
    lines = []
    values = cli.with_base_architecture(finetune_values(**sets), set(sets), log=lines.append)
    config = config_lib.from_config_dict(values)
    assert config.model == base.model
    assert config.data.tokenizer == "hf"
    assert (config.lora.rank, config.optim.lr, config.optim.schedule) == (8, 1e-4, "cosine")
    assert lines == [f"checkpoint.init_from: the model architecture is that of "
                     f"{tmp_path / 'base' / 'checkpoints' / '0'}"]
    # A config file's value that is the default cannot be told from an unset one: the base's.
    values = cli.with_base_architecture(finetune_values(**sets, **{"model.n_layers": 6}),
                                        set(sets), log=lines.append)
    assert values["model"]["n_layers"] == 2
    # Asked for explicitly, the tokenizer stays.
    sets["data.tokenizer"] = "byte"
    values = cli.with_base_architecture(finetune_values(**sets), set(sets), log=lines.append)
    assert values["data"]["tokenizer"] == "byte"


def test_a_model_field_other_than_the_base_is_refused_by_name(tmp_path):
    save_base(tmp_path / "base")
    sets = {"checkpoint.init_from": str(tmp_path / "base"), "data.path": "my.jsonl"}
    # On the command line, even at the default value (the base has 2 layers)...
    with pytest.raises(config_lib.ConfigError, match=r"model.n_layers: checkpoint 2, this run 6"
                                                     r"\. A fine-tuning run keeps"):
        cli.with_base_architecture(finetune_values(**sets, **{"model.n_layers": 6}),
                                   set(sets) | {"model.n_layers"})
    # ...or in the config file, away from the default.
    with pytest.raises(config_lib.ConfigError, match=r"model.d_model: checkpoint 32, this run "
                                                     r"64\."):
        cli.with_base_architecture(finetune_values(**sets, **{"model.d_model": 64}), set(sets))
    # The base's own values, said again, are fine (an imported run's config.py).
    same = {f"model.{name}": value for name, value in BASE_MODEL.items()}
    cli.with_base_architecture(finetune_values(**sets, **same), set(sets) | set(same))


@pytest.mark.slow
def test_the_finetune_config_says_what_to_set(tmp_path):
    save_base(tmp_path / "base")

    def train(*flags):
        result = subprocess.run([sys.executable, "train.py", "--config", "configs/finetune.py",
                                 "--workdir", str(tmp_path / "ft"), *flags], cwd=REPO,
                                env=subprocess_env(""), capture_output=True, text=True,
                                timeout=120)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        return result.stderr.strip().splitlines()[-1]

    last = train()
    assert last.startswith("error: the config file configs/finetune.py leaves "
                           "checkpoint.init_from, data.path to the command line; set "
                           "--config.checkpoint.init_from=... (a workdir"), last
    assert "--config.data.path=..." in train(f"--config.checkpoint.init_from={tmp_path / 'base'}")
    last = train(f"--config.checkpoint.init_from={tmp_path / 'base'}",
                 "--config.data.path=my.jsonl", "--config.model.n_heads=4")
    assert "model.n_heads: checkpoint 2, this run 4" in last, last
    assert "no such checkpoint or workdir" in train(
        f"--config.checkpoint.init_from={tmp_path / 'nothing'}", "--config.data.path=x.jsonl")
    assert not (tmp_path / "ft").exists()  # nothing was made
