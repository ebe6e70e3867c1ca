"""Cached decoding of each attention kind at equal width: cache bytes per token and tokens/s.

    python benchmarks/decode.py --config configs/tiny.py --tokens 96 --batch 1

One model per kind (every layer of that kind, the config's sizes otherwise), greedy decoding
from a 16-token prompt through `generation.Generator`, as generate.py does. Tokens/s count the
one-token steps after the first two (which compile); cache bytes are those of one sequence's
cache at the compute dtype, per token of context and per layer. MHA keeps 2 x d_model numbers a
token; MHLA keeps MHA's plus K latents' keys and values; MLA keeps kv_lora_rank +
qk_rope_head_dim (its compressed latent and its shared RoPE key).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file.")
_TOKENS = flags.DEFINE_integer("tokens", 96, "Tokens to decode per kind.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded together.")
_KINDS = flags.DEFINE_list("kinds", ["mha", "mhla", "mla"], "Attention kinds to compare.")


def main(argv):
    del argv
    from minids_jax import config as config_lib
    from minids_jax import startup

    config = config_lib.from_config_dict(_CONFIG.value)
    startup.reuse_host_memory(config.devices)
    import jax
    from flax import nnx

    from minids_jax import generation, kernels, sharding
    from minids_jax.model import MiniDeepSeek, count_params

    print(f"greedy decoding of {_TOKENS.value} tokens x batch {_BATCH.value}, d_model "
          f"{config.model.d_model}, {config.model.n_layers} layers, context "
          f"{config.model.max_seq_len}, {jax.devices()[0].platform}")
    print(f"{'kind':6s} {'parameters':>12s} {'cache B/token/layer':>20s} {'tokens/s':>10s}")
    prompt = np.arange(16 * _BATCH.value).reshape(_BATCH.value, 16) % config.model.vocab_size
    for kind in _KINDS.value:
        cfg = dataclasses.replace(config.model, attn_pattern=(kind,))
        model = MiniDeepSeek(cfg, kernels.resolve(config.compute, sharding.mesh_platform()),
                             rngs=nnx.Rngs(0))
        cache = model.init_cache(1)
        cache_bytes = sum(leaf.nbytes for layer in cache for leaf in jax.tree.leaves(layer)
                          if leaf.ndim > 0)  # not the fill index
        per_token = cache_bytes / cfg.max_seq_len / cfg.n_layers
        times = []
        for _ in generation.Generator(model).stream(prompt, _TOKENS.value,
                                                    generation.Sampling(temperature=0.0)):
            times.append(time.perf_counter())
        rate = (len(times) - 2) * _BATCH.value / (times[-1] - times[1])
        print(f"{kind:6s} {count_params(model):12,d} {per_token:20,.0f} {rate:10,.1f}",
              flush=True)


if __name__ == "__main__":
    app.run(main)
