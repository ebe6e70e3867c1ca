"""A LoRA run's adapters as a PEFT adapter (`python -m minids_jax.hf export --adapter_only`).

PEFT's layout: `adapter_config.json` (r, lora_alpha, the adapted modules by their transformers
names) and `adapter_model.safetensors` with `base_model.model.<module>.lora_A.weight` [r, in]
and `lora_B.weight` [out, r]; PEFT scales by lora_alpha / r, as lora.py does.
"""

from __future__ import annotations

import json
import pathlib
from typing import Callable

import numpy as np

from minids_jax import checkpoint
from minids_jax.checkpoint.base import locate_base
from minids_jax.hf import config as hf_config
from minids_jax.hf import dense
from minids_jax.hf import weights
from minids_jax.hf.convert import flat_paths
from minids_jax.model import lora


def peft_targets(adapted: set[str], every_module: list[str]) -> list[str]:
    """`target_modules` as PEFT users write them: a projection's short name (`q_proj`) where
    the adapters cover every module of that name, the full module names where they do not (a
    short name would put adapters on the other layers' modules too)."""
    by_short: dict[str, set[str]] = {}
    for module in every_module:
        by_short.setdefault(module.rsplit(".", 1)[-1], set()).add(module)
    targets = set()
    for module in adapted:
        short = module.rsplit(".", 1)[-1]
        targets |= {short} if by_short[short] <= adapted else {module}
    return sorted(targets)


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
    from `checkpoint.init_from`'s run: the attention projections' and the head's. Adapters of
    MLPs and routed experts and trained norm gains have no form peft loads (those runs are
    exported merged); the MTP modules' adapters are left out. `adapter_config.json` names as
    its base `base_model` (a directory or hub id), else the Hugging Face directory the base was
    imported from, so that `PeftModel.from_pretrained(base, adapter)` finds it."""
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
    params = flat_paths(checkpoint.load_params(workdir, step))
    adapted = sorted({path[:-1] for path in params if path[-1] in ("lora_a", "lora_b")})
    experts = sorted(".".join(path) for path in params
                     if lora.is_adapter(path[-1]) and path[-1] not in ("lora_a", "lora_b"))
    if experts:
        raise hf_config.HFFormatError(
            f"the routed experts' adapters ({experts[0]}, ...) have no PEFT form (transformers "
            f"fuses the experts); export the merged model, or train without 'moe.w*' targets.")
    by_path = {tensor.path[:-1]: tensor for tensor in weights.layout(cfg)
               if tensor.kind == weights.LINEAR}
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
    out = pathlib.Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
              str(out / "adapter_model.safetensors"), metadata={"format": "pt"})
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": lora_cfg.rank,
        "lora_alpha": lora_cfg.alpha, "lora_dropout": lora_cfg.dropout, "bias": "none",
        "target_modules": peft_targets(modules, every_module), "fan_in_fan_out": False, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_model}
    (out / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    written = ["adapter_config.json", "adapter_model.safetensors"]
    log(f"wrote {out}: {', '.join(written)} ({len(modules)} adapted projections)")
    return written
