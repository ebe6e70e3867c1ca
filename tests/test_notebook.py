"""notebooks/restore.ipynb, executed in a real Jupyter kernel on the kinds of run it must open:
a DeepSeek-V3-format run whose first layer is dense, and a dense llama-like run with no MoE
layer at all. MINIDS_WORKDIR is relative to the repository root, and the kernel starts
elsewhere (outside the repository, or in notebooks/ as Jupyter starts it), so the run is found
only by the notebook's rule."""

import json
import os
import re

import pytest

from tests.factories import REPO, TINY_STEPS, V3_MODEL, subprocess_env, tiny_config

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")  # provides the "python3" kernel

NOTEBOOK = REPO / "notebooks" / "restore.ipynb"


def train(config, workdir):
    from minids_jax.training import trainer as trainer_lib

    trainer_lib.Trainer(config, str(workdir)).train()


def logged_train_loss(workdir, step: int) -> float:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return next(r["loss"] for r in reversed(records)
                if r["split"] == "train" and r["step"] == step)


def execute_notebook(minids_workdir: str, kernel_cwd, compile_cache):
    """(what the notebook printed, whether it showed a plot), run in a kernel started in
    `kernel_cwd`. A cell that raises fails the test with its traceback (CellExecutionError)."""
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # CPU, the tests' compile flags and compilation cache (the kernel compiles the forward).
    env = dict(subprocess_env(compile_cache), MINIDS_WORKDIR=minids_workdir)
    client = nbclient.NotebookClient(notebook, kernel_name="python3", timeout=300)
    client.execute(cwd=str(kernel_cwd), env=env)
    outputs = [output for cell in notebook.cells for output in cell.get("outputs", [])]
    text = "".join(output.get("text", "") for output in outputs
                   if output.output_type == "stream" and output.name == "stdout")
    plotted = any("image/png" in output.get("data", {}) for output in outputs)
    return text, plotted


@pytest.mark.slow
def test_a_v3_run_with_a_dense_first_layer_shows_its_first_moe_layer(tmp_path, compile_cache):
    workdir = tmp_path / "runs" / "v3"
    train(tiny_config(model=dict(V3_MODEL)), workdir)  # first_k_dense=1: layer 0 is dense
    kernel_cwd = tmp_path / "elsewhere"  # outside the repository: found by minids_jax's place
    kernel_cwd.mkdir()
    relative = os.path.relpath(workdir, REPO)
    assert not (kernel_cwd / relative).exists()  # only the repository-root rule finds the run

    output, plotted = execute_notebook(relative, kernel_cwd, compile_cache)

    assert f"reading {workdir.resolve()}\n" in output, output
    assert (f"training loss {logged_train_loss(workdir, TINY_STEPS):.4f} at step {TINY_STEPS}"
            in output), output
    assert "2 of 3 layers are MoE layers; layer 1's experts:" in output, output
    expert_load = re.search(r"layer 1 expert load: \[([^\]]*)\]", output)
    assert expert_load, output
    shares = [float(share) for share in expert_load.group(1).split()]
    assert len(shares) == V3_MODEL["n_experts"] and sum(shares) == pytest.approx(1, abs=0.01)
    assert plotted


@pytest.mark.slow
def test_a_dense_run_skips_the_expert_plots(tmp_path, compile_cache):
    # A llama's shape: multi-head attention with grouped key-value heads, no MoE layer.
    workdir = tmp_path / "dense"
    train(tiny_config(model=dict(attn_pattern=("mha",), n_layers=2, first_k_dense=2,
                                 n_kv_heads=1, vocab_size=259),
                      data=dict(source="builtin")), workdir)
    # One step's directory: the loss shown is the last one logged up to that step.
    step_dir = workdir / "checkpoints" / "3"
    kernel_cwd = REPO / "notebooks"  # where Jupyter starts the kernel: found upwards from it
    relative = os.path.relpath(step_dir, REPO)
    assert not (kernel_cwd / relative).exists()

    output, plotted = execute_notebook(relative, kernel_cwd, compile_cache)

    assert f"reading {step_dir.resolve()}\n" in output, output
    assert f"training loss {logged_train_loss(workdir, 3):.4f} at step 3" in output, output
    assert "no MoE layer: all 2 layers are dense" in output, output
    assert "input : " in output, output  # Python source through the run's byte tokenizer
    assert "No expert load to plot: this model has no MoE layer" in output, output
    assert not plotted
