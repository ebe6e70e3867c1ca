"""Import a Hugging Face DeepSeek-V3 directory as a run, and export a run as one.

    import_dir(hf_dir, workdir, config)  # -> the run's Config; an orbax checkpoint at step 0
    export_run(workdir, out, step=None, dtype="bfloat16")

Import reads one checkpoint tensor at a time from memory-mapped files and places it straight
into its sharded layout on the current mesh (the host holds at most one tensor in float32 beside
the placed arrays); the checkpoint it writes has no optimizer state, which a run resuming it
creates fresh, as it would at step 0. Export reads the saved parameters and writes one shard
of tensors at a time.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import shutil
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx
from flax.traverse_util import flatten_dict, unflatten_dict

from minids_jax import sharding
from minids_jax.checkpoint import store
from minids_jax.checkpoint.loading import SavedParams
from minids_jax.checkpoint.store import CheckpointError
from minids_jax.config import Config, ConfigError
from minids_jax.config.model import ModelConfig
from minids_jax.data import pipeline as data_lib
from minids_jax.data.tokenization import HFTokenizer
from minids_jax.hf import config as hf_config
from minids_jax.hf import weights
from minids_jax.hf.files import TensorFiles, save
from minids_jax.hf.weights import EXPERTS, Tensor
from minids_jax.model import build
from minids_jax.workdir import CHECKPOINTS, complete_steps

# Newer transformers save the chat template as chat_template.jinja, not in tokenizer_config.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")
# Tensors some checkpoints carry that are recomputed here.
RECOMPUTED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_SHARD_BYTES = 5 << 30  # the hub's usual shard size


def read_hf_config(hf_dir: pathlib.Path) -> dict[str, Any]:
    path = hf_dir / "config.json"
    if not hf_dir.is_dir():
        raise hf_config.HFFormatError(f"{hf_dir} is not a directory; pass the directory of a "
                                      f"Hugging Face model (with config.json and *.safetensors).")
    if not path.is_file():
        raise hf_config.HFFormatError(f"{hf_dir} has no config.json; pass the directory of a "
                                      f"Hugging Face model (with config.json and *.safetensors).")
    try:
        return json.loads(path.read_text())
    except ValueError as error:
        raise hf_config.HFFormatError(f"{path} is not valid JSON ({error}).") from error


class Reader:
    """Checkpoint tensors in float32, FP8 ones dequantized; remembers which were read."""

    def __init__(self, files: TensorFiles, hf: dict[str, Any], origin: str):
        self.files, self.used = files, set()
        quantization = hf.get("quantization_config")
        self.block = None
        if quantization:
            method, fmt = quantization.get("quant_method"), quantization.get("fmt", "e4m3")
            if method != "fp8" or fmt != "e4m3":
                raise hf_config.HFFormatError(
                    f"{origin}: quantization_config {method!r}/{fmt!r} is not supported (only "
                    f"DeepSeek-V3's fp8 e4m3 with block scales, which is dequantized).")
            self.block = tuple(quantization.get("weight_block_size", (128, 128)))

    def __call__(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Tensor `name` in float32, checked to have `shape` if given."""
        if name not in self.files:
            raise hf_config.HFFormatError(f"the checkpoint has no tensor {name!r}; are "
                                          f"config.json and the *.safetensors files one model?")
        if shape is not None and self.files.shape(name) != shape:
            raise hf_config.HFFormatError(
                f"tensor {name} has shape {self.files.shape(name)} but config.json implies "
                f"{shape}; are config.json and the *.safetensors files one model?")
        self.used.add(name)
        array = self.files[name]
        scale = name + "_scale_inv"
        if scale in self.files:
            if self.block is None:
                raise hf_config.HFFormatError(f"{scale} is in the checkpoint but config.json "
                                              f"has no quantization_config.")
            self.used.add(scale)
            return weights.dequantize(array, self.files[scale], self.block)
        return array.astype(np.float32)

    def ours(self, tensor: Tensor, shape: tuple[int, ...]) -> np.ndarray:
        """Our float32 array of `tensor`, of `shape`; routed experts from per-expert or fused
        tensors."""
        expected = weights.hf_shape(tensor, shape)
        if tensor.kind != EXPERTS:
            array = tensor.rows_to_ours(self(tensor.name, expected))
            return array if tensor.kind == weights.COPY else array.T
        if tensor.name.format(e=0) in self.files:
            return np.stack([self(tensor.name.format(e=e), expected).T
                             for e in range(tensor.n_experts)])
        fused, half = tensor.fused()
        n_experts, rows, cols = shape  # [E, D, F] or [E, F, D]: fused [E, 2F, D] / [E, D, F]
        array = self(fused, (n_experts, 2 * cols, rows) if half is not None
                     else (n_experts, cols, rows))
        if half is not None:
            array = array[:, half * cols:(half + 1) * cols]
        return np.ascontiguousarray(array.transpose(0, 2, 1))


def _abstract_state(model_cfg: ModelConfig, config: Config, mesh) -> tuple[Any, dict]:
    config = dataclasses.replace(config, model=model_cfg)
    platform = sharding.mesh_platform(mesh)
    with nnx.logical_axis_rules(config.mesh.axis_rules):
        graphdef, state = nnx.get_abstract_model(lambda: build(config, platform, nnx.Rngs(0)),
                                                 mesh)
    return graphdef, state


def flat_paths(tree: dict) -> dict[tuple[str, ...], Any]:
    """A nested state dict as {key path: leaf}, list indices as str (as orbax restores them)."""
    return {tuple(map(str, path)): leaf for path, leaf in flatten_dict(tree).items()}


def import_dir(hf_dir: str | pathlib.Path, workdir: str | pathlib.Path, config: Config, *,
               with_mtp: bool = True, max_seq_len: int | None = None,
               log: Callable[[str], None] = print) -> Config:
    """Writes `workdir` as a run of the model in `hf_dir`: an orbax checkpoint at step 0, the
    tokenizer files, and a `config.py` to train or resume it with. `config` gives everything
    but the architecture (mesh, training, data); returns the run's Config. `max_seq_len`
    (default: `max_position_embeddings`) is the run's context and training window: the
    function at the positions below it is the same."""
    hf_dir, workdir = pathlib.Path(hf_dir).expanduser(), pathlib.Path(workdir).expanduser()
    saved = workdir / CHECKPOINTS
    if complete_steps(saved):
        raise CheckpointError(f"{saved} already holds checkpoints; import into a new "
                              f"--workdir.")
    hf = read_hf_config(hf_dir)
    origin = str(hf_dir / "config.json")
    fields = hf_config.from_hf(hf, origin)
    files = TensorFiles(hf_dir)
    mtp_first = f"model.layers.{fields['n_layers']}.eh_proj.weight"
    if fields["mtp_depth"] and not with_mtp:
        log(f"skipping the {fields['mtp_depth']} MTP layer(s) (model.layers."
            f"{fields['n_layers']}+): imported without multi-token prediction")
        fields["mtp_depth"] = 0
    elif fields["mtp_depth"] and mtp_first not in files:
        log(f"config.json has num_nextn_predict_layers={fields['mtp_depth']} but the files hold "
            f"no MTP weights ({mtp_first}): imported without multi-token prediction")
        fields["mtp_depth"] = 0
    if max_seq_len:
        fields["max_seq_len"] = max_seq_len
    model_cfg = _checked(ModelConfig, fields, origin, param_dtype=config.model.param_dtype)
    tokenizer_present = (hf_dir / "tokenizer.json").is_file()
    if tokenizer_present:  # a tokenizer a run could not use is an error now, not at training
        try:
            HFTokenizer(hf_dir)
        except (ValueError, OSError) as error:  # (JSONDecodeError is a ValueError)
            raise hf_config.HFFormatError(f"{hf_dir}'s tokenizer cannot be used: {error}") \
                from error
    data = (dataclasses.replace(config.data, tokenizer="hf") if tokenizer_present else
            dataclasses.replace(config.data, tokenizer="byte", source="random", path=""))
    if not tokenizer_present:
        log(f"{hf_dir} has no tokenizer.json: the run trains on data.source='random' until you "
            f"give it token data (data.source='tokens')")
    run_config = _checked(Config, dict(config.__dict__, model=model_cfg, data=data), origin)

    reader = Reader(files, hf, origin)
    mesh = sharding.make_mesh(run_config.mesh)
    graphdef, abstract = _abstract_state(model_cfg, run_config, mesh)
    targets = flat_paths(nnx.to_pure_dict(abstract))
    placed = {}
    for tensor in weights.layout(model_cfg):
        target = targets[tensor.path]
        array = reader.ours(tensor, target.shape).astype(target.dtype, copy=False)
        placed[tensor.path] = jax.make_array_from_callback(
            target.shape, target.sharding, lambda index, a=array: a[index])
        del array
    missing = sorted(set(targets) - set(placed))
    assert not missing, f"no checkpoint tensor maps to {missing}"  # a bug in weights.layout
    unused = _unused(files, reader.used, model_cfg, hf)
    if unused:
        raise hf_config.HFFormatError(
            f"{hf_dir} has tensors this model would not use: {unused[:4]}"
            f"{f' and {len(unused) - 4} more' if len(unused) > 4 else ''}; are config.json and "
            f"the *.safetensors files one model?")
    store.save_model(workdir, run_config, unflatten_dict(placed),
                     imported_from=str(hf_dir.resolve()))
    for name in TOKENIZER_FILES:
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, workdir / name)
    write_config_file(workdir, run_config, hf_dir)
    return run_config


def _checked(cls, fields: dict, origin: str, **more):
    try:
        return cls(**{**fields, **more})
    except ConfigError as error:
        raise hf_config.HFFormatError(f"{origin}: the model cannot be built here: "
                                      f"{error}") from error


def _unused(files: TensorFiles, used: set[str], cfg: ModelConfig, hf: dict) -> list[str]:
    """Tensors of the files that were neither read nor known to be redundant."""
    redundant = {copy for copy, _ in weights.mtp_copies(cfg)}
    n_mtp_on_disk = int(hf.get("num_nextn_predict_layers", 0) or 0)
    skipped = tuple(f"model.layers.{cfg.n_layers + k}." for k in range(cfg.mtp_depth,
                                                                         n_mtp_on_disk))
    return sorted(name for name in files.names()
                  if name not in used and name not in redundant
                  and not name.endswith(RECOMPUTED_SUFFIXES) and not name.startswith(skipped)
                  and not (name.endswith("_scale_inv") and name[:-len("_scale_inv")] in used))


CONFIG_FILE_TEMPLATE = '''"""The config of the model imported from {origin}: train or resume it with
    python train.py --config {config_py} --workdir {workdir}
"""

import json

import ml_collections

CONFIG = json.loads(r"""
{json}
""")


def get_config():
    return ml_collections.ConfigDict(CONFIG)
'''


def write_config_file(workdir: pathlib.Path, config: Config, origin: pathlib.Path) -> None:
    path = workdir / "config.py"
    path.write_text(CONFIG_FILE_TEMPLATE.format(origin=origin, config_py=path, workdir=workdir,
                                                json=config.to_json()))


def export_run(workdir: str | pathlib.Path, out: str | pathlib.Path, *, step: int | None = None,
               dtype: str = "bfloat16", max_shard_bytes: int = MAX_SHARD_BYTES,
               with_mtp: bool = True, log: Callable[[str], None] = print) -> list[str]:
    """Writes the run's model as a Hugging Face DeepSeek-V3 directory; returns its files.
    Without `with_mtp`, the MTP modules are left out (transformers lists their tensors as
    unexpected when it loads the model, and runs them only to draft tokens)."""
    import ml_dtypes

    config = store.read_config(workdir, step)
    cfg = config.model if with_mtp else dataclasses.replace(config.model, mtp_depth=0)
    # The run's saved BPE tokenizer as it is (load_tokenizer would train one if it were gone).
    tokenizer = data_lib.load_tokenizer(config, str(workdir)) if config.data.tokenizer != "bpe" \
        else data_lib.BpeTokenizer.load(pathlib.Path(workdir) / data_lib.TOKENIZER_FILE)
    # (A run on random tokens may have a vocabulary without the byte tokenizer's specials.)
    special = {name: token if token < cfg.vocab_size else None for name, token in
               (("bos", tokenizer.BOS), ("eos", tokenizer.EOS), ("pad", tokenizer.PAD))}
    hf = hf_config.to_hf(cfg, dtype=dtype, special_ids=special)  # raises if inexpressible
    out = pathlib.Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    # Read a tensor at a time, LoRA adapters merged into their weights as they are read.
    params = SavedParams(workdir, step, merge=config.lora if config.lora.rank else None)
    note = params.quantization_note(config.lora.base_quant)
    if note:
        log(note)
    target = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]

    layout = weights.layout(cfg)

    def tensors():
        for tensor in layout:
            # The router routes in float32; transformers keeps it float32 as well.
            keep_f32 = tensor.path[-1] == "bias" or tensor.path[-2:] == ("gate", "kernel")
            array = np.asarray(params[tensor.path]).astype(np.float32 if keep_f32 else target)
            yield from weights.to_hf(tensor, array)
        by_name = {tensor.name: tensor for tensor in layout}
        for copy, main in weights.mtp_copies(cfg):
            tensor = by_name[main]
            yield from ((copy, a.astype(target))
                        for _, a in weights.to_hf(tensor, params[tensor.path]))

    written = save(tensors(), out, max_shard_bytes)
    (out / "config.json").write_text(json.dumps(hf, indent=2) + "\n")
    generation = {f"{name}_token_id": token for name, token in special.items()}
    generation["do_sample"] = False
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    written += ["config.json", "generation_config.json"]
    written += _export_tokenizer(config, pathlib.Path(workdir), out, tokenizer)
    log(f"wrote {out}: {', '.join(written)}")
    return written


def _export_tokenizer(config: Config, workdir: pathlib.Path, out: pathlib.Path,
                      tokenizer) -> list[str]:
    """The run's tokenizer as transformers' PreTrainedTokenizerFast files ([] for bytes,
    which have no tokenizer.json: token ids are the UTF-8 bytes)."""
    if config.data.tokenizer == "hf":
        names = [name for name in TOKENIZER_FILES if (workdir / name).is_file()]
        for name in names:
            shutil.copyfile(workdir / name, out / name)
        return names
    if config.data.tokenizer == "bpe":
        tokenizer.save(out / "tokenizer.json")
        special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}
        (out / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length":
             config.model.max_seq_len, **special}, indent=2) + "\n")
        return ["tokenizer.json", "tokenizer_config.json"]
    return []

