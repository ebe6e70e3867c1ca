"""benchmarks/gpu_check.sh and gpu_check.py without a GPU: the script's arguments, its
no-GPU line, its whole run with a stand-in Python, and reading kernels from HLO text."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import textwrap

import pytest

from tests.factories import REPO, tiny_config

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"
sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402  (benchmarks/gpu_check.py)

CONFIGS = ("configs/mini.py", "configs/v3_mini.py", "configs/deepseek_llm_7b.py")


def run_script(*args, env=None, path_dir=None, cwd=None):
    """bash gpu_check.sh ARGS: (exit status, stdout + stderr lines)."""
    env = dict(os.environ if env is None else env)
    if path_dir is not None:  # stand-ins (nvidia-smi, ...) come first on PATH
        env["PATH"] = f"{path_dir}{os.pathsep}{env['PATH']}"
    result = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True,
                            text=True, timeout=60, cwd=cwd)
    return result.returncode, (result.stdout + result.stderr).splitlines()


def cpu_env(**extra):
    return {**os.environ, "JAX_PLATFORMS": "cpu", **extra}


def executable(path, text):
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def fake_nvidia_smi(directory, listing="GPU 0: NVIDIA H200 (UUID: GPU-0)"):
    directory.mkdir(exist_ok=True)
    executable(directory / "nvidia-smi", f"#!/bin/sh\necho '{listing}'\n")
    return directory


def dry_run_commands(*args, **env):
    status, lines = run_script("--dry_run", *args, env=cpu_env(**env))
    assert status == 0, lines
    return [shlex.split(line) for line in lines]


def option_value(argv, name):
    return argv[argv.index(name) + 1]


# --- the script's arguments -----------------------------------------------------------------

@pytest.mark.slow  # runs the script
def test_help_lists_every_option_and_each_is_accepted():
    status, lines = run_script("--help", env=cpu_env())
    assert status == 0
    text = "\n".join(lines)
    for option, value in (("--steps", "3"), ("--out", "x.json"), ("--hlo_dir", "hlo"),
                          ("--dry_run", None), ("--config.", None)):
        assert option in text, f"--help does not mention {option}"
        if value is not None:  # documented means the parser takes it
            assert run_script("--dry_run", option, value, env=cpu_env())[0] == 0, option
    assert "2 no NVIDIA GPU found" in text  # the no-GPU status is documented


@pytest.mark.parametrize("args, named", [(("--bogus",), "--bogus"), (("--steps", "0"), "0"),
                                         (("--steps", "x"), "x"), (("--steps",), "--steps"),
                                         (("--config=configs/tiny.py",), "--config.")])
@pytest.mark.slow  # runs the script
def test_bad_arguments_give_one_line_before_anything_runs(args, named):
    # No GPU here: a bad argument must be reported as such, not as the missing GPU (status 2).
    status, lines = run_script(*args, env=cpu_env())
    assert status == 1
    assert len(lines) == 1 and lines[0].startswith("gpu_check: ") and named in lines[0], lines


@pytest.mark.slow  # runs the script
def test_dry_run_lists_the_configs_in_bfloat16_with_the_overrides_last(tmp_path):
    commands = dry_run_commands("--steps", "5", "--config.train.batch_size=16",
                                "--config.model.n_layers", "2", "--out", str(tmp_path / "t.json"))
    install = [c for c in commands if "pip" in c]
    assert len(install) == 1 and ".[cuda]" in install[0]
    # Installing only when JAX finds no GPU: the check, then `||`, then pip.
    assert 'import jax; jax.devices("gpu")' in install[0]
    assert install[0].index("||") < install[0].index("pip")
    measures = [c for c in commands if "--row_out" in c]
    assert [option_value(c, "--config") for c in measures] == list(CONFIGS)
    for argv in measures:
        dtype = argv.index("--config.compute.dtype=bfloat16")
        # The user's overrides come after the defaults, so they win.
        assert argv.index("--config.train.batch_size=16") > dtype
        assert argv.index("--config.model.n_layers=2") > dtype
        assert option_value(argv, "--steps") == "5"
    # The 7B runs a LoRA step whose remat and microbatches the memory plan picks; a user's
    # batch size still wins.
    lora_7b = measures[2]
    for setting in ("--config.lora.rank=16", "--config.compute.remat=auto",
                    "--config.train.grad_accum_steps=0", '--config.lora.targets=("all-linear",)'):
        assert lora_7b.index("--config.compute.dtype=bfloat16") < lora_7b.index(setting) \
            < lora_7b.index("--config.train.batch_size=16"), setting
    report, = [c for c in commands if "--rows" in c]
    assert option_value(report, "--rows").split(",") == [option_value(c, "--row_out")
                                                         for c in measures]
    assert option_value(report, "--out") == str(tmp_path / "t.json")
    # Then V3 decoding against transformers, where the Python has torch and transformers.
    decode = commands[-1]
    assert decode[:decode.index("&&")] == ["python", "-c", "import torch, transformers"]
    assert "benchmarks/decode.py" in decode and "--vs_hf" in decode
    assert option_value(decode, "--config") == "configs/v3_tiny.py"
    assert not (tmp_path / "t.json").exists()  # nothing ran


@pytest.mark.slow  # runs the script
def test_dry_run_resolves_a_relative_out_against_the_callers_directory(tmp_path):
    # The script runs from the repository root; `--out rows.json` means the caller's file.
    status, lines = run_script("--dry_run", "--out", "rows.json", env=cpu_env(), cwd=tmp_path)
    assert status == 0
    report, = [shlex.split(line) for line in lines if "--rows" in line]
    assert option_value(report, "--out") == str(tmp_path / "rows.json")


# --- no GPU ---------------------------------------------------------------------------------

@pytest.mark.slow  # runs the script
def test_no_gpu_is_one_line_with_what_would_have_run_and_status_2(tmp_path):
    # A GPU listed by nvidia-smi does not count when JAX_PLATFORMS keeps JAX on the CPU.
    status, lines = run_script("--steps", "4", env=cpu_env(PYTHON=str(tmp_path / "absent")),
                               path_dir=fake_nvidia_smi(tmp_path / "bin"))
    assert status == 2
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("gpu_check: no NVIDIA GPU found (JAX_PLATFORMS=cpu")
    assert "Traceback" not in line
    for config in CONFIGS:
        assert f"--config {config} --config.compute.dtype=bfloat16" in line
    assert "--steps 4" in line and "benchmarks/decode.py --vs_hf" in line


@pytest.mark.slow  # runs the script
def test_no_gpu_when_nvidia_smi_lists_none(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["PYTHON"] = str(tmp_path / "absent")  # must never be started
    bin_dir = fake_nvidia_smi(tmp_path / "bin", listing="No devices were found")
    status, lines = run_script(env=env, path_dir=bin_dir)
    assert status == 2
    assert len(lines) == 1 and "nvidia-smi lists no GPU" in lines[0], lines


# --- the GPU path, with a stand-in Python ---------------------------------------------------

STAND_IN = """
#!{python}
# Stands in for the Python that gpu_check.sh runs: logs each call; JAX finds a GPU once the
# cuda extra is "installed"; a measuring run writes a row, except for configs named in FAIL.
import json, os, pathlib, sys
state = pathlib.Path({state!r})
with open(state / "calls.log", "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
args = sys.argv[1:]
if args[0] == "-c" and "transformers" in args[1]:  # the decode comparison's peer
    sys.exit(0 if os.environ.get("HAS_HF") else 1)
if args[0] == "-c":
    sys.exit(0 if (state / "installed").exists() else 1)
if args[0] == "benchmarks/decode.py":
    print("decode vs transformers: 6.00x")
    sys.exit(0)
if args[:2] == ["-m", "pip"]:
    (state / "installed").touch()
    sys.exit(0)
if "--rows" in args:  # the real report
    os.execv({python!r}, [{python!r}] + args)
name = pathlib.Path(args[args.index("--config") + 1]).stem
if name in os.environ.get("FAIL", "").split(","):
    sys.exit(1)
row = dict(config=name, platform="gpu", device="NVIDIA H200", devices=1, jax="0.10.2",
           dtype="bfloat16", attention_kernel="dot_product_attention", moe_dispatch="ragged",
           batch_size=8, seq_len=1024, steps=2, repeats=3, compile_s=30.0, step_s=0.05,
           step_s_rounds=[0.05] * 3, tokens_per_s=163840.0, flops_per_token=8e8,
           peak_flops_per_device=989e12, peak_flops_source="data sheet (NVIDIA H200)",
           mfu=0.13, peak_memory_bytes=10 * 2 ** 30, compiled_temp_bytes=0, loss=10.0,
           kernels=dict(cudnn_attention=False, attention_calls={{}}, ragged_dot=True,
                        ragged_dot_lowered=9, ragged_dot_compiled={{"cuDNN": 6}},
                        ragged_dot_dense=3))
pathlib.Path(args[args.index("--row_out") + 1]).write_text(json.dumps(row))
"""


@pytest.mark.slow  # runs the script
def test_gpu_path_installs_only_when_needed_measures_each_config_and_decodes(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    python = executable(tmp_path / "python", STAND_IN.format(python=sys.executable,
                                                             state=str(state)))
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env.update(PYTHON=str(python), FAIL="v3_mini", TMPDIR=str(tmp_path))
    out = tmp_path / "rows.json"
    bin_dir = fake_nvidia_smi(tmp_path / "bin")

    status, lines = run_script("--steps", "2", "--config.train.batch_size=4", "--out", str(out),
                               env=env, path_dir=bin_dir)
    calls = [json.loads(line) for line in (state / "calls.log").read_text().splitlines()]
    assert status == 1, lines  # v3_mini failed
    installs = [i for i, call in enumerate(calls) if call[:2] == ["-m", "pip"]]
    measures = [i for i, call in enumerate(calls) if "--row_out" in call]
    assert len(installs) == 1 and calls[installs[0]][-1] == ".[cuda]"
    assert len(measures) == 3 and installs[0] < measures[0]  # installed before measuring
    for i in measures:
        assert "--config.train.batch_size=4" in calls[i]
    rows = json.loads(out.read_text())
    assert [row["config"] for row in rows] == ["mini", "v3_mini", "deepseek_llm_7b"]
    assert "error" not in rows[0] and rows[1]["error"]
    table = "\n".join(lines)
    assert "yes (cuDNN 6, dense 3)" in table and "163,840" in table
    assert any(line.startswith("v3_mini") and "failed" in line for line in lines)
    assert not list(tmp_path.glob("gpu_check.*"))  # the rows' scratch directory is gone
    # No torch and transformers: the decode comparison says so and does not run.
    assert not any(call[0] == "benchmarks/decode.py" for call in calls)
    assert any("decode comparison skipped" in line and "HF_PYTHON" in line for line in lines)

    (state / "calls.log").unlink()
    env.update(FAIL="", HAS_HF="1")
    status, lines = run_script("--steps", "2", env=env, path_dir=bin_dir)
    calls = [json.loads(line) for line in (state / "calls.log").read_text().splitlines()]
    assert status == 0, lines
    assert not any(call[:2] == ["-m", "pip"] for call in calls)  # JAX has its GPU now
    assert calls[-1][:2] == ["benchmarks/decode.py", "--vs_hf"]  # last, after the table
    assert lines[-1] == "decode vs transformers: 6.00x"


# --- kernels from HLO text ------------------------------------------------------------------

# One MHA layer: the attention that runs through jax.nn.dot_product_attention on GPUs.
MHA = dict(attn_pattern=("mha",))


def test_cpu_compiled_step_uses_neither_cudnn_attention_nor_ragged_dot(compile_cache):
    row = gpu_check.measure(tiny_config(model=MHA), steps=1, repeats=1)
    # On the CPU the trainer picks the fused attention and the blocked MoE dispatch ...
    assert (row["platform"], row["attention_kernel"], row["moe_dispatch"]) == (
        "cpu", "fused", "blocked")
    # ... and the HLO says so: no cuDNN custom call, no ragged-dot anywhere.
    kernels = row["kernels"]
    assert gpu_check.kernel_summary(kernels) == ("no", "no")
    assert kernels["ragged_dot_lowered"] == 0 and kernels["attention_calls"] == {}
    assert row["compile_s"] > 0 and row["step_s"] > 0 and row["tokens_per_s"] > 0
    assert 0 < row["mfu"] < 1
    assert row["tokens_per_s"] == pytest.approx(4 * 16 / row["step_s"])  # batch 4 x 16 tokens
    table = gpu_check.format_table([dict(config="tiny", **row)])
    assert table.splitlines()[1].split()[-2:] == ["no", "no"]
    assert row["lora"] is None and row["memory_plan"]["bytes"] > 0


@pytest.mark.slow  # a compile and a step
def test_a_lora_row_has_the_memory_plans_choices_and_the_frozen_base_flops(compile_cache):
    from minids_jax.training import flops

    config = tiny_config(model=MHA, lora=dict(rank=4, targets=("all-linear",)),
                         compute=dict(remat="auto"), train=dict(grad_accum_steps=0),
                         devices=dict(memory="1GB"))
    row = gpu_check.measure(config, steps=1, repeats=1)
    assert row["lora"] == dict(rank=4, targets=["all-linear"], base_quant="none")
    plan = row["memory_plan"]  # settled: what fits 1 GB is no remat and the whole batch
    assert (plan["remat"], plan["microbatches"]) == ("none", 1) and 0 < plan["bytes"] < 2 ** 30
    assert row["flops_per_token"] == flops.train_flops_per_token(config.model, frozen_base=True)
    note = gpu_check.format_table([dict(config="tiny", **row)]).splitlines()[-1]
    assert "LoRA rank 4 on all-linear, base none, memory plan: remat none, 1 microbatch" in note


def test_ragged_dots_of_a_step_lowered_for_cuda_are_counted_once_each(compile_cache):
    # Lowering for CUDA needs no GPU. XLA names these instructions ragged_dot_general.N and
    # their metadata says ragged_dot_general too: only the opcodes may count.
    from minids_jax.training import trainer

    run = trainer.Trainer(tiny_config(model=MHA, compute=dict(
        attention_kernel="dot_product_attention", moe_dispatch="ragged")))
    batch = run.batch(0)
    train = run.train_step.trace(run.step_state, batch).lower(lowering_platforms=("cuda",))
    forward = run.eval_step.trace(run.step_state.model, batch).lower(lowering_platforms=("cuda",))
    in_forward = gpu_check.count_ragged_dots(forward.as_text("hlo"))
    assert in_forward >= 3  # w1, w2, w3 of the routed experts
    # Each forward ragged dot gives two more in the backward pass (inputs' and weights'
    # gradients).
    train_hlo = train.as_text("hlo")
    assert gpu_check.count_ragged_dots(train_hlo) == 3 * in_forward
    assert gpu_check.hlo_kernels(train_hlo, train_hlo)["ragged_dot_compiled"] == {
        "XLA": 3 * in_forward}


COMPILED_GPU_HLO = """
HloModule jit_train_step, entry_computation_layout={(bf16[2,128,4,64]{3,2,1,0})->f32[]}

%fused_ragged_dot (p0: bf16[128,512], p1: bf16[16,512,256], p2: s32[16]) -> bf16[128,256] {
  %p0 = bf16[128,512]{1,0} parameter(0)
  %p1 = bf16[16,512,256]{2,1,0} parameter(1)
  %p2 = s32[16]{0} parameter(2)
  ROOT %rd = bf16[128,256]{1,0} ragged-dot(%p0, %p1, %p2), lhs_contracting_dims={1}, rhs_contracting_dims={1}, lhs_ragged_dims={0}, rhs_group_dims={0}, metadata={op_name="jit(train_step)/ragged_dot_general"}
}

ENTRY %main.42 (q: bf16[2,128,4,64], k: bf16[2,128,4,64]) -> f32[] {
  %q = bf16[2,128,4,64]{3,2,1,0} parameter(0)
  %k = bf16[2,128,4,64]{3,2,1,0} parameter(1)
  %fmha-bmm-softmax-bmm = (bf16[2,4,128,64]{3,2,1,0}, f32[2,4,128]{2,1,0}, u8[0]{0}) custom-call(%q, %k, %k), custom_call_target="__cudnn$fmhaSoftmax", backend_config={"cudnn_fmha_backend_config":{"mask_type":"CAUSAL"}}
  %fmha-bmm-softmax-bmm-backward = (bf16[2,128,4,64]{3,2,1,0}, bf16[2,128,4,64]{3,2,1,0}, bf16[2,128,4,64]{3,2,1,0}, u8[0]{0}) custom-call(%q, %k, %k, %q, %k), custom_call_target="__cudnn$fmhaSoftmaxBackward"
  %conv = bf16[2,4]{1,0} custom-call(%q, %k), custom_call_target="__cudnn$convForward"
  %gemm = bf16[64,64]{1,0} custom-call(%q, %k), custom_call_target="__cublas$lt$matmul", metadata={op_name="jit(train_step)/ragged_dot_general"}
  %ragged_dot_general.9 = bf16[64,64]{1,0} dot(%q, %k), lhs_contracting_dims={1}, rhs_contracting_dims={0}, metadata={op_name="jit(train_step)/ragged_dot_general" source_file="moe_dispatch.py"}
  %fusion.3 = bf16[128,256]{1,0} fusion(%q, %k, %k), kind=kCustom, calls=%fused_ragged_dot, backend_config={"fusion_backend_config":{"kind":"__cudnn$fusion"}}
  ROOT %loss = f32[] constant(0)
}
"""

LOWERED_HLO = "\n".join(
    f"  ragged_dot_general.{i} = bf16[64,64]{{1,0}} ragged-dot(a, b, sizes), "
    "lhs_contracting_dims={1}, rhs_contracting_dims={1}, lhs_ragged_dims={0}, "
    'rhs_group_dims={0}, metadata={op_name="ragged_dot_general"}' for i in range(3))


def test_handwritten_gpu_hlo_cudnn_attention_and_ragged_dot_in_a_cudnn_fusion():
    kernels = gpu_check.hlo_kernels(COMPILED_GPU_HLO, LOWERED_HLO)
    # The forward and backward fmha calls; cuDNN's convolution is not attention.
    assert kernels["attention_calls"] == {"__cudnn$fmhaSoftmax": 1,
                                          "__cudnn$fmhaSoftmaxBackward": 1}
    # One ragged-dot, run by cuDNN; the dense dot named ragged_dot_general.9 and the gemm
    # whose metadata names it are not ragged dots, so two of the three lowered were made dense.
    assert kernels["ragged_dot_compiled"] == {"cuDNN": 1}
    assert (kernels["ragged_dot_lowered"], kernels["ragged_dot_dense"]) == (3, 2)
    assert gpu_check.kernel_summary(kernels) == ("yes (2 calls)", "yes (cuDNN 1, dense 2)")


def test_handwritten_gpu_hlo_without_them_says_no():
    # XLA expanded every ragged dot into dense dots, and attention went through plain XLA.
    header, rest = COMPILED_GPU_HLO.split("\n%fused_ragged_dot", 1)
    entry = "ENTRY" + rest.split("ENTRY", 1)[1]
    dense = "\n".join(line for line in (header + "\n" + entry).splitlines()
                      if "fmha" not in line and "fusion.3" not in line)
    kernels = gpu_check.hlo_kernels(dense, LOWERED_HLO)
    assert gpu_check.kernel_summary(kernels) == ("no", "no (3 made dense)")
    # A ragged-dot XLA keeps for itself (no cuDNN fusion around it) is still a grouped GEMM.
    native = COMPILED_GPU_HLO.replace('"__cudnn$fusion"', '"__triton_gemm"')
    assert gpu_check.hlo_kernels(native)["ragged_dot_compiled"] == {"XLA": 1}
