"""training/memory.py's plan against XLA's memory analysis of the real compiled train step, its verdict
and suggested fix, and inspect's --memory flags (in-process: no subprocess)."""

from __future__ import annotations

import pytest

from tests.factories import V3_MODEL, tiny_config

# Sizes where the activations are most of the total, so the comparison tests them.
TINY = dict(model=dict(max_seq_len=256, d_model=64, n_layers=4, attn_pattern=("mha", "mhla"),
                       latent_k=16, n_experts=4), train=dict(batch_size=8))
V3 = dict(model=dict(V3_MODEL, n_layers=4, max_seq_len=128, d_model=128, vocab_size=512,
                     n_heads=4, n_experts=8, moe_hidden_dim=64, dense_hidden_dim=128,
                     q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
                     qk_rope_head_dim=8, v_head_dim=16, rope_original_max_len=32),
          train=dict(batch_size=8))
LORA = dict(model=dict(max_seq_len=256, d_model=128, n_layers=6, attn_pattern=("mha",),
                       first_k_dense=-1, vocab_size=512),
            train=dict(batch_size=8, grad_accum_steps=2), compute=dict(remat="full"),
            lora=dict(rank=8, targets=("all-linear",)))


def xla_bytes(config) -> float:
    """argument + output - alias + temp of the train step as the trainer builds it, compiled
    for one CPU device from abstract state (nothing allocated)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from minids_jax import sharding
    from minids_jax.training import steps
    from minids_jax.training.loss import loss_chunk
    from minids_jax.training.packing import Packing

    mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
    with jax.set_mesh(mesh), nnx.logical_axis_rules(config.mesh.axis_rules), \
            nnx.use_eager_sharding(False):
        split = [nnx.split(m) for m in nnx.eval_shape(
            lambda: steps.build_model_and_optimizer(config, "cpu"))]
        shardings = [nnx.get_named_sharding(state, mesh) for _, state in split]
    graphdefs = steps.TrainState(*[g for g, _ in split])
    abstract = steps.TrainState(*[state for _, state in split])
    packing = Packing.of(graphdefs, abstract, config.optim.name)
    step_shardings = packing.step_shardings(steps.TrainState(*shardings))
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                         jax.eval_shape(packing.step_state, abstract), step_shardings)
    batch_sharding = jax.sharding.NamedSharding(mesh, sharding.batch_spec(
        config.mesh.axis_rules))
    rows, length = config.train.batch_size, config.model.max_seq_len
    chunk = loss_chunk(rows // config.train.grad_accum_steps, length, config.model.vocab_size,
                       "cpu")
    step = steps.make_train_step(graphdefs, packing, step_shardings, config, batch_sharding,
                                 chunk)
    batch = {name: jax.ShapeDtypeStruct((rows, length), dtype, sharding=batch_sharding)
             for name, dtype in (("inputs", jnp.int32), ("targets", jnp.int32),
                                 ("weights", jnp.float32))}
    memory = step.lower(state, batch).compile().memory_analysis()
    return (memory.argument_size_in_bytes + memory.output_size_in_bytes
            - memory.alias_size_in_bytes + memory.temp_size_in_bytes)


@pytest.mark.parametrize("groups", [TINY, pytest.param(V3, marks=pytest.mark.slow), LORA],
                         ids=["tiny", "v3", "lora_remat_accum"])  # v3: 10 s of compile
def test_plan_agrees_with_xla(groups):
    from minids_jax.training import memory

    config = tiny_config(**groups)
    plan = memory.plan(config, 1, platform="cpu")
    activations = plan.parts["activations"] + plan.parts["transient"]
    assert activations > 0.3 * plan.total  # the activations matter here
    ratio = plan.total / xla_bytes(config)
    assert 0.85 < ratio < 1.15, (ratio, plan.parts)


def test_parts_follow_the_config():
    from minids_jax.training import memory

    full = memory.plan(tiny_config(**TINY), 1, platform="cpu")
    assert full.trainable == sum(full.parameters_by_dtype.values()) / 4  # float32, all train
    assert full.parts["optimizer"] == pytest.approx(2 * full.parts["parameters"])
    remat = memory.plan(tiny_config(**{**TINY, "compute": dict(remat="full")}), 1,
                        platform="cpu")
    assert remat.parts["activations"] < 0.2 * full.parts["activations"]
    lora = memory.plan(tiny_config(**LORA), 1, platform="cpu")
    assert lora.trainable < 0.1 * lora.parts["parameters"] / 4
    nf4 = memory.plan(tiny_config(**{**LORA, "lora": dict(LORA["lora"], base_quant="nf4")}),
                      1, platform="cpu")
    assert "nf4" in nf4.parameters_by_dtype
    assert nf4.parts["parameters"] < 0.5 * lora.parts["parameters"]


def test_verdict_and_the_fix_that_fits():
    from minids_jax.training import memory

    config = tiny_config(model=dict(max_seq_len=64, n_layers=2), train=dict(batch_size=4))
    needed = memory.plan(config, 1, platform="cpu").total
    assert memory.plan(config, 1, 2 * needed, platform="cpu").verdict().startswith("fits: ")
    small = 0.6 * needed
    plan = memory.plan(config, 1, small, platform="cpu")
    assert plan.verdict().startswith("does not fit: ") and plan.fix
    assert "--config.compute.remat=full" in plan.verdict()
    fixed = memory.with_overrides(config, plan.fix)
    assert memory.plan(fixed, 1, small, platform="cpu").fits
    assert memory.fitting(config, 1, 2 * needed, platform="cpu") == {}


@pytest.mark.parametrize("text, expected", [("24GB", 24e9), ("80GiB", 80 * 2 ** 30),
                                            ("512 MB", 512e6), ("1e9", 1e9)])
def test_sizes_parse_in_decimal_and_binary_units(text, expected):
    from minids_jax.config.run import parse_size

    assert parse_size(text, "devices.memory") == expected


def run_inspect(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    import sys

    from absl import flags

    from minids_jax import inspect

    monkeypatch.setattr(sys, "argv", ["inspect", "--config", "configs/tiny.py", *args])
    for name in ("config", "devices", "memory", "device_memory", "platform"):
        if name in flags.FLAGS:
            delattr(flags.FLAGS, name)  # main() defines its flags again
    with pytest.raises(SystemExit) as exit_info:
        inspect.main()
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def test_inspect_memory(monkeypatch, capsys):
    code, out, _ = run_inspect(monkeypatch, capsys, "--memory", "--device_memory", "1GB")
    assert code in (0, None)
    assert "fits: " in out and "activations kept:" in out


@pytest.mark.parametrize("args, fragment", [
    (("--memory", "--device_memory", "lots"), "--device_memory='lots' is not a size"),
    (("--memory", "--devices", "3", "--config.mesh.fsdp=2"), "does not divide the 3 devices"),
])
def test_inspect_mistakes_are_one_line(monkeypatch, capsys, args, fragment):
    code, out, err = run_inspect(monkeypatch, capsys, *args)
    assert code == 2
    assert "Traceback" not in out + err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and fragment in last, err


def test_remat_of_layers_outside_a_scan_frees_their_activations():
    """Blocks run one by one (scan off) and rematerialized keep a fraction of what they keep
    without: on a CPU, XLA would otherwise merge each recomputation back into the forward
    computation (model/scan.py, `rematerialized`)."""
    kept = {remat: xla_bytes(tiny_config(**{
        **LORA, "train": dict(batch_size=8, grad_accum_steps=1),
        "compute": dict(remat=remat, scan_layers=False)})) for remat in ("none", "full")}
    assert kept["full"] < 0.4 * kept["none"], kept


def test_auto_remat_and_microbatch_are_the_least_that_fit_and_a_hopeless_run_stops_first():
    import jax

    from minids_jax import sharding
    from minids_jax.config import ConfigError
    from minids_jax.training import memory

    auto = {**LORA, "compute": dict(remat="auto"), "train": dict(batch_size=8,
                                                                  grad_accum_steps=0)}
    mesh = sharding.make_mesh(tiny_config(**auto).mesh, jax.devices()[:1])
    said = []
    roomy = memory.settle(tiny_config(**auto, devices=dict(memory="1GB")), mesh, said.append)
    assert (roomy.compute.remat, roomy.train.grad_accum_steps) == ("none", 1)
    whole = memory.plan(roomy, 1, platform="cpu").total  # XLA's, to 15% (above)
    tight = memory.settle(tiny_config(**auto, devices=dict(memory=f"{0.6 * whole:.0f}")), mesh,
                          said.append)
    assert (tight.compute.remat, tight.train.grad_accum_steps) != ("none", 1)
    assert xla_bytes(tight) < 0.6 * whole * 1.15  # what XLA compiles fits, to the plan's 15%
    assert said[-1].startswith("memory plan: ") and "compute.remat=" in said[-1]
    # Set by hand, the fields stay; a run that cannot fit stops with the plan's verdict.
    fixed = tiny_config(**{**auto, "compute": dict(remat="save_dots")}, devices=dict(
        memory="1GB"))
    assert memory.settle(fixed, mesh, said.append).compute.remat == "save_dots"
    with pytest.raises(ConfigError, match=r"would not fit in memory \(the memory plan: does "
                                          r"not fit: .* of 1.00 MB; .*devices.memory='off'"):
        memory.settle(tiny_config(**auto, devices=dict(memory="1MB")), mesh, said.append)
    plain = tiny_config(**LORA)  # on a CPU without auto fields: nothing planned
    assert memory.settle(plain, mesh, said.append) is plain
