"""A run -> `model.gguf` for llama.cpp and Ollama, with an Ollama `Modelfile` beside it
(docs/serving.md).

    export_gguf(workdir, out_dir, step=None, dtype="f16")

llama.cpp's architectures: `llama` (a dense model with no biases, or llama's on all four
attention projections), `qwen2` (q, k and v biases) and `deepseek2` (MLA models: DeepSeek-V2
and V3). LoRA adapters are merged as the Hugging Face export merges them. The header is built
from the tensors' shapes first; each tensor is then converted and written on its own, so the
writer never holds more than one.

The tensors are the Hugging Face export's ([out, in], routed experts stacked [E, out, in]),
renamed, except:

- q and k rows. llama.cpp's `llama` turns adjacent pairs of a head's dims, the order they are
  stored in here already (its converter permutes transformers' halves into it); `qwen2` turns
  halves, so its rows go out in transformers' order, as in the Hugging Face export.
- deepseek2's `kv_b_proj` [H(dn+dv), R], which llama.cpp wants split per head into
  `attn_k_b` [H, R, dn] (transposed) and `attn_v_b` [H, dv, R].
- llama3 RoPE, which is a tensor: `rope_freqs.weight`, each pair's divisor of its frequency.

Norms, 1-D tensors and the router stay float32 whatever `dtype` (llama.cpp's converter does
the same); q8_0 needs rows of a multiple of 32 values, and a tensor whose rows are not goes out
as f16 (logged).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Any, Callable

import numpy as np

try:  # an optional extra: the core install exports Hugging Face directories only
    import gguf
except ImportError:
    gguf = None

from minids_jax.checkpoint import store
from minids_jax.checkpoint.loading import SavedParams
from minids_jax.config.model import ModelConfig
from minids_jax.errors import UserError
from minids_jax.hf import config as hf_config
from minids_jax.hf import dense, modelfile, weights
from minids_jax.hf.config import HFFormatError
from minids_jax.hf.gguf_keys import (
    DEEPSEEK2,
    Vocab,
    run_tokenizer,
    vocab_of,
    write_model_keys,
    write_tokenizer_keys,
)
from minids_jax.hf.weights import Tensor
from minids_jax.model import rotary

GGUF_FILE = "model.gguf"
DTYPES = ("f32", "f16", "bf16", "q8_0")
LLAMA, QWEN2 = "llama", "qwen2"
Q8_0_BLOCK = 32

# Hugging Face tensor names -> llama.cpp's (gguf-py's MODEL_TENSOR names).
TOP_LEVEL_NAMES = {"model.embed_tokens.weight": "token_embd.weight",
                   "model.norm.weight": "output_norm.weight",
                   "lm_head.weight": "output.weight"}
BLOCK_NAMES = {  # within model.layers.N. -> within blk.N.
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    **{f"self_attn.{hf}_proj.{kind}": f"attn_{ours}.{kind}"
       for hf, ours in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output"))
       for kind in ("weight", "bias")},
    "self_attn.q_a_proj.weight": "attn_q_a.weight",
    "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight",
    "self_attn.q_b_proj.weight": "attn_q_b.weight",
    "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
    "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight",
    **{f"mlp.{part}_proj.{kind}": f"ffn_{part}.{kind}"
       for part in ("gate", "up", "down") for kind in ("weight", "bias")},
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "mlp.gate.e_score_correction_bias": "exp_probs_b.bias",
    **{f"mlp.experts.{{e}}.{part}_proj.weight": f"ffn_{part}_exps.weight"
       for part in ("gate", "up", "down")},
    **{f"mlp.shared_experts.{part}_proj.weight": f"ffn_{part}_shexp.weight"
       for part in ("gate", "up", "down")},
}
KV_B = "self_attn.kv_b_proj.weight"  # split into attn_k_b / attn_v_b
ROPE_FREQS = "rope_freqs.weight"
# Kept float32: llama.cpp's converter does, and the router's choice is sensitive to rounding.
F32_SUFFIXES = ("_norm.weight", "ffn_gate_inp.weight", ".bias", ROPE_FREQS)

@dataclasses.dataclass(frozen=True)
class Planned:
    """One GGUF tensor: its name, numpy shape (GGUF's dims reversed: [out, in] for a matrix)
    and how to make its float32 data, called only when it is written."""

    name: str
    shape: tuple[int, ...]
    make: Callable[[], np.ndarray]


def architecture(cfg: ModelConfig) -> str:
    """llama.cpp's architecture of `cfg`: llama, qwen2, deepseek2 (refusals: `refusals`)."""
    family = dense.family_of(cfg)
    if family is not None:
        return family
    return DEEPSEEK2


def refusals(cfg: ModelConfig) -> list[str]:
    """What keeps `cfg` out of GGUF, one fix per entry ([] if nothing)."""
    kinds = set(cfg.attn_pattern)
    if kinds not in ({"mha"}, {"mla"}):
        return [f"model.attn_pattern={cfg.attn_pattern}: llama.cpp has MHA (llama, qwen2) or "
                f"MLA (deepseek2) models, not a mix or MHLA; use ('mha',) or ('mla',)"]
    if kinds == {"mha"}:
        problems = dense.inexpressible(cfg)
        if dense.family_of(cfg) == QWEN2 and cfg.rope_scaling == "llama3":
            problems.append("model.rope_scaling='llama3': llama.cpp's qwen2 has no llama3 "
                            "RoPE; use 'none' or 'linear'")
        return problems
    problems = hf_config.inexpressible(cfg)
    if hf_config.is_v2(cfg) and cfg.n_group > 1:
        problems.append(f"model.n_group={cfg.n_group}: DeepSeek-V2's group_limited_greedy "
                        f"scores a group by its best expert, llama.cpp by the sum of its top 2; "
                        f"use 1 (greedy routing)")
    if cfg.rope_yarn_factor > 1:
        problems += _yarn_refusals(cfg)
    return problems


def _yarn_refusals(cfg: ModelConfig) -> list[str]:
    """llama.cpp's deepseek2 YaRN keeps the rotated dims' amplitude at 1 (mscale equal to
    mscale_all_dim, as DeepSeek publishes it) and its ramp at betas 32 and 1."""
    problems = []
    if not cfg.rope_mscale_all_dim or cfg.rope_mscale != cfg.rope_mscale_all_dim:
        problems.append(f"model.rope_mscale={cfg.rope_mscale} and model.rope_mscale_all_dim="
                        f"{cfg.rope_mscale_all_dim}: llama.cpp's deepseek2 YaRN needs them "
                        f"equal and non-zero")
    if (cfg.rope_beta_fast, cfg.rope_beta_slow) != (32.0, 1.0):
        problems.append(f"model.rope_beta_fast={cfg.rope_beta_fast}, model.rope_beta_slow="
                        f"{cfg.rope_beta_slow}: llama.cpp's deepseek2 uses 32 and 1")
    return problems


# ---------------------------------------------------------------------------------- tensors


def gguf_name(hf_name: str) -> str:
    if hf_name in TOP_LEVEL_NAMES:
        return TOP_LEVEL_NAMES[hf_name]
    _, _, layer, within = hf_name.split(".", 3)  # model.layers.N.within
    return f"blk.{layer}.{BLOCK_NAMES[within]}"


def _hf_shape(tensor: Tensor, shape: tuple[int, ...]) -> tuple[int, ...]:
    if tensor.kind == weights.EXPERTS:  # [E, in, out] -> [E, out, in]
        return (shape[0], shape[2], shape[1])
    return weights.hf_shape(tensor, shape)


def _hf_layout(tensor: Tensor, array: np.ndarray) -> np.ndarray:
    if tensor.kind == weights.EXPERTS:
        return array.transpose(0, 2, 1)
    return next(weights.to_hf(tensor, array))[1]


def plan(cfg: ModelConfig, arch: str, shape_of: Callable[[tuple], tuple[int, ...]],
         read: Callable[[tuple], np.ndarray]) -> list[Planned]:
    """The GGUF tensors of the model, from our parameters' shapes (`shape_of(path)`) and
    float32 arrays (`read(path)`, called only as each tensor is written). MTP modules are
    left out: llama.cpp's deepseek2 does not run DeepSeek-V3's."""
    out = []
    for tensor in weights.layout(cfg, with_mtp=False):
        if arch == LLAMA:  # our pairs order is what llama.cpp's llama turns
            tensor = dataclasses.replace(tensor, rope_head_dim=0)
        shape = tuple(shape_of(tensor.path))
        if tensor.name.endswith(KV_B):
            out += _split_kv_b(cfg, tensor, read)
            continue
        out.append(Planned(gguf_name(tensor.name), _hf_shape(tensor, shape),
                           lambda t=tensor: _hf_layout(t, read(t.path))))
    if arch == LLAMA and cfg.rope_scaling == "llama3":
        out.append(Planned(ROPE_FREQS, (cfg.head_dim // 2,), lambda: rope_divisors(cfg)))
    return out


def _split_kv_b(cfg: ModelConfig, tensor: Tensor, read) -> list[Planned]:
    heads, nope, value, rank = (cfg.n_heads, cfg.qk_nope_head_dim, cfg.v_head_dim,
                                cfg.kv_lora_rank)
    block = gguf_name(tensor.name.replace(KV_B, "input_layernorm.weight")).rsplit(".", 2)[0]

    def per_head():  # [H, dn + dv, R]: each head's k_nope rows, then its v rows
        return read(tensor.path).T.reshape(heads, nope + value, rank)

    return [Planned(f"{block}.attn_k_b.weight", (heads, rank, nope),
                    lambda: per_head()[:, :nope].transpose(0, 2, 1)),
            Planned(f"{block}.attn_v_b.weight", (heads, value, rank),
                    lambda: per_head()[:, nope:])]


def rope_divisors(cfg: ModelConfig) -> np.ndarray:
    """llama3 RoPE as llama.cpp takes it: each pair's plain frequency / its llama3 one."""
    plain = rotary.yarn_inv_freq(cfg.head_dim, cfg.rope_theta, 1.0, 1, 2.0, 1.0)
    return (plain / rotary.inv_freq(cfg, cfg.head_dim)).astype(np.float32)


def storage_type(name: str, shape: tuple[int, ...], dtype: str):
    """The GGML type a tensor is stored in (q8_0 that cannot be: f16)."""
    types = gguf.GGMLQuantizationType
    if len(shape) == 1 or name.endswith(F32_SUFFIXES):
        return types.F32
    chosen = {"f32": types.F32, "f16": types.F16, "bf16": types.BF16, "q8_0": types.Q8_0}[dtype]
    if chosen == types.Q8_0 and shape[-1] % Q8_0_BLOCK:
        return types.F16
    return chosen


# ----------------------------------------------------------------------------------- export


def _family(cfg: ModelConfig, arch: str) -> str:
    if arch != DEEPSEEK2:
        return arch
    return "deepseek_v2" if hf_config.is_v2(cfg) else "deepseek_v3"


def export_gguf(workdir: str | os.PathLike, out_dir: str | os.PathLike, *,
                step: int | None = None, dtype: str = "f16",
                log: Callable[[str], None] = print) -> list[str]:
    """Writes the run's model as `out_dir/model.gguf` and an Ollama `out_dir/Modelfile`;
    returns their names. A model GGUF cannot express is an HFFormatError naming the field."""
    if gguf is None:
        raise UserError("GGUF export needs the gguf package: pip install 'gguf>=0.19'.")
    if dtype not in DTYPES:
        raise HFFormatError(f"--dtype={dtype!r} is not a GGUF dtype; use one of "
                            f"{', '.join(DTYPES)}.")
    workdir, out_dir = pathlib.Path(workdir).expanduser(), pathlib.Path(out_dir).expanduser()
    config = store.read_config(workdir, step)
    cfg = config.model
    problems = refusals(cfg)
    arch = architecture(cfg)
    if problems:
        raise HFFormatError(f"this model cannot be written as GGUF ({arch}): "
                            + "; ".join(problems) + ".")
    existing = [name for name in (GGUF_FILE, modelfile.MODELFILE) if (out_dir / name).exists()]
    if existing:
        raise UserError(f"{out_dir} already holds {' and '.join(existing)}; export into an "
                        f"empty --out directory (nothing was overwritten).")
    if cfg.mtp_depth:
        log(f"leaving out the {cfg.mtp_depth} MTP module(s): llama.cpp's deepseek2 does not "
            f"run DeepSeek-V3's multi-token prediction")
    vocab = vocab_of(run_tokenizer(config, workdir), workdir, cfg, _family(cfg, arch), log)

    # Read a tensor at a time, LoRA adapters merged into their weights as they are read.
    params = SavedParams(workdir, step, merge=config.lora if config.lora.rank else None)
    note = params.quantization_note(config.lora.base_quant)
    if note:
        log(note)
    planned = plan(cfg, arch, params.shape, lambda path: np.asarray(params[path], np.float32))
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_file(out_dir / GGUF_FILE, planned, arch, dtype, cfg, vocab, workdir.name, log)
    modelfile.write_modelfile(out_dir, chat_template=vocab.chat_template,
                              bos_text=vocab.bos_text, add_bos=vocab.add_bos,
                              eos_text=vocab.eos_text, num_ctx=cfg.max_seq_len, log=log)
    written = [GGUF_FILE, modelfile.MODELFILE]
    log(f"wrote {out_dir}: {', '.join(written)} ({arch}, {dtype})")
    return written


def _write_file(path: pathlib.Path, planned: list[Planned], arch: str, dtype: str,
                cfg: ModelConfig, vocab: Vocab, name: str, log) -> None:
    """Header from the shapes, then each tensor converted and written in turn; the file
    appears under its name only once complete."""
    partial = path.with_name(path.name + ".partial")
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its per-file plan lines
    writer = gguf.GGUFWriter(partial, arch)
    try:
        write_model_keys(writer, cfg, arch, dtype, name)
        write_tokenizer_keys(writer, vocab)
        types = [storage_type(p.name, p.shape, dtype) for p in planned]
        for tensor, kind in zip(planned, types):
            size = int(np.prod(gguf.quants.quant_shape_to_byte_shape(tensor.shape, kind)))
            writer.add_tensor_info(tensor.name, tensor.shape, np.dtype(np.float32), size,
                                   raw_dtype=kind)
        widened = [p.name for p, kind in zip(planned, types)
                   if dtype == "q8_0" and kind == gguf.GGMLQuantizationType.F16]
        if widened:
            more = f" and {len(widened) - 6} more" if len(widened) > 6 else ""
            log(f"q8_0 needs rows of a multiple of {Q8_0_BLOCK} values; written as f16: "
                f"{', '.join(widened[:6])}{more}")
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for tensor, kind in zip(planned, types):
            data = tensor.make()
            assert data.shape == tensor.shape, (tensor.name, data.shape, tensor.shape)
            writer.write_tensor_data(gguf.quants.quantize(
                np.ascontiguousarray(data, np.float32), kind))
        writer.close()
        os.replace(partial, path)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise


def read_back(path: str | os.PathLike) -> dict[str, Any]:
    """{tensor name: float32 array in numpy shape} of a GGUF file (dequantized)."""
    reader = gguf.GGUFReader(path)
    return {tensor.name: gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
        tuple(int(n) for n in reversed(tensor.shape)))
        for tensor in reader.tensors}
