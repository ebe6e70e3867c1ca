"""Cached decoding against the full forward, sampling, and the generate.py command."""

from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minids_jax
from minids_jax import generation
from minids_jax.model import MiniDeepSeek
from tests.factories import compute_config, small_model_config

CONTEXT = 16
# MHA, MHLA and MLA layers; 4 latents of 4 positions each, so prompts cross segment ends;
# DeepSeekMoE's sigmoid routing and a shared expert.
CFG = small_model_config(vocab_size=61, max_seq_len=CONTEXT, n_heads=2, mlp_mult=4, n_experts=3,
                         top_k=2, n_layers=3, attn_pattern=("mha", "mhla", "mla"),
                         router_scoring="sigmoid", n_shared_experts=1)
GREEDY = generation.Sampling(temperature=0.0)
ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return MiniDeepSeek(CFG, compute_config(), rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def generator(model):
    return generation.Generator(model)


@pytest.fixture(scope="module")
def full_forward(model):
    """Uncached reference: the ordinary forward over the whole window (padded to the context;
    causal, so the padding cannot change the logits at real positions)."""
    forward = jax.jit(lambda tokens_BxL: model(tokens_BxL)[0])

    def last_logits(window_BxT):
        padded = np.zeros((window_BxT.shape[0], CONTEXT), np.int32)
        padded[:, :window_BxT.shape[1]] = window_BxT
        return np.asarray(forward(padded))[:, window_BxT.shape[1] - 1]

    return last_logits


def uncached_greedy(full_forward, prompt_BxP, n):
    """Greedy decoding by a re-forward per token, cropping to the last CONTEXT/2 tokens when
    the window would overflow (the policy `Generator.stream` documents)."""
    window, tokens, logits = prompt_BxP, [], []
    for _ in range(n):
        step_logits = full_forward(window)
        token = step_logits.argmax(-1).astype(np.int32)
        tokens.append(token), logits.append(step_logits)
        window = np.concatenate([window, token[:, None]], axis=1)
        if window.shape[1] > CONTEXT:
            window = window[:, -(CONTEXT // 2):]
    return np.stack(tokens, 1), np.stack(logits, 1)


@pytest.mark.parametrize("prompt_len", [1, 3, 4, 8, 15])
def test_cached_greedy_equals_uncached(generator, full_forward, prompt_len):
    # Prompts end inside a segment (3, 15), just after one (4, 8) and at the start; 12 new
    # tokens cross several latent segment ends, and from 15 the context overflows.
    prompt_BxP = np.random.default_rng(prompt_len).integers(0, CFG.vocab_size, (2, prompt_len))
    steps = list(generator.stream(prompt_BxP, 12, GREEDY, with_logits=True))
    cached_tokens = np.stack([np.asarray(t) for t, _ in steps], 1)
    cached_logits = np.stack([np.asarray(l) for _, l in steps], 1)
    want_tokens, want_logits = uncached_greedy(full_forward, prompt_BxP, 12)
    np.testing.assert_allclose(cached_logits, want_logits, atol=2e-4, rtol=2e-4)
    np.testing.assert_array_equal(cached_tokens, want_tokens)


def test_a_model_trained_with_capacity_dispatch_decodes_exactly(model, full_forward):
    """Capacity dispatch drops tokens by how many share a batch; decoding picks an exact
    dispatch explicitly, so the tokens equal the dropless model's uncached greedy ones."""
    capacity = MiniDeepSeek(CFG, compute_config(moe_dispatch="capacity", capacity_factor=0.1),
                            rngs=nnx.Rngs(3))
    prompt_BxP = np.random.default_rng(0).integers(0, CFG.vocab_size, (2, 5))
    got = generation.generate(capacity, prompt_BxP, 6)
    np.testing.assert_array_equal(got, uncached_greedy(full_forward, prompt_BxP, 6)[0])


def test_decode_step_does_not_recompile_across_positions(generator):
    list(generator.stream(np.arange(10).reshape(2, 5), 6, GREEDY))
    compiled = generator.step_fn._cache_size(), generator.prefill_fn._cache_size()
    list(generator.stream(np.arange(4).reshape(2, 2), 9, generation.Sampling(0.7, 5, 0.9)))
    assert (generator.step_fn._cache_size(), generator.prefill_fn._cache_size()) == compiled == (1, 1)


def test_next_step_is_dispatched_before_a_token_is_read_back(model):
    """When token n reaches the caller, token n + 1's step is already under way (the host's
    work on a call overlaps the device's), taking the model's arrays as a flat list; a window
    that outgrows the context prefills instead, after token n is read."""
    generator, calls = generation.Generator(model), []
    step_fn = generator.step_fn

    def counted(leaves, *args):
        assert isinstance(leaves, list) and all(isinstance(x, jax.Array) for x in leaves)
        calls.append(len(leaves))
        return step_fn(leaves, *args)

    generator.step_fn = counted
    prompt, n = np.array([[1, 2, 3]]), CONTEXT + 2  # rolls over once, at token 13
    steps_before = [len(calls) for _ in generator.stream(prompt, n, GREEDY)]
    rolled_over = CONTEXT - prompt.shape[1]  # the window then holds CONTEXT + 1 tokens
    expected = [i + 1 if i < rolled_over else i for i in range(n - 1)] + [n - 2]
    assert steps_before == expected


def test_sampling_is_reproducible_with_a_seed(generator):
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    sampling = generation.Sampling(temperature=1.0, top_k=0, top_p=1.0)
    first = np.stack(list(generator.stream(prompt, 10, sampling, seed=7)), 1)
    again = np.stack(list(generator.stream(prompt, 10, sampling, seed=7)), 1)
    other = np.stack(list(generator.stream(prompt, 10, sampling, seed=8)), 1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)  # the seed matters (chance of a tie ~ 61^-20)


def test_top_k_and_top_p_restrict_the_support():
    logits_BxV = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
    sample = jax.jit(generation.sample_logits)

    def draws(**kw):
        return np.asarray(sample(logits_BxV, jax.random.key(0), **kw))

    assert set(draws(temperature=1.0, top_k=2, top_p=1.0)) == {0, 1}
    # 0.5 + 0.3 >= 0.8: the nucleus is {0, 1}; at 0.81 it needs token 2 as well.
    assert set(draws(temperature=1.0, top_k=0, top_p=0.8)) == {0, 1}
    assert set(draws(temperature=1.0, top_k=0, top_p=0.81)) == {0, 1, 2}
    assert set(draws(temperature=1.0, top_k=0, top_p=1.0)) == {0, 1, 2, 3}
    assert set(draws(temperature=0.0, top_k=0, top_p=1.0)) == {0}
    # Unrestricted sampling follows the probabilities.
    freq = np.bincount(draws(temperature=1.0, top_k=0, top_p=1.0), minlength=4) / 4000
    np.testing.assert_allclose(freq, [0.5, 0.3, 0.15, 0.05], atol=0.03)


def reference_support(logits_V, temperature, top_k, top_p):
    """The tokens sampling may draw and their probabilities, by sorting the whole vocabulary."""
    scaled_V = np.asarray(logits_V, np.float64) / temperature
    order_V = np.argsort(-scaled_V, kind="stable")
    k = len(order_V) if top_k == 0 else min(top_k, len(order_V))
    probs_K = np.exp(scaled_V[order_V[:k]] - scaled_V[order_V[0]])
    probs_K /= probs_K.sum()
    keep = k if top_p >= 1 else int(np.sum(np.cumsum(probs_K) - probs_K < top_p))
    kept_V = np.zeros(len(order_V))
    kept_V[order_V[:keep]] = probs_K[:keep] / probs_K[:keep].sum()
    return kept_V


# (temperature, top_k, top_p) over 64 tokens with probabilities 0.2 * 0.8^rank, of which
# sample_logits looks at 8 candidates (mass 0.83): the top k within them, a nucleus they
# cover, one they do not (sorted), a top k past them (sorted), no limit, and a temperature.
SAMPLING_CASES = [(1.0, 5, 1.0), (1.0, 0, 0.5), (1.0, 0, 0.97), (1.0, 20, 0.9),
                  (1.0, 0, 1.0), (0.5, 0, 0.9)]


@pytest.mark.parametrize("temperature,top_k,top_p", SAMPLING_CASES)
def test_sampling_draws_the_top_k_and_nucleus_with_their_probabilities(temperature, top_k,
                                                                       top_p):
    rank_V = np.random.default_rng(0).permutation(64)
    logits_V = np.log(0.2) + rank_V * np.log(0.8)
    draws = np.asarray(jax.jit(functools.partial(generation.sample_logits, candidates=8))(
        jnp.asarray(np.tile(logits_V, (6000, 1)), jnp.float32), jax.random.key(1),
        np.float32(temperature), np.int32(top_k), np.float32(top_p)))
    expected_V = reference_support(logits_V, temperature, top_k, top_p)
    assert set(draws) <= set(np.flatnonzero(expected_V))  # nothing outside the support
    assert set(draws) >= set(np.flatnonzero(expected_V > 0.002))  # ~12+ draws each
    np.testing.assert_allclose(np.bincount(draws, minlength=64) / len(draws), expected_V,
                               atol=0.02)


def test_sampling_sorts_only_what_its_candidates_cannot_hold():
    probs_BxC = jnp.array([[0.5, 0.2, 0.1], [0.4, 0.3, 0.2]])  # masses 0.8 and 0.9
    cover = functools.partial(generation.candidates_cover, probs_BxC, vocab=100)
    assert cover(k=3, top_p=1.0) and cover(k=2, top_p=0.99)  # the top k: always
    assert cover(k=100, top_p=0.8) and not cover(k=100, top_p=0.85)  # every row's nucleus
    assert not cover(k=4, top_p=0.5)  # a top k past the candidates


def test_stop_token_ends_generation(model, full_forward):
    prompt = np.array([[5, 9, 2], [5, 9, 2]])
    greedy, _ = uncached_greedy(full_forward, prompt, 6)
    stop = int(greedy[0, 2])
    first_stop = int(np.argmax(greedy[0] == stop))
    got = generation.generate(model, prompt, 6, stop_token=stop)
    np.testing.assert_array_equal(got, greedy[:, :first_stop + 1])


def test_public_generate_pads_the_rows_that_stopped(model, full_forward):
    """minids_jax.generate: a row that met its stop token is padded with it after, while the
    other rows go on; the ids of a row that has not stopped are its greedy ones."""
    prompt = np.array([[5, 9, 2], [7, 1, 3]])
    greedy, _ = uncached_greedy(full_forward, prompt, 6)
    # A token row 0 makes before row 1 does (row 1 then goes on after row 0 stopped).
    first = [{int(t): i for i, t in reversed(list(enumerate(row)))} for row in greedy]
    stop = next(t for t, i in first[0].items() if first[1].get(t, 6) > i)
    expected = greedy.copy()
    for row, firsts in enumerate(first):
        if stop in firsts:
            expected[row, firsts[stop] + 1:] = stop
    got = minids_jax.generate(model, prompt, 6, stop_token=stop)
    length = max(first[1].get(stop, 5), first[0][stop]) + 1
    np.testing.assert_array_equal(got, expected[:, :length])
    assert got[0, first[0][stop] + 1:].tolist() == [stop] * (length - first[0][stop] - 1)


def test_prompt_longer_than_context_is_a_clear_error(generator):
    with pytest.raises(generation.PromptTooLongError, match=r"17 tokens.*max_seq_len=16"):
        list(generator.stream(np.zeros((2, CONTEXT + 1), np.int32), 1))
    with pytest.raises(ValueError, match="vocab_size"):
        list(generator.stream(np.array([[CFG.vocab_size]] * 2), 1))
    with pytest.raises(ValueError, match="top_p"):
        generation.Sampling(top_p=0.0)


@pytest.mark.slow
def test_generate_command_end_to_end(tmp_path, compile_cache):
    """Trains a tiny run on the builtin corpus, then samples from it with generate.py."""
    from tests.factories import subprocess_env

    workdir = tmp_path / "run"
    env = subprocess_env(compile_cache)  # the second sampling reuses the first's programs
    overrides = ["--config.model.max_seq_len=32", "--config.model.d_model=32",
                 "--config.model.n_layers=2", "--config.model.n_heads=2",
                 "--config.model.latent_k=4", "--config.model.n_experts=2",
                 "--config.optim.total_steps=4", "--config.optim.warmup_steps=1",
                 "--config.train.batch_size=2", "--config.train.log_every=2",
                 "--config.train.eval_batches=1", "--config.data.max_bytes=200000",
                 "--config.data.cache_dir="]
    subprocess.run([sys.executable, "train.py", "--config", "configs/tiny.py",
                    f"--workdir={workdir}", *overrides],
                   cwd=ROOT, env=env, check=True, capture_output=True, timeout=300)
    args = [sys.executable, "generate.py", f"--workdir={workdir}", "--prompt=def ",
            "--max_new_tokens=20", "--temperature=0.8", "--seed=3"]
    first = subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True,
                           text=True, timeout=300)
    again = subprocess.run(args, cwd=ROOT, env=env, check=True, capture_output=True,
                           text=True, timeout=300)
    assert first.stdout.startswith("def ") and len(first.stdout) > len("def ")
    assert first.stdout == again.stdout
    too_long = subprocess.run(args[:3] + ["--prompt=" + "x" * 40], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=300)
    assert too_long.returncode != 0 and "max_seq_len=32" in too_long.stderr


def test_prompt_tokens_follow_the_training_layout():
    from minids_jax.data.instructions import format_prompt
    from minids_jax.data.tokenization import ByteTokenizer
    tokenizer = ByteTokenizer()
    tokens = generation.prompt_tokens(tokenizer, instruction="Add the numbers.", input="2 3")
    assert tokens[0] == tokenizer.BOS
    assert tokenizer.decode(tokens[1:]) == format_prompt("Add the numbers.", "2 3")
    np.testing.assert_array_equal(generation.prompt_tokens(tokenizer, ""), [tokenizer.EOS])
    np.testing.assert_array_equal(generation.prompt_tokens(tokenizer, "hi"), [104, 105])


def test_a_row_that_stopped_emits_padding_and_the_other_decodes_as_alone(model, generator):
    """The stop token is what greedy decoding makes at step 2 of row 0: after it row 0 emits
    only the pad id, from the stream too, while row 1 goes on as it would alone."""
    prompt = np.array([[5, 9, 2], [7, 1, 3]])
    greedy = generation.generate(model, prompt, 8)
    stop, pad = int(greedy[0, 2]), CFG.vocab_size - 1
    assert stop not in greedy[0, :2] and stop not in greedy[1]  # only row 0 stops
    got = minids_jax.generate(model, prompt, 8, stop_token=stop, pad_token=pad)
    np.testing.assert_array_equal(got[0], [*greedy[0, :3], *[pad] * 5])
    alone = minids_jax.generate(model, prompt[1:], 8, stop_token=stop, pad_token=pad)
    np.testing.assert_array_equal(got[1:], alone)
    np.testing.assert_array_equal(alone[0], greedy[1])
    streamed = np.stack(list(generator.stream(prompt, 8, GREEDY, stop_token=stop,
                                              pad_token=pad)), 1)
    np.testing.assert_array_equal(streamed, got)
    # Sampled: once row 0 has made its stop token, it pads.
    free = generation.generate(model, prompt, 8, temperature=1.0, seed=4)
    stop = int(free[0, 1])
    first = list(free[0]).index(stop)
    sampled = generation.generate(model, prompt, 8, temperature=1.0, seed=4, stop_token=stop,
                                  pad_token=pad)
    np.testing.assert_array_equal(sampled[0, :first + 1], free[0, :first + 1])
    assert sampled.shape[1] > first + 1 and set(sampled[0, first + 1:]) == {pad}
