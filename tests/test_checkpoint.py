"""Checkpoints: round trip, exact resume, SIGTERM, kill -9, restore across meshes, errors.

Every run here uses one tiny config with optim.total_steps=6 (so the train step compiles once),
and a persistent compilation cache shared with the subprocesses keeps the suite fast.
"""

import gc
import json
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import minids_jax
from minids_jax import checkpoint
from minids_jax import config as config_lib
from minids_jax.checkpoint import store
from minids_jax.training import checkpointer
from minids_jax.training import trainer as trainer_lib
from tests.factories import TINY_STEPS, read_until, subprocess_env, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]
TOTAL = TINY_STEPS

pytestmark = pytest.mark.usefixtures("compile_cache")


@pytest.fixture
def straight(trained_run):
    """The uninterrupted run the others are compared with: (trainer, history, workdir)."""
    return trained_run


def losses(history) -> dict[int, float]:
    return {h["step"]: float(h["loss"]) for h in history if "loss" in h}


def host(tree):
    return jax.tree.leaves(jax.device_get(tree))


def assert_states_equal(state_a, state_b):
    leaves_a, leaves_b = host(state_a), host(state_b)
    assert len(leaves_a) == len(leaves_b) > 0
    for a, b in zip(leaves_a, leaves_b):
        assert np.array_equal(a, b)


def saved_steps(workdir) -> list[int]:
    directory = store.checkpoints_dir(workdir)
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


# -------------------------------------------------------------------------------------------
# In-process


def test_round_trip_restores_every_leaf(straight, tmp_path):
    trainer, _, workdir = straight
    assert saved_steps(workdir) == [3, 6]  # every 3 steps, the end coinciding with a save
    assert config_lib.from_json((workdir / "config.json").read_text()) == trainer.config
    assert checkpoint.read_config(workdir) == trainer.config

    fresh = trainer_lib.Trainer(tiny_config(), str(workdir))
    before = host(fresh.state)
    assert fresh.restore_or_initialize() == TOTAL
    assert fresh.state.step == TOTAL
    # Parameters, AdamW moments and the update count all come back, bit for bit...
    assert_states_equal(fresh.state, trainer.state)
    # ...and they are not simply the fresh initialization.
    assert not all(np.array_equal(a, b) for a, b in zip(before, host(fresh.state)))
    # The restored state is placed like a fresh one, so the jitted step accepts it as is.
    for leaf, sharding in zip(jax.tree.leaves(fresh.state),
                              jax.tree.leaves(fresh.shardings)):
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim)

    params = minids_jax.load_params(workdir)
    model_state = jax.device_get(nnx.to_pure_dict(trainer.state.model))
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params))
    np.testing.assert_array_equal(params["embed"]["embedding"], model_state["embed"]["embedding"])
    np.testing.assert_array_equal(params["blocks"]["0"]["attn"]["latents"],
                                  model_state["blocks"][0]["attn"]["latents"])
    assert sum(x.size for x in jax.tree.leaves(params)) == sum(
        x.size for x in jax.tree.leaves(model_state))
    # An earlier step is reachable by number or by its directory.
    early = minids_jax.load_params(workdir / "checkpoints" / "3")
    assert not np.array_equal(early["head"]["kernel"], params["head"]["kernel"])
    np.testing.assert_array_equal(minids_jax.load_params(workdir, step=3)["head"]["kernel"],
                                  early["head"]["kernel"])


def test_resume_after_crash_is_exact(straight, tmp_path):
    trainer, history, _ = straight
    crashing = trainer_lib.Trainer(tiny_config(), str(tmp_path))
    step_fn, calls = crashing.train_step, []

    def crash_on_fourth_step(state, batch):
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("simulated crash")
        return step_fn(state, batch)

    crashing.train_step = crash_on_fourth_step
    with pytest.raises(RuntimeError, match="simulated crash"):
        crashing.train()
    assert saved_steps(tmp_path) == [3]  # the pending save finished despite the crash

    resumed = trainer_lib.Trainer(tiny_config(), str(tmp_path))
    resumed_history = resumed.train()
    assert sorted(losses(resumed_history)) == [4, 5, 6]  # continued, not restarted
    assert all(losses(resumed_history)[s] == losses(history)[s] for s in (4, 5, 6))
    assert_states_equal(resumed.state, trainer.state)


def test_a_relative_workdir_saves_resumes_and_loads(straight, monkeypatch, tmp_path):
    """`--workdir runs/tiny`, as the README has it: orbax itself refuses relative paths."""
    trainer, _, _ = straight
    monkeypatch.chdir(tmp_path)
    relative = trainer_lib.Trainer(tiny_config(), "runs/x")
    relative.train()
    assert saved_steps(tmp_path / "runs/x") == [3, 6]
    assert_states_equal(relative.state, trainer.state)
    again = trainer_lib.Trainer(tiny_config(), "runs/x")
    assert again.restore_or_initialize() == TOTAL
    assert_states_equal(again.state, trainer.state)
    model, _ = minids_jax.load("runs/x")
    assert_states_equal(nnx.state(model, nnx.Param),
                        nnx.state(trainer.model(), nnx.Param))


def test_architecture_change_is_an_error_naming_the_fields(straight):
    _, _, workdir = straight
    changed = tiny_config(model=dict(d_model=64, n_experts=4))
    # The check comes before the state is touched, so no state (and no compile) is needed.
    with pytest.raises(checkpoint.CheckpointError) as error:
        checkpointer.Checkpointer(changed, str(workdir)).restore_or_initialize(state=None)
    message = str(error.value)
    assert "model.d_model: checkpoint 32, this run 64" in message
    assert "model.n_experts: checkpoint 2, this run 4" in message
    assert "n_heads" not in message
    # The failed attempt left the run's recorded config alone.
    assert config_lib.from_json((workdir / "config.json").read_text()).model.d_model == 32


def test_allowed_changes_resume(straight, tmp_path):
    """More steps and other logging settings are fine; the run continues from its step."""
    _, _, workdir = straight
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    longer = tiny_config(optim=dict(total_steps=2 * TOTAL), train=dict(log_every=2),
                         checkpoint=dict(every=0))
    trainer = trainer_lib.Trainer(longer, str(tmp_path))
    assert trainer.restore_or_initialize() == TOTAL


def latest_step_dir(workdir) -> pathlib.Path:
    return pathlib.Path(store.checkpoints_dir(workdir) / str(max(saved_steps(workdir))))


def largest_parameter_file(step_dir: pathlib.Path) -> pathlib.Path:
    files = [p for p in (step_dir / "model").rglob("*") if p.is_file()]
    return max(files, key=lambda p: p.stat().st_size)


def truncate(step_dir: pathlib.Path) -> None:
    victim = largest_parameter_file(step_dir)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])


def scribble(step_dir: pathlib.Path) -> None:
    """4 KiB of garbage in the middle of a data file, its size unchanged."""
    victim = largest_parameter_file(step_dir)
    with open(victim, "r+b") as file:
        file.seek(victim.stat().st_size // 2)
        file.write(np.random.default_rng(0).bytes(4096))


def rewrite_one_weight(step_dir: pathlib.Path) -> None:
    """A well-formed parameters item with one changed number: only a checksum can tell."""
    params = minids_jax.load_params(step_dir)
    params["embed"]["embedding"][0, 0] += 1.0
    shutil.rmtree(step_dir / "model")
    with ocp.PyTreeCheckpointer() as writer:
        writer.save(step_dir / "model", params)


# A failed orbax read abandons its other reads' coroutines; they are reported when collected.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", [truncate, scribble, rewrite_one_weight])
def test_damaged_checkpoint_error_and_fallback(straight, tmp_path, damage):
    trainer, _, workdir = straight
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    bad = latest_step_dir(tmp_path)
    damage(bad)

    fresh = trainer_lib.Trainer(tiny_config(), str(tmp_path))
    with pytest.raises(checkpoint.UnreadableCheckpointError) as error:
        fresh.restore_or_initialize()
    message = str(error.value)
    assert str(bad) in message and "fallback=True" in message
    if damage is rewrite_one_weight:
        assert "is damaged: model array(s) embed/embedding differ from the checksums" in message
    for load in (minids_jax.load_params, minids_jax.load):
        with pytest.raises(checkpoint.UnreadableCheckpointError, match=str(bad)):
            load(tmp_path)
    del error

    falling_back = trainer_lib.Trainer(tiny_config(checkpoint=dict(fallback=True)), str(tmp_path))
    assert falling_back.restore_or_initialize() == 3
    assert saved_steps(tmp_path) == [3]  # the bad one moved aside, so step 6 can be saved again
    assert len(list((tmp_path / store.CORRUPT).iterdir())) == 1
    assert "(step 3) matched its checksums" in falling_back.checkpointer.latest_description()
    falling_back.train()
    assert saved_steps(tmp_path) == [3, 6]
    assert_states_equal(falling_back.state, trainer.state)
    gc.collect()  # here, where the warnings above are expected


def test_init_from_takes_parameters_with_a_fresh_optimizer(straight, tmp_path):
    trainer, _, workdir = straight
    finetune = trainer_lib.Trainer(tiny_config(checkpoint=dict(init_from=str(workdir))),
                                   str(tmp_path))
    assert finetune.restore_or_initialize() == 0
    assert finetune.state.step == 0
    assert_states_equal(finetune.state.model, trainer.state.model)
    moments = host(finetune.state.optimizer["opt_state"])
    assert moments and all(not np.any(m) for m in moments)  # AdamW starts from zero

    other = tiny_config(model=dict(n_layers=4), checkpoint=dict(init_from=str(workdir)))
    with pytest.raises(checkpoint.CheckpointError, match="model.n_layers: checkpoint 1"):
        checkpointer.Checkpointer(other, None).restore_or_initialize(state=None)


def test_nan_loss_stops_without_saving(tmp_path):
    trainer = trainer_lib.Trainer(tiny_config(checkpoint=dict(every=1)), str(tmp_path))
    step_fn = trainer.train_step

    def poisoned(state, batch):  # the parameters blow up during step 3
        if int(jax.device_get(state.step)) == 2:
            state = jax.tree.map(lambda x: x * np.inf if x.dtype == np.float32 else x, state)
        return step_fn(state, batch)

    trainer.train_step = poisoned
    with pytest.raises(trainer_lib.NonFiniteLossError, match="at step 3") as error:
        trainer.train()
    assert "latest checkpoint is step 2, saved from finite values" in str(error.value)
    assert "intact" not in str(error.value)
    assert saved_steps(tmp_path) == [1, 2]
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(minids_jax.load_params(tmp_path)))


def test_ctrl_c_saves_and_returns(tmp_path):
    """In a notebook, an interrupt stops the loop after the current step and saves it."""
    trainer = trainer_lib.Trainer(tiny_config(checkpoint=dict(every=0)), str(tmp_path))
    step_fn, calls = trainer.train_step, []

    def interrupted_during_second_step(state, batch):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGINT)
        return step_fn(state, batch)

    trainer.train_step = interrupted_during_second_step
    handler_before = signal.getsignal(signal.SIGINT)
    history = trainer.train()
    assert trainer.stopped_by == signal.SIGINT
    assert sorted(losses(history)) == [1, 2]
    assert saved_steps(tmp_path) == [2]
    assert signal.getsignal(signal.SIGINT) is handler_before  # Ctrl-C works as usual again


def test_config_of_an_older_version_still_opens(straight, tmp_path):
    """A field since removed is ignored; a field since added takes its default."""
    _, _, workdir = straight
    shutil.copytree(workdir, tmp_path, dirs_exist_ok=True)
    saved = tmp_path / "checkpoints" / str(TOTAL) / "config" / "metadata"
    old = json.loads(saved.read_text())
    old["model"]["retired_field"] = 1
    del old["checkpoint"]["fallback"]
    # The layout before the compute group: kernels, precision and the balancing weight sat
    # among the model's fields.
    old["model"].update(dtype="bfloat16", moe_dispatch="capacity", aux_loss_coef=0.5)
    del old["compute"], old["train"]["aux_loss_coef"]
    saved.write_text(json.dumps(old))
    config = minids_jax.read_config(tmp_path)
    assert config.model == tiny_config().model
    assert config.checkpoint.fallback is False
    assert (config.compute.dtype, config.compute.moe_dispatch) == ("bfloat16", "capacity")
    assert config.train.aux_loss_coef == 0.5
    # ...and it resumes: its architecture is this run's.
    resumed = trainer_lib.Trainer(tiny_config(), str(tmp_path))
    assert resumed.restore_or_initialize() == TOTAL


def test_errors_for_missing_checkpoints(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        minids_jax.load(tmp_path / "nowhere")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        minids_jax.load(tmp_path)


def test_bad_checkpoint_config_values():
    with pytest.raises(config_lib.ConfigError, match="checkpoint.max_to_keep"):
        tiny_config(checkpoint=dict(max_to_keep=0))
    with pytest.raises(config_lib.ConfigError, match="checkpoint.every"):
        tiny_config(checkpoint=dict(every=-1))


# -------------------------------------------------------------------------------------------
# Subprocesses: signals, kill -9, another device count

# Runs `trainer.run` like train.py does, with each step slowed down so that a signal or a kill
# lands mid-run at a predictable point.
RUNNER = textwrap.dedent("""
    import sys, time
    from minids_jax import config as config_lib
    from minids_jax.training import steps, trainer
    config = config_lib.from_json(open(sys.argv[1]).read())
    delay = float(sys.argv[3])
    make_train_step = steps.make_train_step

    def slow_make_train_step(*args, **kwargs):
        step = make_train_step(*args, **kwargs)
        def slow_step(state, batch):
            out = step(state, batch)
            time.sleep(delay)
            return out
        return slow_step

    steps.make_train_step = slow_make_train_step
    trainer.run(config, sys.argv[2])
""")


def start_run(tmp_path, config, workdir, compile_cache, delay):
    (tmp_path / "runner.py").write_text(RUNNER)
    (tmp_path / "config.json").write_text(config.to_json())
    return subprocess.Popen(
        [sys.executable, str(tmp_path / "runner.py"), str(tmp_path / "config.json"), str(workdir),
         str(delay)], cwd=REPO, env=subprocess_env(compile_cache), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_sigterm_saves_and_resume_matches_straight(straight, tmp_path, compile_cache):
    trainer, history, _ = straight
    workdir = tmp_path / "run"
    process = start_run(tmp_path, tiny_config(checkpoint=dict(every=0)), workdir,
                        compile_cache, delay=0.5)
    read_until(process, f"step 2/{TOTAL}")
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output
    assert "stopped by SIGTERM after step" in output and "To resume" in output, output
    stopped_at = int(output.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert 2 <= stopped_at < TOTAL
    assert saved_steps(workdir) == [stopped_at]  # every=0: only the save the signal asked for

    resumed = trainer_lib.Trainer(tiny_config(checkpoint=dict(every=0)), str(workdir))
    resumed_losses = losses(resumed.train())
    assert sorted(resumed_losses) == list(range(stopped_at + 1, TOTAL + 1))
    assert all(resumed_losses[s] == losses(history)[s] for s in resumed_losses)
    assert_states_equal(resumed.state, trainer.state)


@pytest.mark.slow
def test_kill_9_at_any_moment_never_breaks_resume(straight, tmp_path, compile_cache):
    trainer, _, _ = straight
    workdir = tmp_path / "run"
    config = tiny_config(checkpoint=dict(every=1, max_to_keep=2))
    checkpoints = store.checkpoints_dir(workdir)

    def saving_now() -> bool:
        return checkpoints.exists() and any(
            "tmp" in p.name for p in checkpoints.iterdir())

    killed_mid_save = 0
    # Moments: as soon as a save starts; inside a step; a little way into a save.
    for moment in ("save starts", "mid step", "into a save"):
        process = start_run(tmp_path, config, workdir, compile_cache, delay=0.3)
        read_until(process, "model:")  # set up and about to step
        deadline = time.time() + 60
        if moment == "mid step":
            read_until(process, f"/{TOTAL} |")
            time.sleep(0.1)
        else:
            while not saving_now() and time.time() < deadline and process.poll() is None:
                time.sleep(0.001)
            if moment == "into a save":
                time.sleep(0.02)
        process.kill()  # SIGKILL: no handler, no cleanup
        process.communicate(timeout=60)
        killed_mid_save += saving_now()  # a half-written checkpoint was left behind
        # Every complete checkpoint left behind is readable; leftovers are not listed.
        for step in store.read_only_manager(checkpoints).all_steps():
            assert minids_jax.load_params(workdir, step=step)
    assert killed_mid_save >= 1  # at least one kill really interrupted a save

    resumed = trainer_lib.Trainer(config, str(workdir))
    resumed.train()
    assert resumed.state.step == TOTAL
    assert_states_equal(resumed.state, trainer.state)
    assert not any("tmp" in p.name for p in checkpoints.iterdir())


FSDP_SAVER = textwrap.dedent("""
    import sys
    import jax, numpy as np
    from flax import nnx
    from minids_jax import config as config_lib
    from minids_jax.training import trainer
    config = config_lib.from_json(open(sys.argv[1]).read())
    run = trainer.Trainer(config, sys.argv[2])
    embedding = run.state.model["embed"]["embedding"][...]
    assert embedding.addressable_shards[0].data.shape[1] == embedding.shape[1] // 8, "not sharded"
    run.checkpointer.save(0, run.state)
    run.checkpointer.wait()
    model, _ = run.model(), None
    tokens = np.arange(2 * 16).reshape(2, 16) % config.model.vocab_size
    with jax.set_mesh(run.mesh):
        logits = nnx.jit(lambda m, t: m(t)[0])(model, tokens)
    np.save(sys.argv[3], np.asarray(jax.device_get(logits)))
""")


@pytest.mark.slow
def test_fsdp8_checkpoint_restores_on_one_device(tmp_path, compile_cache):
    config = tiny_config(mesh=dict(data=1, fsdp=8), train=dict(batch_size=8))
    (tmp_path / "saver.py").write_text(FSDP_SAVER)
    (tmp_path / "config.json").write_text(config.to_json())
    workdir = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(tmp_path / "saver.py"), str(tmp_path / "config.json"), str(workdir),
         str(tmp_path / "logits.npy")], cwd=REPO, env=subprocess_env(compile_cache, devices=8),
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert jax.device_count() == 1

    model, loaded_config = minids_jax.load(workdir)
    assert loaded_config == config
    assert all(len(x.devices()) == 1 for x in jax.tree.leaves(nnx.state(model)))
    tokens = np.arange(2 * 16).reshape(2, 16) % config.model.vocab_size
    logits = nnx.jit(lambda m, t: m(t)[0])(model, tokens)
    np.testing.assert_allclose(np.asarray(logits), np.load(tmp_path / "logits.npy"),
                               rtol=1e-5, atol=1e-5)

    # A training run on this device count resumes from it too (another mesh, same values).
    resumed = trainer_lib.Trainer(tiny_config(train=dict(batch_size=8)), str(workdir))
    assert resumed.restore_or_initialize() == 0
    assert_states_equal(resumed.state.model, nnx.state(model))


def test_notebook_cells_run(straight, monkeypatch, tmp_path):
    """Its cells in this process (tests/test_notebook.py runs it in a real kernel), in
    notebooks/ as Jupyter runs it, on a run named by an absolute MINIDS_WORKDIR."""
    _, _, workdir = straight
    import matplotlib
    matplotlib.use("Agg")
    notebook = json.loads((REPO / "notebooks" / "restore.ipynb").read_text())
    cells = ["".join(cell["source"]) for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert len(cells) >= 4
    monkeypatch.chdir(REPO / "notebooks")
    monkeypatch.setenv("MINIDS_WORKDIR", str(workdir))
    namespace: dict = {"__name__": "__main__"}
    for source in cells:
        exec(compile(source, "restore.ipynb", "exec"), namespace)
    model, config = namespace["model"], namespace["config"]
    assert isinstance(model, minids_jax.MiniDeepSeek) and config.model.d_model == 32
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert namespace["n_params"] == n_params
    moe_layers = [i for i in range(config.model.n_layers) if config.model.is_moe_layer(i)]
    assert namespace["moe_layers"] == moe_layers
    assert namespace["load_NxE"].shape == (len(moe_layers), config.model.n_experts)
    np.testing.assert_allclose(namespace["load_NxE"].sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.slow  # saves and restores a model
def test_a_checkpoint_saved_with_a_bfloat16_router_loads_and_verifies(tmp_path):
    """Routers are float32 now; before, model.param_dtype=bfloat16 stored them in bfloat16.
    Such a checkpoint restores (exactly: bfloat16 widens without loss) and its checksums,
    taken of the bfloat16 arrays, still verify; a damaged array still does not."""
    import jax.numpy as jnp

    from minids_jax.model import build
    from tests.factories import V3_MODEL

    config = tiny_config(model=dict(V3_MODEL, param_dtype="bfloat16"))
    state = nnx.to_pure_dict(nnx.state(build(config, "cpu", nnx.Rngs(0))))

    def as_before(path, x):
        keys = [getattr(k, "key", k) for k in path]
        return x.astype(jnp.bfloat16) if keys[-2:] == ["gate", "kernel"] else x

    old = jax.tree_util.tree_map_with_path(as_before, state)
    checkpoint.save_model(tmp_path / "old", config, old)
    model, _ = minids_jax.load(tmp_path / "old")
    kernel = model.blocks[1].moe.gate.kernel[...]
    assert kernel.dtype == jnp.float32
    np.testing.assert_array_equal(kernel, np.asarray(old["blocks"][1]["moe"]["gate"]["kernel"],
                                                     np.float32))
    from minids_jax.checkpoint import integrity

    assert integrity.mismatches(old, integrity.checksums(old),
                                {"blocks/1/moe/gate/kernel": jnp.bfloat16}) == []
    damaged = jax.tree.map(lambda x: x, old)
    damaged["blocks"][1]["moe"]["gate"]["kernel"] = kernel.astype(jnp.bfloat16).at[0, 0].add(1)
    assert integrity.mismatches(damaged, integrity.checksums(old), {
        "blocks/1/moe/gate/kernel": jnp.bfloat16}) == ["blocks/1/moe/gate/kernel"]


@pytest.mark.slow  # saves and restores a model
def test_saved_params_read_one_array_at_a_time_as_load_params_gives_them(tmp_path):
    """What exports read: a LoRA run's arrays one by one, adapters merged as they are read,
    equal to merging the whole loaded tree; shapes from the metadata alone."""
    from flax.traverse_util import flatten_dict

    from minids_jax.checkpoint.loading import SavedParams
    from minids_jax.model import lora
    from tests.factories import saved_lora_run

    _, run = saved_lora_run(tmp_path, targets=("attn.*", "moe.w1", "head"))
    config = minids_jax.read_config(run)
    whole = {tuple(map(str, path)): leaf for path, leaf in flatten_dict(
        lora.merged_params(minids_jax.load_params(run), config.lora)).items()}
    lazy = SavedParams(run, merge=config.lora)
    assert sorted(lazy) == sorted(whole)
    for path in whole:
        assert lazy.shape(path) == whole[path].shape
        np.testing.assert_array_equal(lazy[path], whole[path], err_msg=str(path))
    # Unmerged, the adapters are there as saved.
    assert any(path[-1] == "lora_a" for path in SavedParams(run))
