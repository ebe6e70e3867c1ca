"""Run reports (console, metrics.jsonl, TensorBoard, W&B, plot) and the FLOP count behind MFU."""

from __future__ import annotations

import io
import json
import pathlib
import struct
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minids_jax import plot
from minids_jax.config import ModelConfig
from minids_jax.model import MiniDeepSeek
from minids_jax.training import flops, reporting, trainer
from tests.factories import compute_config, small_model_config, tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]


def train_metrics(loss: float, n_layers: int = 2, n_experts: int = 4) -> dict:
    load = np.full((n_layers, n_experts), 1 / n_experts)
    return {"loss": loss, "lr": 1e-3, "grad_norm": 0.5, "aux_loss": 1.0, "total_loss": loss,
            "expert_load": load, "dropped_fraction": 0.0, "tokens_per_sec": 1000.0,
            "step_time": 0.25}


def read_events(directory: pathlib.Path) -> dict[str, list[tuple[int, float]]]:
    """Scalars of TensorBoard event files (TFRecord framing: length, crc, payload, crc)."""
    from tensorboardX.proto import event_pb2
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(directory.glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack_from("<Q", data, offset)
            event = event_pb2.Event.FromString(data[offset + 12:offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars


def test_reporter_writes_jsonl_tensorboard_and_plain_lines(tmp_path):
    out = io.StringIO()  # not a terminal: plain lines with an ETA, no bar
    reporter = reporting.Reporter(str(tmp_path), total_steps=30, flops_per_token=6e6,
                                  peak_flops=1e12, stream=out)
    reported = reporter.train(10, train_metrics(3.0))
    reporter.eval(10, {"eval_loss": 3.2, "eval_ppl": float(np.exp(3.2))})
    reporter.train(20, train_metrics(2.5))
    reporter.close(plot=False)

    assert reported["mfu"] == pytest.approx(1000.0 * 6e6 / 1e12)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("step 10/30 | loss 3.0000") and "| eta " in lines[0]
    assert "mfu 0.6%" in lines[0] and "tok/s 1,000" in lines[0]
    assert lines[1] == "step 10 | eval_loss 3.2000 | eval_ppl 24.5325"

    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"]) for r in records] == [
        (10, "train"), (10, "eval"), (20, "train")]
    assert records[0]["expert_load"] == [[0.25] * 4] * 2 and records[0]["mfu"] > 0
    assert records[1]["eval_loss"] == 3.2

    events = read_events(tmp_path / reporting.TENSORBOARD_DIR)
    assert events["train/loss"] == [(10, 3.0), (20, 2.5)]
    assert events["eval/loss"] == [(10, pytest.approx(3.2))]
    assert events["train/expert_load/3"] == [(10, 0.25), (20, 0.25)]
    assert "train/tokens_per_sec" in events and "train/mfu" in events


def test_progress_bar_on_a_terminal_shows_rate_and_eta(tmp_path):
    out = io.StringIO()
    reporter = reporting.Reporter(None, total_steps=100, start_step=40, progress=True, stream=out)
    reporter.train(50, train_metrics(2.0))
    reporter.train(60, train_metrics(1.9))
    reporter.close()
    text = out.getvalue()
    assert "60/100" in text and ("step/s" in text or "s/step" in text)
    assert "<" in text  # tqdm's "elapsed<remaining"
    assert "step 60/100 | loss 1.9000" in text  # the log lines still print above the bar
    assert not list(tmp_path.iterdir())  # no workdir: no files


def test_only_process_zero_writes(tmp_path):
    out = io.StringIO()
    reporter = reporting.Reporter(str(tmp_path / "run"), 10, is_main=False, stream=out)
    reporter.train(5, train_metrics(1.0))
    reporter.eval(5, {"eval_loss": 1.0})
    reporter.close()
    assert out.getvalue() == "" and not (tmp_path / "run").exists()


def test_wandb_gets_the_same_scalars_when_enabled(tmp_path, monkeypatch):
    logged, runs = [], []
    run = types.SimpleNamespace(url="https://wandb.example/run",
                                finish=lambda: runs.append("finished"),
                                log=lambda values, step: logged.append((step, values)))
    fake = types.SimpleNamespace(init=lambda **kw: runs.append(kw) or run)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    reporter = reporting.Reporter(str(tmp_path), 20, wandb=True, config_dict={"a": 1},
                                  stream=io.StringIO())
    reporter.train(10, train_metrics(2.0))
    reporter.close(plot=False)
    assert runs[0]["config"] == {"a": 1} and runs[0]["resume"] == "allow" and runs[-1] == "finished"
    assert logged[0][0] == 10 and logged[0][1]["train/loss"] == 2.0

    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed: a warning, training goes on
    with pytest.warns(UserWarning, match="pip install wandb"):
        reporting.Reporter(str(tmp_path), 20, wandb=True, stream=io.StringIO()).close(plot=False)


@pytest.mark.slow  # python -m minids_jax.plot
def test_plot_keeps_the_latest_record_per_step_and_writes_a_png(tmp_path):
    records = [{"step": 10, "split": "train", "loss": 3.0},
               {"step": 20, "split": "train", "loss": 2.0},
               {"step": 20, "split": "eval", "eval_loss": 2.4},
               {"step": 20, "split": "train", "loss": 1.5},  # logged again after a resume
               {"step": 30, "split": "train", "loss": 1.0}]
    text = "".join(json.dumps(r) + "\n" for r in records) + '{"step": 40, "spl'  # cut by a kill
    (tmp_path / "metrics.jsonl").write_text(text)
    splits = plot.read_metrics(tmp_path)
    assert {s: r["loss"] for s, r in splits["train"].items()} == {10: 3.0, 20: 1.5, 30: 1.0}
    assert splits["eval"][20]["eval_loss"] == 2.4

    result = subprocess.run([sys.executable, "-m", "minids_jax.plot", str(tmp_path)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    import matplotlib.image
    image = matplotlib.image.imread(tmp_path / "loss.png")
    assert image.shape[0] > 200 and image.shape[1] > 300 and image.std() > 0.01


def test_plot_of_a_directory_without_metrics_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        plot.main([str(tmp_path / "nope")])
    assert exit_info.value.code != 0
    assert "metrics.jsonl does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_training_run_reports_everything(tmp_path):
    config = tiny_config(model=dict(vocab_size=259),
                         train=dict(batch_size=2, log_every=2, eval_every=4, eval_batches=2,
                                    peak_flops=1e11),
                         data=dict(source="builtin", max_bytes=20000))
    history = trainer.run(config, str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [4, 6]
    for record in train[1:]:  # the first window includes compilation and is not timed
        assert record["tokens_per_sec"] > 0 and record["step_time"] > 0
        assert record["mfu"] == pytest.approx(
            record["tokens_per_sec"] * flops.train_flops_per_token(config.model) / 1e11)
    load_NxE = np.array(train[-1]["expert_load"])
    assert load_NxE.shape == (1, 2) and np.allclose(load_NxE.sum(axis=1), 1)
    assert evals[-1]["eval_ppl"] == pytest.approx(np.exp(evals[-1]["eval_loss"]))
    assert np.isfinite(evals[-1]["eval_loss"]) and evals[-1]["eval_loss"] < np.log(259) + 1
    assert history[-1] == {"step": 6, "eval_loss": evals[-1]["eval_loss"],
                           "eval_ppl": evals[-1]["eval_ppl"]}
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert "train/loss" in read_events(tmp_path / "tensorboard")


# --- FLOPs ---------------------------------------------------------------------------------------

def flops_model_config(**overrides) -> ModelConfig:
    """Wide enough that the matmuls dominate what XLA counts."""
    return small_model_config(**{**dict(vocab_size=512, max_seq_len=64, d_model=128,
                                        latent_k=8, n_experts=1, mlp_mult=4), **overrides})


@pytest.mark.parametrize("overrides", [dict(attn_pattern=("mha",)),
                                       dict(attn_pattern=("mha",), n_kv_heads=2, head_dim=48),
                                       dict(attn_pattern=("mla",), q_lora_rank=32)])
def test_matmul_flops_are_twice_the_parameters_a_token_uses(overrides):
    # MHA or MLA, one expert: every parameter but the embedding and norm scales is one matmul
    # weight that each token passes through exactly once.
    cfg = flops_model_config(**overrides)
    model = nnx.eval_shape(lambda: MiniDeepSeek(cfg, compute_config(), rngs=nnx.Rngs(0)))  # shapes only
    params = nnx.state(model, nnx.Param)
    matmul_params = sum(x.size for path, x in nnx.to_flat_state(params)
                        if x.ndim >= 2 and "embed" not in path)
    parts = flops.flops_breakdown(cfg)
    assert sum(parts.values()) - parts["attention_scores"] == 2 * matmul_params


def test_flops_count_active_experts_only():
    base = flops.flops_breakdown(flops_model_config(n_experts=2, top_k=1))
    many = flops.flops_breakdown(flops_model_config(n_experts=16, top_k=1))
    two_active = flops.flops_breakdown(flops_model_config(n_experts=16, top_k=2))
    assert many["experts"] == base["experts"] and two_active["experts"] == 2 * base["experts"]
    assert flops.train_flops_per_token(flops_model_config()) == pytest.approx(
        3 * flops.forward_flops_per_token(flops_model_config()))
    # A frozen base (LoRA) computes no weight gradients: forward and input gradients only.
    assert flops.train_flops_per_token(flops_model_config(), frozen_base=True) == pytest.approx(
        2 * flops.forward_flops_per_token(flops_model_config()))


DEEPSEEK_MOE = dict(attn_pattern=("mla",), router_scoring="sigmoid", n_experts=4, n_group=2,
                    topk_group=1, top_k=2, n_shared_experts=1, moe_hidden_dim=128,
                    first_k_dense=1, dense_hidden_dim=384)


@pytest.mark.parametrize("overrides", [dict(attn_pattern=("mha",)), dict(attn_pattern=("mhla",)),
                                       dict(attn_pattern=("mla",)), DEEPSEEK_MOE],
                         ids=["mha", "mhla", "mla", "deepseek_moe"])
def test_flops_agree_with_the_compiler_count(overrides):
    """XLA also counts elementwise work and the masked-out half of attention, so it may exceed
    the analytic count by a little, never fall short of it. (With several experts, the dense
    dispatch computes every one: the count then is for n_experts active ones.)"""
    cfg = flops_model_config(**overrides)
    if cfg.n_experts > 1:  # the dense dispatch runs all experts for every token
        cfg = flops_model_config(**{**overrides, "top_k": cfg.n_experts, "topk_group": cfg.n_group})
    # Every expert = the active one here; and layers unscanned, since XLA counts a loop's body once.
    dense = compute_config(moe_dispatch="dense", scan_layers=False)
    graphdef, state = nnx.split(MiniDeepSeek(cfg, dense, rngs=nnx.Rngs(0)))
    forward = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)[0])
    tokens = jnp.zeros((1, cfg.max_seq_len), jnp.int32)
    cost = forward.lower(state, tokens).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    xla_per_token = cost["flops"] / cfg.max_seq_len
    assert 1.0 <= xla_per_token / flops.forward_flops_per_token(cfg) < 1.06


def test_peak_flops_from_config_or_measured():
    assert flops.peak_flops_per_device("float32", configured=2e12) == (
        2e12, "config train.peak_flops")
    measured, source = flops.peak_flops_per_device("float32")
    assert "measured" in source and 1e8 < measured < 1e16
