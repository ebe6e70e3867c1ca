"""Greedy cached decoding of an exported model in transformers: the peer of
`benchmarks/decode.py --vs_hf`. Runs under a Python with torch and transformers (it imports
neither jax nor minids_jax) and prints one JSON object.

    python benchmarks/hf_decode_peer.py HF_DIR PROMPTS_NPY --cases 1x128:32,8x4096:16

HF_DIR is a directory written by `minids_jax.hf.convert.export_run` (DeepSeek-V3, llama or
qwen2), loaded with `AutoModelForCausalLM.from_pretrained` in float32 with eager attention, on
the GPU where torch has one (`--device`), else the CPU.
PROMPTS_NPY holds [batch, length] token ids; a case BxP:N decodes N tokens after the first P
ids of its first B rows, `model.generate(do_sample=False, use_cache=True)` with
min_new_tokens = max_new_tokens = N and no end-of-sequence token (so every row decodes N
tokens, the same count as minids_jax, and no logits processor touches the greedy choice).
Each case first runs a 2-token generate of its shapes as a warm-up. A streamer timestamps
each new token: time to first token is generate's start to the first one (prefill included);
tokens/s count the tokens after it. Cache bytes are those of the `DynamicCache` generate
returns, over batch x the positions it holds.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


class TokenClock:
    """A generate() streamer that records when each new token arrives (its first `put` is the
    prompt, before the prefill)."""

    def __init__(self, synchronize=lambda: None):
        self.times: list[float] = []
        self.saw_prompt = False
        self.synchronize = synchronize  # a GPU's work is asynchronous: wait for the token

    def put(self, value):
        if self.saw_prompt:
            self.synchronize()
            self.times.append(time.perf_counter())
        self.saw_prompt = True

    def end(self):
        pass


def cache_bytes(cache) -> int:
    """Bytes of every tensor the cache's layers hold."""
    import torch

    total = 0
    for layer in cache.layers:
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                total += value.numel() * value.element_size()
    return total


def decode_case(model, prompt_BxP, new_tokens: int) -> dict:
    import torch

    batch, length = prompt_BxP.shape
    # No end-of-sequence token: min_new_tokens would then mask it out of the greedy choice.
    settings = {"do_sample": False, "use_cache": True, "eos_token_id": None, "pad_token_id": 0,
                "attention_mask": torch.ones_like(prompt_BxP)}
    with torch.inference_mode():
        model.generate(prompt_BxP, max_new_tokens=2, min_new_tokens=2, **settings)  # warm-up
        clock = TokenClock(torch.cuda.synchronize if prompt_BxP.is_cuda else lambda: None)
        start = time.perf_counter()
        out = model.generate(prompt_BxP, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             streamer=clock, return_dict_in_generate=True, **settings)
    new_BxN = out.sequences[:, length:]
    assert new_BxN.shape[1] == new_tokens == len(clock.times), (new_BxN.shape, len(clock.times))
    held = out.past_key_values.get_seq_length()
    return {
        "batch": batch, "context": length, "new_tokens": new_tokens,
        "first_token_s": clock.times[0] - start,
        "tokens_per_s": (new_tokens - 1) * batch / (clock.times[-1] - clock.times[0]),
        "cache_bytes": cache_bytes(out.past_key_values), "cache_positions": held,
        "cache_bytes_per_token": cache_bytes(out.past_key_values) / (batch * held),
        "cache_class": type(out.past_key_values).__name__,
        "tokens": new_BxN.tolist(),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("hf_dir")
    parser.add_argument("prompts", help=".npy of [batch, length] token ids")
    parser.add_argument("--cases", required=True,
                        help="comma-separated BATCHxCONTEXT:NEW_TOKENS, e.g. 1x128:32,8x128:32")
    parser.add_argument("--device", default="auto", help="auto (cuda if torch has it) | cpu | cuda")
    args = parser.parse_args()
    try:
        import numpy as np
        import torch
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError as error:
        sys.exit(f"hf_decode_peer: {sys.executable} cannot run transformers ({error}); pass "
                 f"--hf_python a Python with torch and transformers.")

    torch.set_num_threads(os.cpu_count())
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(args.hf_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval().to(device)
    prompts = torch.from_numpy(np.load(args.prompts).astype(np.int64)).to(device)
    results = []
    for case in args.cases.split(","):
        shape, new_tokens = case.split(":")
        batch, length = map(int, shape.split("x"))
        results.append(decode_case(model, prompts[:batch, :length], int(new_tokens)))
        print(f"hf_decode_peer: {case} done", file=sys.stderr, flush=True)
    print(json.dumps({
        "model": type(model).__name__, "attention": model.config._attn_implementation,
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__, "transformers": transformers.__version__, "device": device,
        "threads": torch.get_num_threads(), "cases": results}))


if __name__ == "__main__":
    main()
