"""Cached decoding of each attention kind at equal width: cache bytes per token and tokens/s;
with `--vs_hf`, greedy decoding of one model here and in transformers, side by side.

    python benchmarks/decode.py --config configs/tiny.py --tokens 96 --batch 1

One model per kind (every layer of that kind, the config's sizes otherwise), greedy decoding
(or `--sampling T/top_k/top_p`) from a 16-token prompt through `generation.Generator`, as
generate.py does. Tokens/s count the one-token steps after the first two (which compile), the
median of `--streams` decodes of the prompt (this machine's noise is mostly between them);
cache bytes are those of one sequence's cache at the compute dtype, per token of context and
per layer. MHA keeps 2 x d_model numbers a token; MHLA keeps MHA's plus K latents' keys and
values; MLA keeps kv_lora_rank + qk_rope_head_dim (its compressed latent and its shared RoPE
key).

    python benchmarks/decode.py --vs_hf --hf_python PYTHON_WITH_TORCH \
        [--config configs/v3_tiny.py] [--contexts 128,1024,4096] [--batches 1,8] \
        [--new_tokens 32 | --new_tokens 32,32,16]

A random model of the config (default configs/v3_tiny.py here; a dense MHA config such as
configs/deepseek_llm_7b.py, narrowed, goes out as `llama`), in float32, is saved as a run,
exported with `convert.export_run` (float32, without MTP modules, which transformers does not
run) and imported back with `convert.import_dir`: minids_jax decodes the imported run, and
transformers (benchmarks/hf_decode_peer.py, in a subprocess under `--hf_python`) decodes the
exported directory. Each case (batch x context, the prompt random token ids shared through a
.npy file) is timed here, then there, alternating; both warm up on the case's shapes first (so
no compilation is timed here). Here the model's context (model.max_seq_len: the cache's slots,
and the length a prefill is padded to) is the case's prompt + new tokens. Per case: decode
tokens/s over the new tokens after the first, time to first token (prefill + first token),
cache bytes per token of context (all layers), and the share of greedy tokens that agree.
The last line is the geometric mean over the cases of minids_jax's tokens/s over
transformers'.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import flags

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from minids_jax import cli  # (imports no jax)

# ml_collections loads the default config file as the flag is defined, before flags are parsed,
# so the mode's default is picked from the command line itself.
_DEFAULT_CONFIG = ("configs/v3_tiny.py" if any(arg in ("--vs_hf", "--vs_hf=true", "--vs_hf=True")
                                              for arg in sys.argv) else "configs/tiny.py")
_CONFIG = cli.define_config_flag("config", _DEFAULT_CONFIG)
_TOKENS = flags.DEFINE_integer("tokens", 96, "Tokens to decode per kind.")
_BATCH = flags.DEFINE_integer("batch", 1, "Sequences decoded together.")
_STREAMS = flags.DEFINE_integer("streams", 1, "Decodes of the prompt per kind; tokens/s is "
                                "their median.", lower_bound=1)
_KINDS = flags.DEFINE_list("kinds", ["mha", "mhla", "mla"], "Attention kinds to compare.")
_SAMPLING = flags.DEFINE_string("sampling", "0/0/1", "temperature/top_k/top_p of the kinds' "
                                "decoding (0/0/1: greedy; generate.py's default: 0.8/50/0.95).")
_VS_HF = flags.DEFINE_bool("vs_hf", False, "Decode the config's model here and in "
                           "transformers instead (benchmarks/hf_decode_peer.py).")
_HF_PYTHON = flags.DEFINE_string("hf_python", sys.executable,
                                 "Python that has torch and transformers, for --vs_hf.")
_CONTEXTS = flags.DEFINE_list("contexts", ["128", "1024", "4096"],
                              "--vs_hf: prompt lengths, in tokens.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "--vs_hf: batch sizes.")
_NEW_TOKENS = flags.DEFINE_list("new_tokens", ["32"], "--vs_hf: tokens to decode per case: "
                                "one count, or one per context.")


def compare_kinds(config, sampling):
    """Each attention kind's cache bytes per token and layer, and its decode tokens/s."""
    import jax
    from flax import nnx

    from minids_jax import generation, kernels, sharding
    from minids_jax.model import MiniDeepSeek, count_params

    print(f"decoding {_TOKENS.value} tokens x batch {_BATCH.value} ({sampling}), d_model "
          f"{config.model.d_model}, {config.model.n_layers} layers, vocab "
          f"{config.model.vocab_size}, context {config.model.max_seq_len}, "
          f"{jax.devices()[0].platform}")
    print(f"{'kind':6s} {'parameters':>12s} {'cache B/token/layer':>20s} {'tokens/s':>10s}")
    prompt = np.arange(16 * _BATCH.value).reshape(_BATCH.value, 16) % config.model.vocab_size
    for kind in _KINDS.value:
        cfg = dataclasses.replace(config.model, attn_pattern=(kind,))
        model = MiniDeepSeek(cfg, kernels.resolve(config.compute, sharding.mesh_platform()),
                             rngs=nnx.Rngs(0))
        per_token = cache_bytes(model, 1) / cfg.max_seq_len / cfg.n_layers
        generator, rates = generation.Generator(model), []
        for _ in range(_STREAMS.value):
            times = [time.perf_counter()
                     for _ in generator.stream(prompt, _TOKENS.value, sampling)]
            rates.append((len(times) - 2) * _BATCH.value / (times[-1] - times[1]))
        rate = float(np.median(rates))
        print(f"{kind:6s} {count_params(model):12,d} {per_token:20,.0f} {rate:10,.1f}",
              flush=True)


def cache_bytes(model, batch: int) -> int:
    """Bytes of the caches a Generator of `model` holds for `batch` rows (every layer's, at
    model.max_seq_len slots; the fill index left out)."""
    import jax

    cache = jax.eval_shape(lambda: model.init_cache(batch))
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(cache) if leaf.ndim)


@dataclasses.dataclass
class Decoded:
    tokens_per_s: float  # over the new tokens after the first
    first_token_s: float  # prefill + first token
    cache_bytes_per_token: float  # of context, all layers
    tokens_BxN: np.ndarray


def decode_ours(model, prompt_BxP: np.ndarray, new_tokens: int) -> Decoded:
    """Greedy decoding through `generation.Generator`, after a 2-token warm-up that compiles
    its prefill and step at these shapes."""
    from minids_jax import generation

    generator, greedy = generation.Generator(model), generation.Sampling(temperature=0.0)
    for _ in generator.stream(prompt_BxP, 2, greedy):
        pass
    times, tokens = [], []
    start = time.perf_counter()
    for token_B in generator.stream(prompt_BxP, new_tokens, greedy):  # (each one on the host)
        times.append(time.perf_counter())
        tokens.append(token_B)
    batch = prompt_BxP.shape[0]
    return Decoded((new_tokens - 1) * batch / (times[-1] - times[0]), times[0] - start,
                   cache_bytes(model, batch) / (batch * model.cfg.max_seq_len),
                   np.stack(tokens, axis=1))


def decode_theirs(hf_dir: Path, prompts_path: Path, case: str) -> tuple[dict, Decoded]:
    """benchmarks/hf_decode_peer.py's run of one case `BxP:N`: (its JSON, its figures)."""
    argv = [_HF_PYTHON.value, str(Path(__file__).with_name("hf_decode_peer.py")), str(hf_dir),
            str(prompts_path), "--cases", case]
    from timing import peer_environment  # (benchmarks/timing.py imports jax)

    # Idle OpenMP threads sleep instead of spinning, which on a shared machine steals cores.
    env = peer_environment(OMP_WAIT_POLICY="PASSIVE")  # as transformers' users run it
    try:
        result = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    except OSError as error:
        sys.exit(f"transformers run failed: cannot run {argv[0]} ({error})")
    if result.returncode:
        sys.exit(f"transformers run failed (does {argv[0]} have torch and transformers?):\n"
                 f"{result.stderr[-2000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    run = report["cases"][0]
    return report, Decoded(run["tokens_per_s"], run["first_token_s"],
                           run["cache_bytes_per_token"], np.asarray(run["tokens"]))


def float32_random_run(config, max_seq_len: int):
    """The config with float32 parameters and compute, random token data (the byte tokenizer,
    so no corpus is read) and a context of `max_seq_len`."""
    return dataclasses.replace(
        config, model=dataclasses.replace(config.model, max_seq_len=max_seq_len,
                                          param_dtype="float32"),
        compute=dataclasses.replace(config.compute, dtype="float32"),
        data=dataclasses.replace(config.data, source="random", tokenizer="byte", path=""))


def compare_with_hf(config):
    import jax
    from flax import nnx

    from minids_jax import checkpoint, sharding
    from minids_jax.hf import convert
    from minids_jax.hf.config import to_hf
    from minids_jax.model import build, count_params

    contexts = [int(c) for c in _CONTEXTS.value]
    batches = [int(b) for b in _BATCHES.value]
    new_counts = [int(n) for n in _NEW_TOKENS.value]
    if len(new_counts) == 1:
        new_counts *= len(contexts)
    if len(new_counts) != len(contexts) or min(new_counts) < 2:
        sys.exit(f"--new_tokens={_NEW_TOKENS.value}: give one count (>= 2), or one per context "
                 f"({len(contexts)}).")
    new_tokens = dict(zip(contexts, new_counts))
    longest = max(c + n for c, n in new_tokens.items())
    config = float32_random_run(config, longest)
    platform = sharding.mesh_platform()
    with tempfile.TemporaryDirectory(prefix="decode_vs_hf_") as tmp:
        tmp = Path(tmp)
        random_model = build(config, platform, nnx.Rngs(0))
        checkpoint.save_model(tmp / "run", config, nnx.to_pure_dict(nnx.state(random_model)))
        del random_model
        convert.export_run(tmp / "run", tmp / "hf", dtype="float32", with_mtp=False,
                           log=lambda _: None)
        family = json.loads((tmp / "hf" / "config.json").read_text())["model_type"]
        convert.import_dir(tmp / "hf", tmp / "imported", config, log=lambda _: None)
        model, imported = checkpoint.load(tmp / "imported")
        graph_state = nnx.state(model)
        m = imported.model
        experts = (f", experts {m.n_experts} top-{m.top_k} (+{m.n_shared_experts} shared)"
                   if m.first_k_dense < m.n_layers else "")
        print(f"model: {family}, d_model {m.d_model}, {m.n_layers} layers {m.attn_pattern}, "
              f"heads {m.n_heads} (kv {m.n_kv_heads}), vocab {m.vocab_size}{experts}, "
              f"{count_params(model):,} parameters; float32, {jax.devices()[0].platform}")
        assert to_hf(m)["model_type"] == family
        prompts_BxP = np.random.default_rng(0).integers(
            0, m.vocab_size, (max(batches), max(contexts))).astype(np.int32)
        np.save(tmp / "prompts.npy", prompts_BxP)
        header = (f"{'batch':>5s} {'context':>7s} {'new':>4s} | {'tokens/s':>17s} | "
                  f"{'first token (s)':>17s} | {'cache B/token':>17s} | greedy")
        print(f"{'':18s}   minids_jax / transformers in each pair\n{header}", flush=True)
        ratios, peer = [], None
        for context in contexts:
            n = new_tokens[context]
            # The same parameters in a model whose context (cache slots) fits this case.
            case_cfg = dataclasses.replace(imported, model=dataclasses.replace(
                m, max_seq_len=context + n))
            graphdef, _ = nnx.split(nnx.eval_shape(
                lambda cfg=case_cfg: build(cfg, platform, nnx.Rngs(0))))
            case_model = nnx.merge(graphdef, graph_state)
            for batch in batches:
                ours = decode_ours(case_model, prompts_BxP[:batch, :context], n)
                peer, theirs = decode_theirs(tmp / "hf", tmp / "prompts.npy",
                                             f"{batch}x{context}:{n}")
                agree = float(np.mean(ours.tokens_BxN == theirs.tokens_BxN))
                ratios.append(ours.tokens_per_s / theirs.tokens_per_s)
                print(f"{batch:5d} {context:7d} {n:4d} | {ours.tokens_per_s:8.1f} "
                      f"{theirs.tokens_per_s:8.1f} | {ours.first_token_s:8.3f} "
                      f"{theirs.first_token_s:8.3f} | {ours.cache_bytes_per_token:8,.0f} "
                      f"{theirs.cache_bytes_per_token:8,.0f} | {agree:.0%} agree", flush=True)
    print(f"transformers: {peer['model']} ({peer['attention']} attention, "
          f"{peer['parameters']:,} parameters, cache {peer['cases'][0]['cache_class']}), torch "
          f"{peer['torch']}, transformers {peer['transformers']}, {peer.get('device', 'cpu')}, "
          f"{peer['threads']} threads")
    print(f"decode vs transformers: {np.exp(np.mean(np.log(ratios))):.2f}x")


def main(argv):
    del argv
    from minids_jax import config as config_lib
    from minids_jax import startup

    startup.use_huge_pages(cli.wants_huge_pages(_CONFIG))  # first: it may run this again
    config = config_lib.from_config_dict(_CONFIG.value)
    if _VS_HF.value:
        compare_with_hf(config)
    else:
        from minids_jax import generation

        compare_kinds(config, generation.Sampling.parse(_SAMPLING.value, "--sampling"))


if __name__ == "__main__":
    cli.run(main)  # (which keeps orbax's INFO lines out)
