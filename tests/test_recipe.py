"""The practice recipe of docs/finetuning.md, run as written: make-tiny, import, a LoRA
fine-tune, generation, export (and a transformers reload where transformers is installed)."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.factories import REPO, subprocess_env

HEADING = "## Practise on a tiny model first"


def recipe_commands() -> list[str]:
    """The bash block under HEADING, one command per entry (continuations joined)."""
    text = (REPO / "docs" / "finetuning.md").read_text()
    block = re.search(re.escape(HEADING) + r".*?```bash\n(.*?)```", text, re.S).group(1)
    return [line.strip() for line in block.replace("\\\n", " ").splitlines() if line.strip()]


@pytest.mark.slow
def test_the_docs_practice_recipe_runs_as_written(tmp_path, compile_cache):
    commands = recipe_commands()
    assert commands[0].startswith("python -m minids_jax.hf make-tiny") and len(commands) == 8
    # From "the repository's root": its scripts and configs, with the outputs in tmp_path.
    for name in ("train.py", "generate.py", "configs", "scripts"):
        (tmp_path / name).symlink_to(REPO / name)
    env = subprocess_env(compile_cache)
    env.pop("JAX_PLATFORMS")  # as a user runs them: the quiet start is part of the recipe
    outputs = {}
    for command in commands:
        if "import transformers" in command and importlib.util.find_spec("transformers") is None:
            continue
        started = time.perf_counter()
        result = subprocess.run(["bash", "-c", command.replace("python ", f"{sys.executable} ")],
                                cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{command}\n{output[-3000:]}"
        print(f"{time.perf_counter() - started:5.1f} s  {command}")
        outputs[re.search(r"python (\S+)", command).group(1)] = output
        # No absl lines about TPU backends or NVML on a CPU machine; no nan speeds.
        assert "libtpu" not in output and "NVML" not in output, output
        assert "nan tokens/s" not in output
    hf = tmp_path / "tiny_llama"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in hf.iterdir()}
    assert json.loads((hf / "config.json").read_text())["model_type"] == "llama"
    assert "<｜Assistant｜><think>" in json.loads(  # R1-Distill's template
        (hf / "tokenizer_config.json").read_text())["chat_template"]
    train = outputs["train.py"]
    assert re.search(r"data: 392 examples to train on \(8 held out\) in \d+ rows; "
                     r"train.epochs=1 in batches of 8 make 49 steps", train), train
    assert "warning" not in train
    chat = outputs["generate.py"]  # the --chat run, the later of the two
    assert chat.count("fine-tuned on instruction records") == 1, chat
    exported = json.loads((tmp_path / "tiny_exported" / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"]
    assert os.path.isfile(tmp_path / "tiny_exported" / "tokenizer.json")
