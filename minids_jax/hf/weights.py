"""Parameter names and layouts: the model here <-> a Hugging Face DeepSeek-V3 checkpoint.

Each array here is one checkpoint tensor, transposed where it is a Linear's (HF stores [out,
in], the model here [in, out]), except the routed experts: E per-expert tensors on disk
(`mlp.experts.{e}.gate_proj.weight` [F, D], as the hub and `save_pretrained` write them), or
transformers' fused in-memory `experts.gate_up_proj` [E, 2F, D] / `experts.down_proj`
[E, D, F], stacked here on a leading expert axis. The MTP module k is the checkpoint's layer
`num_hidden_layers + k - 1`. FP8 weights (e4m3 with per-block `weight_scale_inv`, the
published DeepSeek-V3 files) are dequantized as they are read. Shapes: D model width, F
expert/MLP hidden width, E experts.

MHA layers are llama's and qwen2's: `q_proj`, `k_proj`, `v_proj`, `o_proj` (with their
biases where the model has them) and a dense `mlp`. Their q and k rows hold each head's
rotated dims as halves (transformers' rotate_half), ours as interleaved pairs (rotary.py):
the rows are reordered on the way in and back on the way out, which leaves q.k unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import numpy as np

from minids_jax.config.model import ModelConfig

Path = tuple[str, ...]  # a key path of the model's pure-dict state, list indices as str

COPY, LINEAR, EXPERTS = "copy", "linear", "experts"
EXPERT_PARTS = {"w1": ("gate_proj", 0), "w2": ("up_proj", 1), "w3": ("down_proj", None)}


@dataclasses.dataclass(frozen=True)
class Tensor:
    """Our array at `path` is checkpoint tensor `name`: as is (COPY), transposed (LINEAR), or
    for EXPERTS the stack of `name.format(e=e)` transposed, e < n_experts."""

    path: Path
    name: str
    kind: str
    n_experts: int = 0
    rope_head_dim: int = 0  # q/k rows of heads this wide: halves there, pairs here

    def rows_to_ours(self, array: np.ndarray) -> np.ndarray:
        """A checkpoint tensor's rows (its first axis) in our order."""
        if not self.rope_head_dim:
            return array
        half = self.rope_head_dim // 2
        return array.reshape(-1, 2, half, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)

    def rows_to_hf(self, array: np.ndarray) -> np.ndarray:
        if not self.rope_head_dim:
            return array
        half = self.rope_head_dim // 2
        return array.reshape(-1, half, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)

    def fused(self) -> tuple[str, int | None]:
        """(transformers' fused in-memory name, the half of it: 0 gate, 1 up, None whole)."""
        prefix = self.name.split(".{e}.")[0]
        part = EXPERT_PARTS[self.path[-1]]
        return (f"{prefix}.gate_up_proj" if part[1] is not None else f"{prefix}.down_proj",
                part[1])


def _block(cfg: ModelConfig, ours: Path, hf: str, layer: int) -> list[Tensor]:
    def t(path, name, kind=LINEAR):
        return Tensor(ours + path, hf + name, kind)

    out = [t(("norm1", "scale"), "input_layernorm.weight", COPY),
           t(("norm2", "scale"), "post_attention_layernorm.weight", COPY)]
    attn = "self_attn."
    moe = cfg.is_moe_layer(layer)
    if cfg.attention_kind(layer) == "mha":  # llama, qwen2
        for name, bias in (("q", cfg.qkv_bias), ("k", cfg.qkv_bias), ("v", cfg.qkv_bias),
                           ("o", cfg.out_bias)):
            mine, rope = ("out" if name == "o" else name), (
                cfg.head_dim if name in "qk" else 0)
            out.append(Tensor(ours + ("attn", "attention", mine, "kernel"),
                              f"{hf}{attn}{name}_proj.weight", LINEAR, rope_head_dim=rope))
            if bias:
                out.append(Tensor(ours + ("attn", "attention", mine, "bias"),
                                  f"{hf}{attn}{name}_proj.bias", COPY, rope_head_dim=rope))
    elif cfg.q_lora_rank:
        out += [t(("attn", "q_down", "kernel"), attn + "q_a_proj.weight"),
                t(("attn", "q_norm", "scale"), attn + "q_a_layernorm.weight", COPY),
                t(("attn", "q_up", "kernel"), attn + "q_b_proj.weight")]
    else:
        out.append(t(("attn", "q", "kernel"), attn + "q_proj.weight"))
    if cfg.attention_kind(layer) == "mla":
        out += [t(("attn", "kv_down", "kernel"), attn + "kv_a_proj_with_mqa.weight"),
                t(("attn", "kv_norm", "scale"), attn + "kv_a_layernorm.weight", COPY),
                t(("attn", "kv_up", "kernel"), attn + "kv_b_proj.weight"),
                t(("attn", "out", "kernel"), attn + "o_proj.weight")]
    mlp_parts = (("w1", "gate_proj"), ("w2", "up_proj"), ("w3", "down_proj"))
    if not moe:
        out += [t(("mlp", ours_, "kernel"), f"mlp.{theirs}.weight") for ours_, theirs in mlp_parts]
        if cfg.mlp_bias:
            out += [t(("mlp", ours_, "bias"), f"mlp.{theirs}.bias", COPY)
                    for ours_, theirs in mlp_parts]
        return out
    out.append(t(("moe", "gate", "kernel"), "mlp.gate.weight"))
    if cfg.router_scoring == "sigmoid":  # DeepSeek-V3's selection bias; V2 has none
        out.append(t(("moe", "bias"), "mlp.gate.e_score_correction_bias", COPY))
    out += [Tensor(ours + ("moe", ours_), f"{hf}mlp.experts.{{e}}.{theirs}.weight", EXPERTS,
                   cfg.n_experts) for ours_, theirs in mlp_parts]
    if cfg.n_shared_experts:
        out += [t(("moe", "shared", ours_, "kernel"), f"mlp.shared_experts.{theirs}.weight")
                for ours_, theirs in mlp_parts]
    return out


def layout(cfg: ModelConfig, with_mtp: bool = True) -> list[Tensor]:
    """Every array of a DeepSeek-V3-format model and its checkpoint tensor."""
    out = [Tensor(("embed", "embedding"), "model.embed_tokens.weight", COPY)]
    for i in range(cfg.n_layers):
        out += _block(cfg, ("blocks", str(i)), f"model.layers.{i}.", i)
    out.append(Tensor(("final_norm", "scale"), "model.norm.weight", COPY))
    if not cfg.tie_embeddings:  # tied: no lm_head.weight in the files
        out.append(Tensor(("head", "kernel"), "lm_head.weight", LINEAR))
    for k in range(cfg.mtp_depth if with_mtp else 0):
        ours, hf = ("mtp", str(k)), f"model.layers.{cfg.n_layers + k}."
        out += [Tensor(ours + ("embed_norm", "scale"), hf + "enorm.weight", COPY),
                Tensor(ours + ("hidden_norm", "scale"), hf + "hnorm.weight", COPY),
                Tensor(ours + ("proj", "kernel"), hf + "eh_proj.weight", LINEAR),
                Tensor(ours + ("out_norm", "scale"), hf + "shared_head.norm.weight", COPY)]
        out += _block(cfg, ours + ("block",), hf, cfg.n_layers + k)
    return out


def mtp_copies(cfg: ModelConfig) -> list[tuple[str, str]]:
    """(MTP layer tensor, main tensor it duplicates): the hub files store the shared embedding
    and head again in each MTP layer."""
    return [pair for k in range(cfg.mtp_depth) for pair in (
        (f"model.layers.{cfg.n_layers + k}.embed_tokens.weight", "model.embed_tokens.weight"),
        (f"model.layers.{cfg.n_layers + k}.shared_head.head.weight", "lm_head.weight"))]


def hf_shape(tensor: Tensor, our_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The checkpoint shape of `tensor` (one expert's for EXPERTS)."""
    if tensor.kind == COPY:
        return our_shape
    return tuple(reversed(our_shape[-2:]))


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int]) -> np.ndarray:
    """float32 weight * scale_inv of its block (DeepSeek-V3's FP8 format: README_WEIGHTS.md)."""
    rows, cols = weight.shape
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)
    return weight.astype(np.float32) * scale[:rows, :cols]


def to_ours(tensor: Tensor, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """Our float32 array of `tensor`, from `read(name)` (float32, dequantized)."""
    if tensor.kind == COPY:
        return tensor.rows_to_ours(read(tensor.name))
    if tensor.kind == LINEAR:
        return tensor.rows_to_ours(read(tensor.name)).T
    return np.stack([read(tensor.name.format(e=e)).T for e in range(tensor.n_experts)])


def to_hf(tensor: Tensor, array: np.ndarray) -> Iterator[tuple[str, np.ndarray]]:
    """The checkpoint tensors of our `array`: (name, array) pairs."""
    if tensor.kind == COPY:
        yield tensor.name, tensor.rows_to_hf(array)
    elif tensor.kind == LINEAR:
        yield tensor.name, tensor.rows_to_hf(array.T)
    else:
        for e in range(tensor.n_experts):
            yield tensor.name.format(e=e), array[e].T
