"""Runs the multi-device cases in a fresh process with simulated CPU devices.

    python tests/mesh_worker.py meshes OUT_DIR
    python tests/mesh_worker.py process OUT_DIR PROCESS_ID NUM_PROCESSES PORT DEVICES STEPS
    python tests/mesh_worker.py single OUT_DIR DEVICES STEPS

The pytest process keeps one device, so the tests start this script in a subprocess (the
device count is fixed when JAX starts) and assert on what it writes to OUT_DIR.
"""

from __future__ import annotations

import json
import os
import sys


def _start_jax(n_devices: int) -> None:
    """Before jax is imported: the simulated device count, and the tests' XLA flags."""
    from tests.factories import FAST_COMPILE_XLA_FLAGS

    os.environ["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={n_devices} "
                               + FAST_COMPILE_XLA_FLAGS)
    os.environ["JAX_PLATFORMS"] = "cpu"


# The tests' tiny run with an MHLA and an MLA layer, DeepSeekMoE (4 sigmoid-routed experts
# top-2 in 2 groups, a shared expert) and float32 throughout. A large AdamW eps: the first
# Adam step is g / (|g| + eps), i.e. sign(g) for a small eps, which turns last-bit differences in
# near-zero gradients (summation order differs between meshes) into full lr-sized differences;
# eps=1e-3 keeps the update a smooth function of the gradient, so equal gradients give equal
# parameters to float32 precision.
WORKER = dict(
    model=dict(n_layers=2, attn_pattern=("mhla", "mla"), n_heads=4, n_experts=4, top_k=2,
               router_scoring="sigmoid", n_group=2, topk_group=2, n_shared_experts=1),
    compute=dict(dtype="float32"),
    optim=dict(lr=1e-2, warmup_steps=0, total_steps=3, eps=1e-3),
    train=dict(batch_size=8),
)

MESHES = {
    "data8": dict(data=8),
    "fsdp8": dict(data=1, fsdp=8),
    "data2_fsdp2_tensor2": dict(data=2, fsdp=2, tensor=2),
    "data2_expert4": dict(data=2, expert=4),
}


# LoRA on every kind of projection: attention, shared experts, routed experts one by one.
LORA = dict(rank=2, targets=("attn.*", "shared.*", "moe.w1"))
LORA_MESHES = ("fsdp8", "data2_expert4")

# The families' features on the meshes that split them. A llama: grouped-query attention (2 KV
# heads for 4 heads, so tensor=2 splits the KV heads too), biases on q/k/v, the output and the
# MLP, llama3 RoPE, a tied head, dense MLPs. A DeepSeek-V2: MLA without query compression,
# softmax scores picked group_limited_greedy (group score = the max), no selection bias.
FAMILIES = {
    "llama": dict(model=dict(
        n_layers=2, attn_pattern=("mha",), n_heads=4, n_kv_heads=2, first_k_dense=2,
        qkv_bias=True, out_bias=True, mlp_bias=True, tie_embeddings=True,
        rope_scaling="llama3", rope_factor=8.0, rope_original_max_len=4)),
    "deepseek_v2": dict(model=dict(
        n_layers=2, attn_pattern=("mla",), n_heads=4, q_lora_rank=0, first_k_dense=1,
        n_experts=8, top_k=2, router_scoring="softmax", n_group=4,
        topk_group=2, group_score="max", norm_topk_prob=False, routed_scaling_factor=16.0)),
}
# A QLoRA run: an NF4 base whose blocks of 64 inputs split over fsdp=8 (widths 512; values
# 4 x 16)
# under LoRA on attention and routed experts.
QLORA = dict(model=dict(d_model=512, kv_lora_rank=512, qk_nope_head_dim=16, qk_rope_head_dim=8,
                        v_head_dim=16, latent_k=4),
             lora=dict(LORA, targets=("attn.*", "moe.w1"), base_quant="nf4"))
FAMILY_MESHES = {"llama": ("data2_fsdp2_tensor2", "fsdp8"),
                 "deepseek_v2": ("data2_expert4", "data2_fsdp2_tensor2")}


def tiny_config(mesh: dict, **overrides):
    from tests.factories import tiny_config as shared_tiny_config

    groups = {name: dict(values) for name, values in WORKER.items()}
    for group, values in overrides.items():
        groups.setdefault(group, {}).update(values)
    return shared_tiny_config(**groups, mesh=mesh)


def _leaves_by_path(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(path).replace(".value", ""): leaf
            for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def run_meshes(out_dir: str) -> None:
    """One train step on 1 device and on each mesh: loss, updated state, memory, shards."""
    import jax
    import numpy as np

    from minids_jax.training import trainer

    report = {}
    cases = {name: (mesh, {}) for name, mesh in {"one_device": dict(data=1), **MESHES}.items()}
    cases.update({f"lora_{name}": (mesh, dict(lora=LORA)) for name, mesh in
                  {"one_device": dict(data=1), **{m: MESHES[m] for m in LORA_MESHES}}.items()})
    cases.update({f"qlora_{name}": (mesh, QLORA) for name, mesh in
                  {"one_device": dict(data=1), "fsdp8": MESHES["fsdp8"]}.items()})
    for family, overrides in FAMILIES.items():
        cases.update({f"{family}_{name}": (mesh, overrides) for name, mesh in
                      {"one_device": dict(data=1),
                       **{m: MESHES[m] for m in FAMILY_MESHES[family]}}.items()})
    for name, (mesh, overrides) in cases.items():
        devices = jax.devices()[:1] if name.endswith("one_device") else jax.devices()
        run = trainer.Trainer(tiny_config(mesh, **overrides), devices=devices)
        batch = run.batch(0)
        compiled = run.train_step.lower(run.step_state, batch).compile()
        memory = compiled.memory_analysis()
        run.step_state, metrics = compiled(run.step_state, batch)
        leaves = _leaves_by_path(run.state)  # one array per layer, as checkpoints hold them
        np.savez(os.path.join(out_dir, f"{name}.npz"),
                 **{path: np.asarray(jax.device_get(x)) for path, x in leaves.items()})
        report[name] = {
            "loss": float(metrics["loss"]),
            "mesh": dict(run.mesh.shape),
            "all_gathers": compiled.as_text().count(" all-gather("),
            "argument_bytes": memory.argument_size_in_bytes,
            "temp_bytes": memory.temp_size_in_bytes,
            "shards": {path: {"size": int(x.size),
                              "device_size": int(x.addressable_shards[0].data.size),
                              "spec": str(x.sharding.spec)} for path, x in leaves.items()},
        }
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(report, f)


def run_training(out_dir: str, steps: int, tag: str, devices_cfg: dict | None = None) -> None:
    """The real loop (Trainer.train) for a few steps; writes the logged losses."""
    import jax

    from minids_jax import startup
    from minids_jax.training import trainer

    config = tiny_config(dict(data=-1), optim=dict(total_steps=steps),
                         devices=devices_cfg or {})
    job = startup.initialize_distributed(config.devices)
    run = trainer.Trainer(config)
    history = run.train()
    result = {"job": job, "process_index": jax.process_index(),
              "rows": [run.rows.start, run.rows.stop],  # of the global batch, built here
              "process_count": jax.process_count(), "device_count": jax.device_count(),
              "local_device_count": jax.local_device_count(),
              "losses": [float(h["loss"]) for h in history if "loss" in h],
              "eval_loss": [float(h["eval_loss"]) for h in history if "eval_loss" in h]}
    with open(os.path.join(out_dir, f"{tag}.json"), "w") as f:
        json.dump(result, f)


def main(argv: list[str]) -> None:
    mode, out_dir = argv[1], argv[2]
    if mode == "meshes":
        _start_jax(8)
        run_meshes(out_dir)
    elif mode == "process":
        process_id, num_processes, port, n_devices, steps = map(int, argv[3:8])
        _start_jax(n_devices)
        os.environ["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] = "gloo"  # cross-process collectives
        run_training(out_dir, steps, f"process{process_id}", dict(
            coordinator_address=f"127.0.0.1:{port}", num_processes=num_processes,
            process_id=process_id, init_timeout_s=60))
    elif mode == "single":
        n_devices, steps = map(int, argv[3:5])
        _start_jax(n_devices)
        run_training(out_dir, steps, "single")
    else:
        raise SystemExit(f"unknown mode {mode!r}; use meshes, process or single")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv)
