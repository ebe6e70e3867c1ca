"""Makes tests/fixtures/hf_tiny and hf_tiny_fp8: a random tiny DeepseekV3ForCausalLM saved by
transformers, its FP8 copy, and the numbers transformers computes with it.

    pip install torch==2.13.0 transformers safetensors    # CPU torch, in a venv of its own
    OMP_WAIT_POLICY=PASSIVE python scripts/make_hf_fixture.py

The model has everything the import must get right: group-limited sigmoid routing with
non-zero correction biases, a shared expert, a dense first layer, a low-rank query, YaRN, one
MTP layer (transformers' model does not hold it, so it is added to the files under the hub's
names) and random norm gains. Its Linear weights are FP8 values (e4m3, a scale per 16 x 16
block, as DeepSeek-V3 publishes them with 128 x 128 blocks): hf_tiny stores them dequantized
in float32, hf_tiny_fp8 quantized, so that both describe exactly the same function.
`reference.npz` holds transformers' logits (eager attention and experts, float32), greedy
tokens and MTP logits, and the smallest routing margin, which must stay far above float32
rounding so that no expert choice can flip between implementations.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import numpy as np
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

OUT = pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures"
BLOCK = 16  # FP8 scale block; the 24- and 40-wide projections end in partial blocks
FP8_MAX = 448.0  # the largest float8_e4m3fn
SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>", "<｜User｜>",
            "<｜Assistant｜>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}"
    "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
    "{% for m in turns %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
    "{% else %}<｜Assistant｜>{{ m['content'] }}<｜end▁of▁sentence｜>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<｜Assistant｜>{% endif %}")
TEXT = """The mixture of experts sends each token to a few of many feed-forward experts.
A router scores the experts, and the best scoring ones process the token. Shared experts see
every token. Multi-head latent attention caches a small latent per token instead of keys and
values, which makes long contexts cheap. Rotary embeddings turn pairs of query and key
dimensions by an angle that grows with the position. The quick brown fox jumps over the lazy
dog. Training minimizes the cross-entropy of the next token; multi-token prediction also
scores the token after it. Balanced routing keeps every expert busy without an auxiliary loss.
"""
CONFIG = dict(
    vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
    num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4,
    n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2,
    norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=40, kv_lora_rank=24,
    qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, rms_norm_eps=1e-6,
    tie_word_embeddings=False, attention_bias=False, rope_interleave=True,
    max_position_embeddings=256, rope_theta=10000.0,
    rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    num_nextn_predict_layers=1, initializer_range=0.1)


def make_tokenizer(directory: pathlib.Path) -> dict[str, int]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(
        vocab_size=300, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(directory / "tokenizer.json"))
    bos, eos, pad = SPECIALS[:3]
    (directory / "tokenizer_config.json").write_text(json.dumps(dict(
        tokenizer_class="PreTrainedTokenizerFast", bos_token=bos, eos_token=eos, pad_token=pad,
        add_bos_token=False, model_max_length=256, chat_template=CHAT_TEMPLATE), indent=2))
    return {name: tokenizer.token_to_id(token) for name, token in zip(("bos", "eos", "pad"),
                                                                    SPECIALS)}


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8 weight, float32 scale_inv per BLOCK x BLOCK block), dequantized as
    weight.float() * scale_inv of its block."""
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // BLOCK) * BLOCK, -(-cols // BLOCK) * BLOCK)
    padded[:rows, :cols] = weight
    blocks = padded.view(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    expanded = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return (weight / expanded).to(torch.float8_e4m3fn), scale


def dequantize(fp8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    rows, cols = fp8.shape
    expanded = scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:rows, :cols]
    return fp8.float() * expanded


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """The hub's FP8 set: the decoder layers' Linear weights (not the router gate, norms,
    embedding or head; the MTP layer's eh_proj and copies stay as they are too)."""
    return (name.startswith("model.layers.") and name.endswith(("proj.weight", "_mqa.weight"))
            and tensor.dim() == 2 and "eh_proj" not in name)


def randomize(module: torch.nn.Module) -> None:
    """Norm gains off 1 and correction biases off 0, so a mix-up of either shows."""
    with torch.no_grad():
        for name, tensor in module.named_parameters():
            if name.endswith("norm.weight"):
                tensor.add_(0.1 * torch.randn_like(tensor))
        for sub in module.modules():
            if hasattr(sub, "e_score_correction_bias"):
                sub.e_score_correction_bias.normal_(0.0, 0.1)


def per_expert(prefix: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fused in-memory expert tensors as the per-expert names of the hub files."""
    out = {}
    for name, tensor in state.items():
        if name == "mlp.experts.gate_up_proj":  # [E, 2F, D]
            gate, up = tensor.chunk(2, dim=1)
            for e in range(tensor.shape[0]):
                out[f"{prefix}mlp.experts.{e}.gate_proj.weight"] = gate[e]
                out[f"{prefix}mlp.experts.{e}.up_proj.weight"] = up[e]
        elif name == "mlp.experts.down_proj":  # [E, D, F]
            for e in range(tensor.shape[0]):
                out[f"{prefix}mlp.experts.{e}.down_proj.weight"] = tensor[e]
        else:
            out[prefix + name] = tensor
    return out


class MTPLayer(torch.nn.Module):
    """DeepSeek-V3's MTP layer as the hub files store it (reference: vLLM's deepseek_mtp)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.enorm = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm(d)
        self.hnorm = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm(d)
        self.eh_proj = torch.nn.Linear(2 * d, d, bias=False)
        self.block = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3DecoderLayer(
            config, layer_idx)
        self.norm = transformers.models.deepseek_v3.modeling_deepseek_v3.DeepseekV3RMSNorm(d)

    def forward(self, main, hidden, tokens_ahead, position_embeddings, mask):
        joined = torch.cat([self.enorm(main.model.embed_tokens(tokens_ahead)),
                            self.hnorm(hidden)], dim=-1)
        out = self.block(self.eh_proj(joined), attention_mask=mask,
                         position_embeddings=position_embeddings)
        out = out[0] if isinstance(out, tuple) else out
        return main.lm_head(self.norm(out))

    def load_hub_tensors(self, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        experts = self.block.mlp.experts
        n = experts.gate_up_proj.shape[0]
        state = {name[len(prefix):]: t for name, t in tensors.items() if name.startswith(prefix)
                 and ".experts." not in name}
        state["mlp.experts.gate_up_proj"] = torch.stack([torch.cat([
            tensors[f"{prefix}mlp.experts.{e}.gate_proj.weight"],
            tensors[f"{prefix}mlp.experts.{e}.up_proj.weight"]]) for e in range(n)])
        state["mlp.experts.down_proj"] = torch.stack(
            [tensors[f"{prefix}mlp.experts.{e}.down_proj.weight"] for e in range(n)])
        block = {k: v for k, v in state.items() if k.split(".")[0] in
                 ("self_attn", "mlp", "input_layernorm", "post_attention_layernorm")}
        self.block.load_state_dict(block, strict=True)
        with torch.no_grad():
            for ours, theirs in ((self.enorm, "enorm"), (self.hnorm, "hnorm"),
                                 (self.eh_proj, "eh_proj"), (self.norm, "shared_head.norm")):
                ours.weight.copy_(state[f"{theirs}.weight"])

    def hub_tensors(self, prefix: str, main) -> dict[str, torch.Tensor]:
        state = {name: t for name, t in self.block.state_dict().items()}
        out = per_expert(prefix, state)
        out.update({prefix + "enorm.weight": self.enorm.weight, prefix + "hnorm.weight":
                    self.hnorm.weight, prefix + "eh_proj.weight": self.eh_proj.weight,
                    prefix + "shared_head.norm.weight": self.norm.weight,
                    prefix + "shared_head.head.weight": main.lm_head.weight,
                    prefix + "embed_tokens.weight": main.model.embed_tokens.weight})
        return out


def routing_margin(gate, x: torch.Tensor) -> float:
    """The smallest gap, over tokens, between the kept and dropped groups and between the k-th
    and (k+1)-th biased score of the kept groups."""
    scores = torch.sigmoid(x.reshape(-1, x.shape[-1]).float() @ gate.weight.float().T)
    choice = scores + gate.e_score_correction_bias
    groups = choice.view(len(choice), gate.num_group, -1).topk(2, dim=-1)[0].sum(-1)
    ranked = groups.sort(dim=-1, descending=True)[0]
    group_gap = (ranked[:, gate.topk_group - 1] - ranked[:, gate.topk_group]).min()
    kept = torch.zeros_like(groups).scatter_(1, groups.topk(gate.topk_group)[1], 1)
    mask = kept.repeat_interleave(gate.num_experts // gate.num_group, dim=1).bool()
    ranked = choice.masked_fill(~mask, -1e9).sort(dim=-1, descending=True)[0]
    expert_gap = (ranked[:, gate.top_k - 1] - ranked[:, gate.top_k]).min()
    return float(min(group_gap, expert_gap).detach())


def build(seed: int, special: dict[str, int], directory: pathlib.Path):
    """Saves a random model with FP8-valued weights in `directory` (config, tokenizer there
    already) and returns (model reloaded from it, its MTP layer, the FP8 tensors)."""
    torch.manual_seed(seed)
    config = transformers.DeepseekV3Config(**CONFIG, bos_token_id=special["bos"],
                                           eos_token_id=special["eos"],
                                           pad_token_id=special["pad"])
    model = transformers.DeepseekV3ForCausalLM(config).float().eval()
    mtp = MTPLayer(config, CONFIG["num_hidden_layers"]).float().eval()
    randomize(model)
    randomize(mtp)
    model.save_pretrained(directory)
    tensors = load_file(directory / "model.safetensors")
    assert any(".experts.0.gate_proj" in name for name in tensors), "expected per-expert names"
    prefix = f"model.layers.{CONFIG['num_hidden_layers']}."
    tensors.update(mtp.hub_tensors(prefix, model))
    plain, fp8 = {}, {}
    for name, tensor in sorted(tensors.items()):
        tensor = tensor.detach().contiguous().clone()
        if is_quantized(name, tensor):
            fp8[name], fp8[name + "_scale_inv"] = quantize(tensor)
            plain[name] = dequantize(fp8[name], fp8[name + "_scale_inv"])
        else:
            plain[name] = fp8[name] = tensor
    save_file(plain, directory / "model.safetensors", metadata={"format": "pt"})
    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, attn_implementation="eager").float().eval()
    model.set_experts_implementation("eager")
    mtp.load_hub_tensors(prefix, plain)
    return model, mtp, fp8


def references(model, mtp, tokens: torch.Tensor) -> dict[str, np.ndarray]:
    hidden, gates_in = {}, []
    last = model.model.layers[-1]
    handles = [last.register_forward_hook(
        lambda _, __, out: hidden.__setitem__("h", out[0] if isinstance(out, tuple) else out))]
    for layer in list(model.model.layers) + [mtp.block]:
        if hasattr(layer.mlp, "gate"):
            handles.append(layer.mlp.gate.register_forward_hook(
                lambda gate, args, _: gates_in.append((gate, args[0]))))
    with torch.no_grad():
        logits = model(tokens).logits
        length = tokens.shape[1] - 1
        positions = torch.arange(length)[None].expand(tokens.shape[0], -1)
        rope = model.model.rotary_emb(hidden["h"], positions)
        mask = torch.full((length, length), torch.finfo(torch.float32).min).triu(1)[None, None]
        # The MTP layer reads the main model's features after its final norm (vLLM, Megatron).
        mtp_logits = mtp(model, model.model.norm(hidden["h"][:, :length]), tokens[:, 1:], rope,
                         mask)
    for handle in handles:
        handle.remove()
    margin = min(routing_margin(gate, x) for gate, x in gates_in)
    return {"tokens": tokens.numpy().astype(np.int32), "logits": logits.numpy(),
            "mtp_logits": mtp_logits.numpy(), "router_margin": np.float32(margin)}


def main():
    torch.set_num_threads(1)
    plain, fp8_dir = OUT / "hf_tiny", OUT / "hf_tiny_fp8"
    for directory in (plain, fp8_dir):
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)
    special = make_tokenizer(plain)
    tokens = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    for seed in range(100):  # the first seed whose routing has no near-tie
        model, mtp, fp8 = build(seed, special, plain)
        numbers = references(model, mtp, tokens)
        if numbers["router_margin"] > 1e-3:
            break
    print(f"seed {seed}, router margin {numbers['router_margin']:.4f}")
    prompt = tokens[:1, :6]
    with torch.no_grad():
        greedy = model.generate(prompt, do_sample=False, max_new_tokens=10, min_new_tokens=10,
                                pad_token_id=special["pad"])
    numbers.update(prompt=prompt.numpy().astype(np.int32), greedy=greedy.numpy().astype(np.int32))
    np.savez_compressed(plain / "reference.npz", **numbers)

    save_file(fp8, fp8_dir / "model.safetensors", metadata={"format": "pt"})
    hf_config = json.loads((plain / "config.json").read_text())
    hf_config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                        "quant_method": "fp8", "weight_block_size": [BLOCK, BLOCK]}
    (fp8_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copyfile(plain / name, fp8_dir / name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(plain)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                         add_generation_prompt=True)
    print(f"chat template renders {chat!r}")
    for directory in (plain, fp8_dir):
        size = sum(p.stat().st_size for p in directory.iterdir())
        print(f"{directory}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
