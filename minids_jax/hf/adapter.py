"""A LoRA run's adapters as a PEFT adapter (`python -m minids_jax.hf export --adapter_only`).

PEFT's layout: `adapter_config.json` (r, lora_alpha, the adapted modules by their transformers
names) and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, in]
and `lora_B.weight` [out, r]; PEFT scales by lora_alpha / r, as lora.py does.

The routed experts' adapters go out in peft's form for a parameter (`target_parameters`, peft
>= 0.17: its `ParamWrapper`), on transformers' fused `mlp.experts.gate_up_proj` [E, 2F, D] and
`mlp.experts.down_proj` [E, D, F]. For such a [E, out, in] parameter of rank r, peft holds
`lora_A.weight` [E*r, in] (row e*r + k: expert-major) and `lora_B.weight` [out, r*E] (column
k*E + e: rank-major), and adds lora_alpha / r * B_e @ A_e to expert e. gate_up_proj fuses the
gate (our w1) and up (w2) projections, each with its own rank-R adapter: one A/B pair holds both
exactly at rank 2R, A_e the two A's stacked, B_e the two B's block-diagonal; `rank_pattern` and
`alpha_pattern` give that parameter rank 2R and alpha 2*alpha, so the scaling stays alpha / R
(peft converts transformers 4's per-expert adapters the same way).
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import numpy as np

from minids_jax import checkpoint
from minids_jax.checkpoint.base import locate_base
from minids_jax.checkpoint.loading import SavedParams
from minids_jax.hf import config as hf_config
from minids_jax.hf import dense
from minids_jax.hf import weights


# transformers registers the experts' gate_up_proj before down_proj, and peft wraps the targeted
# parameters of a module in that order, each wrapper around the previous one: where both are
# adapted, gate_up_proj's wrapper is the inner one and its tensors are saved under `base_layer`.
FUSED_EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")


def peft_targets(adapted: set[str], every_module: list[str], short_parts: int = 1) -> list[str]:
    """`target_modules` as PEFT users write them: a projection's short name (`q_proj`, its last
    `short_parts` name parts) where the adapters cover every module of that name, the full
    module names where they do not (a short name would put adapters on the other layers'
    modules too). Also `target_parameters` (`mlp.experts.gate_up_proj`, short_parts=3)."""
    def short_name(module: str) -> str:
        return ".".join(module.split(".")[-short_parts:])

    by_short: dict[str, set[str]] = {}
    for module in every_module:
        by_short.setdefault(short_name(module), set()).add(module)
    targets = set()
    for module in adapted:
        short = short_name(module)
        targets |= {short} if by_short[short] <= adapted else {module}
    return sorted(targets)


def param_wrapper_pair(halves: dict[int | None, tuple[np.ndarray, np.ndarray]]
                       ) -> tuple[np.ndarray, np.ndarray]:
    """(lora_A.weight, lora_B.weight) of peft's ParamWrapper on a fused expert parameter, from
    our adapters (a [E, in, R], b [E, R, out]) by the part of the parameter they adapt: None
    the whole (down_proj), 0 the gate and 1 the up half of gate_up_proj. The rank is R times
    the number of adapters; a half without one gets zero rows in B."""
    parts = sorted(halves, key=lambda half: half or 0)
    n_experts, _, rank = halves[parts[0]][0].shape
    part_rows = halves[parts[0]][1].shape[-1]
    rows = part_rows * (1 if parts == [None] else 2)
    a_stack = np.concatenate([np.swapaxes(halves[half][0], 1, 2) for half in parts], axis=1)
    b_stack = np.zeros((n_experts, rows, rank * len(parts)), np.float32)
    for i, half in enumerate(parts):  # block-diagonal: each adapter's B on its own rows
        first = (half or 0) * part_rows
        b_stack[:, first:first + part_rows, i * rank:(i + 1) * rank] = np.swapaxes(
            halves[half][1], 1, 2)
    lora_a = a_stack.reshape(-1, a_stack.shape[-1])  # [E*r, in], expert-major rows
    lora_b = b_stack.transpose(1, 2, 0).reshape(rows, -1)  # [out, r*E], rank-major columns
    return lora_a, lora_b


def fused_expert_adapters(params: dict, expert_tensors: dict, log: Callable[[str], None]
                          ) -> tuple[dict[str, np.ndarray], dict[str, int]]:
    """The routed experts' adapters as peft's ParamWrapper tensors by their saved names, and
    each adapted fused parameter's number of adapters (2 where gate and up are both adapted).
    `expert_tensors`: {our expert weight path: weights.Tensor}."""
    fused: dict[str, dict] = {}
    for path in sorted(expert_tensors):
        a_key = path[:-1] + (f"{path[-1]}_lora_a",)
        if a_key not in params:
            continue
        if path[0] == "mtp":
            log(f"skipping the adapters of {'.'.join(path)}: transformers' model has no MTP "
                f"modules")
            continue
        name, half = expert_tensors[path].fused()
        fused.setdefault(name, {})[half] = (
            np.asarray(params[a_key], np.float32),
            np.asarray(params[path[:-1] + (f"{path[-1]}_lora_b",)], np.float32))
    tensors = {}
    for name, halves in fused.items():
        module, parameter = name.rsplit(".", 1)
        wrapped = [p for p in FUSED_EXPERT_PARAMETERS if f"{module}.{p}" in fused]
        inner = ".base_layer" * (len(wrapped) - 1 - wrapped.index(parameter))
        lora_a, lora_b = param_wrapper_pair(halves)
        tensors[f"base_model.model.{module}{inner}.lora_A.weight"] = lora_a
        tensors[f"base_model.model.{module}{inner}.lora_B.weight"] = lora_b
    return tensors, {name: len(halves) for name, halves in fused.items()}


def imported_base(workdir: str | pathlib.Path, step: int | None = None) -> str | None:
    """The Hugging Face directory a LoRA run's base was imported from, as the import recorded
    it in the base's metadata (None for a base trained here)."""
    directory, step = checkpoint.resolve(workdir, step)
    base = checkpoint.read_meta(directory, step).get("base")
    if base is None:
        return None
    base_directory, base_step = locate_base(base, directory / str(step))
    return checkpoint.read_meta(base_directory, base_step).get("imported_from")


def export_adapter(workdir: str | pathlib.Path, out: str | pathlib.Path, *,
                   step: int | None = None, base_model: str | None = None,
                   log: Callable[[str], None] = print) -> list[str]:
    """Writes a LoRA run's adapters as a PEFT adapter (adapter_config.json,
    adapter_model.safetensors) for `peft.PeftModel.from_pretrained` on the base model exported
    from `checkpoint.init_from`'s run: the attention projections' and the head's, and the
    routed experts' on transformers' fused expert parameters (peft's `target_parameters`).
    Adapters of DeepSeek-V3's dense and shared MLPs and trained norm gains have no form peft
    loads (those runs are exported merged); the MTP modules' adapters are left out.
    `adapter_config.json` names as its base `base_model` (a directory or hub id), else the
    Hugging Face directory the base was imported from, so that
    `PeftModel.from_pretrained(base, adapter)` finds it."""
    config = checkpoint.read_config(workdir, step)
    cfg, lora_cfg = config.model, config.lora
    base_model = base_model or imported_base(workdir, step)
    if base_model is None:
        log(f"the base of {workdir} was not imported from a Hugging Face model: export it "
            f"(python -m minids_jax.hf export --workdir {config.checkpoint.init_from} --out "
            f"BASE) and pass --base_model BASE, or set base_model_name_or_path in "
            f"adapter_config.json")
    hf_config.to_hf(cfg)  # raises if the base has no Hugging Face form
    if not lora_cfg.rank:
        raise hf_config.HFFormatError(f"{workdir} is not a LoRA run (lora.rank=0); export it "
                                      f"without --adapter_only.")
    if lora_cfg.train_norms:
        raise hf_config.HFFormatError("lora.train_norms=True changed the norm gains, which a "
                                      "PEFT adapter cannot hold; export the merged model.")
    # Only the adapters are read (not the base, a model's worth of memory).
    params = SavedParams(workdir, step)
    adapted = sorted({path[:-1] for path in params if path[-1] in ("lora_a", "lora_b")})
    by_path = {tensor.path[:-1]: tensor for tensor in weights.layout(cfg)
               if tensor.kind == weights.LINEAR}
    expert_tensors = {tensor.path: tensor for tensor in weights.layout(cfg)
                      if tensor.kind == weights.EXPERTS}
    mlps = sorted(".".join(path) for path in adapted if path[0] != "mtp" and by_path[path].name
                  .endswith(("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
                  and dense.family_of(cfg) is None)  # llama's and qwen2's MLPs load
    if mlps:
        # peft (0.21, with transformers 5) reads target modules named gate_proj, up_proj or
        # down_proj of a DeepSeek-V3 model as the fused routed experts: it would drop these.
        raise hf_config.HFFormatError(
            f"the dense and shared MLPs' adapters ({mlps[0]}, ...) would not load in peft, "
            f"which takes gate_proj/up_proj/down_proj of DeepSeek-V3 models for the routed "
            f"experts; export the merged model, or adapt attention and the head only.")
    tensors, modules = {}, set()
    for module_path in adapted:
        if module_path[0] == "mtp":
            log(f"skipping the adapters of {'.'.join(module_path)}: transformers' model has no "
                f"MTP modules")
            continue
        module = by_path[module_path].name[:-len(".weight")]
        modules.add(module)
        a, b = params[module_path + ("lora_a",)], params[module_path + ("lora_b",)]
        tensors[f"base_model.model.{module}.lora_A.weight"] = np.asarray(a, np.float32).T
        # B's rows are the projection's outputs: q and k rows in the checkpoint's order.
        tensors[f"base_model.model.{module}.lora_B.weight"] = by_path[module_path].rows_to_hf(
            np.asarray(b, np.float32).T)
    every_module = [tensor.name[:-len(".weight")] for path, tensor in by_path.items()
                    if path[0] != "mtp"]
    expert_adapters, adapters_per_parameter = fused_expert_adapters(params, expert_tensors, log)
    tensors.update(expert_adapters)
    every_parameter = sorted({tensor.fused()[0] for path, tensor in expert_tensors.items()
                              if path[0] != "mtp"})
    target_parameters = peft_targets(set(adapters_per_parameter), every_parameter,
                                     short_parts=3)
    # gate_up_proj with gate and up both adapted has rank 2R; alpha doubles too, keeping alpha/R.
    doubled = sorted(name for name, count in adapters_per_parameter.items() if count == 2)
    gate_ups = sorted(name for name in adapters_per_parameter if name.endswith(".gate_up_proj"))
    if doubled and doubled == gate_ups:  # all of the adapted ones: one pattern names them
        doubled = ["mlp.experts.gate_up_proj"]
    rank_pattern = {name: 2 * lora_cfg.rank for name in doubled}
    alpha_pattern = {name: 2 * lora_cfg.alpha for name in doubled}
    out = pathlib.Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout, "bias": "none",
        "target_modules": peft_targets(modules, every_module), "fan_in_fan_out": False,
        "use_rslora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "base_model_name_or_path": base_model}
    if target_parameters:  # a key peft < 0.17 does not know: only where the experts need it
        adapter_config["target_parameters"] = target_parameters
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    written = ["adapter_config.json", "adapter_model.safetensors"]
    log(f"wrote {out}: {', '.join(written)} ({len(modules)} adapted projections"
        + (f", {len(adapters_per_parameter)} fused expert parameters" if target_parameters
           else "") + ")")
    return written
