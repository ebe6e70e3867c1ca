"""Sampling (temperature, top-k, top-p) and the streaming loop over the model's cached forward.

The prompt is run once through the model with an empty cache (prefill: one jitted call over the
prompt padded to the context L, so every prompt length shares one compilation); then each new
token costs one jitted step of the same forward that sees only that token and the caches (see
attention.py and mhla.py for what each layer caches). The MoE decodes with an exact dispatch,
so a token's output never depends on the padding or the batch. When the context is full,
generation goes on from the last L/2 tokens (one new prefill), as an uncached model fed the
cropped text would.

Shapes: B batch, L context (model.max_seq_len), P prompt, T window, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minids_jax import kernels, sharding
from minids_jax.config import ConfigError
from minids_jax.data import chat
from minids_jax.data.instructions import format_prompt
from minids_jax.model import MiniDeepSeek


class PromptTooLongError(ValueError):
    """The prompt does not fit in the model's context."""


# Sampling looks at the CANDIDATES most likely tokens (jax.lax.top_k) instead of sorting the
# whole vocabulary, whenever the tokens it may draw are sure to be among them: top_k at most
# CANDIDATES, or a nucleus (top_p) that their probability already covers. At a published
# vocabulary the sort was most of a decode step (docs/generation.md#sampling).
CANDIDATES = 1024


def sample_logits(logits_BxV, key, temperature, top_k, top_p,
                  candidates: int = CANDIDATES) -> jax.Array:
    """One token per row: greedy when temperature == 0, else from softmax(logits / temperature)
    restricted to the top_k most likely tokens (0: no limit) and, among those, the smallest
    set whose probability reaches top_p (nucleus sampling; 1.0: no limit). All arguments but
    `candidates` may be traced, so changing them does not recompile. Only a nucleus that the
    `candidates` most likely tokens do not cover, or top_k above `candidates`, sorts the
    vocabulary."""
    vocab = logits_BxV.shape[-1]
    n_candidates = min(candidates, vocab)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)

    def greedy():
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def scaled():
        return logits_BxV / jnp.maximum(temperature, 1e-6)

    def unrestricted():
        return jax.random.categorical(key, scaled(), axis=-1).astype(jnp.int32)

    def restricted():
        scaled_BxV = scaled()
        top_BxC, token_BxC = jax.lax.top_k(scaled_BxV, n_candidates)  # most likely first
        in_top_k_C = jnp.arange(n_candidates) < k
        # Their probabilities among the top k: over the candidates when k <= C, over all V
        # when k == V (C < k < V: not covered, sorted below).
        log_total_Bx1 = jax.lax.cond(
            k <= n_candidates,
            lambda: jax.nn.logsumexp(jnp.where(in_top_k_C, top_BxC, -jnp.inf), axis=-1,
                                     keepdims=True),
            lambda: jax.nn.logsumexp(scaled_BxV, axis=-1, keepdims=True))
        probs_BxC = jnp.where(in_top_k_C, jnp.exp(top_BxC - log_total_Bx1), 0.0)
        n_keep_Bx1 = _nucleus_size(probs_BxC, k, top_p)

        def among_candidates():
            kept_BxC = jnp.where(jnp.arange(n_candidates) < n_keep_Bx1, top_BxC, -jnp.inf)
            choice_Bx1 = jax.random.categorical(key, kept_BxC, axis=-1)[:, None]
            return jnp.take_along_axis(token_BxC, choice_Bx1, axis=-1)[:, 0].astype(jnp.int32)

        def by_sorting():
            sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)
            probs_BxV = jax.nn.softmax(
                jnp.where(jnp.arange(vocab) < k, sorted_BxV, -jnp.inf), axis=-1)
            threshold_Bx1 = jnp.take_along_axis(
                sorted_BxV, _nucleus_size(probs_BxV, k, top_p) - 1, axis=-1)
            kept_BxV = jnp.where(scaled_BxV >= threshold_Bx1, scaled_BxV, -jnp.inf)
            return jax.random.categorical(key, kept_BxV, axis=-1).astype(jnp.int32)

        return jax.lax.cond(candidates_cover(probs_BxC, k, vocab, top_p), among_candidates,
                            by_sorting)

    return jax.lax.cond(
        temperature > 0,
        lambda: jax.lax.cond((k == vocab) & (top_p >= 1), unrestricted, restricted), greedy)


def _nucleus_size(probs_BxN, k, top_p) -> jax.Array:
    """[B, 1]: how many of the most likely tokens (probabilities in descending order) the
    nucleus keeps: up to the first whose preceding mass reaches top_p, at most k (all k at
    top_p 1, which the rounded sum of k probabilities may already reach)."""
    mass_before_BxN = jnp.cumsum(probs_BxN, axis=-1) - probs_BxN
    nucleus_Bx1 = jnp.sum(mass_before_BxN < top_p, axis=-1, keepdims=True)
    return jnp.where(top_p >= 1, k, jnp.minimum(nucleus_Bx1, k))


def candidates_cover(probs_BxC, k, vocab: int, top_p) -> jax.Array:
    """Whether the candidates hold every token sampling may draw, in every row: the top k
    (k <= C), or a nucleus over the whole vocabulary (k == V) that their probability reaches."""
    n_candidates = probs_BxC.shape[-1]
    return (k <= n_candidates) | ((k == vocab) & jnp.all(jnp.sum(probs_BxC, axis=-1) >= top_p))


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.8  # 0: greedy
    top_k: int = 50  # 0: no limit
    top_p: float = 0.95  # 1.0: no limit

    def __post_init__(self):
        if not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 means greedy).")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 means no limit).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1.0 means no limit).")

    def arrays(self):
        return (np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p))

    @classmethod
    def parse(cls, text: str, flag: str) -> Sampling:
        """The settings written temperature/top_k/top_p (0.8/50/0.95), as `flag` gives them;
        a malformed text is a ConfigError that says so."""
        try:
            temperature, top_k, top_p = text.split("/")
            return cls(float(temperature), int(top_k), float(top_p))
        except ValueError as error:
            raise ConfigError(f"{flag}={text}: {str(error).rstrip('.')}. Give "
                              f"temperature/top_k/top_p, such as 0.8/50/0.95.") from None


def _prefill(graphdef, treedef, moe_dispatch, leaves, tokens_BxL, length, key, n, sampling):
    """Samples token n after tokens[:length]; returns it, its logits and the caches."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    hidden_BxLxD, _, cache = model.hidden(tokens_BxL, cache=model.init_cache(tokens_BxL.shape[0]),
                                          moe_dispatch=moe_dispatch)
    last_BxD = jax.lax.dynamic_index_in_dim(hidden_BxLxD, length - 1, axis=1, keepdims=False)
    logits_BxV = model.logits(last_BxD)
    # The prompt fills slots 0..length-1; the padding after it is overwritten as decoding goes.
    cache = [layer_cache._replace(index=length) for layer_cache in cache]
    return sample_logits(logits_BxV, jax.random.fold_in(key, n), *sampling), logits_BxV, cache


def _step(graphdef, treedef, moe_dispatch, leaves, cache, token_B, key, n, sampling):
    """Puts the token at the cache's next slot and samples token n after it."""
    model = nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))
    logits_Bx1xV, _, cache = model(token_B[:, None], cache=cache, moe_dispatch=moe_dispatch)
    logits_BxV = logits_Bx1xV[:, 0]
    return sample_logits(logits_BxV, jax.random.fold_in(key, n), *sampling), logits_BxV, cache


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, treedef, moe_dispatch: str):
    """One pair of jitted functions per model structure, shared by its Generators (the
    structure is hashed once here rather than on every token)."""
    return (jax.jit(functools.partial(_prefill, graphdef, treedef, moe_dispatch)),
            jax.jit(functools.partial(_step, graphdef, treedef, moe_dispatch),
                    donate_argnums=1))


class Generator:
    """Streams tokens from one model. Prompt length, position and sampling settings never
    cause a recompile; models of the same structure share the compiled functions.

    Each token is one call of a jitted step. Its arguments are the model's arrays as a flat
    list (an nnx.State would be flattened in Python on every call, which with many layers
    costs as much as the step: docs/generation.md), and the next step is dispatched before
    this one's token is read back, so that the host's work on a call overlaps the device's on
    the one before."""

    def __init__(self, model: MiniDeepSeek, moe_dispatch: str | None = None):
        """`moe_dispatch`: the MoE's dispatch while decoding; by default the model's own if it
        drops nothing, else the exact one for the platform."""
        self.cfg = model.cfg
        if moe_dispatch is None:
            own = model.compute.moe_dispatch
            moe_dispatch = own if own != "capacity" else kernels.exact_dispatch(
                sharding.mesh_platform())
        graphdef, state = nnx.split(model)
        self.leaves, treedef = jax.tree.flatten(state)
        self.prefill_fn, self.step_fn = _compiled(graphdef, treedef, moe_dispatch)

    def check_prompt(self, prompt_BxP: np.ndarray) -> np.ndarray:
        prompt_BxP = np.asarray(prompt_BxP, dtype=np.int32)
        if prompt_BxP.ndim == 1:
            prompt_BxP = prompt_BxP[None]
        context, length = self.cfg.max_seq_len, prompt_BxP.shape[1]
        if length == 0:
            raise ValueError("the prompt is empty; give at least one token (e.g. the "
                             "tokenizer's EOS, which starts a new document).")
        if length > context:
            raise PromptTooLongError(
                f"the prompt is {length} tokens, longer than the model's context of "
                f"model.max_seq_len={context} tokens; shorten it (e.g. keep its last "
                f"{context} tokens) or use a model trained with a longer max_seq_len.")
        if prompt_BxP.min() < 0 or prompt_BxP.max() >= self.cfg.vocab_size:
            raise ValueError(f"prompt token ids must lie in [0, model.vocab_size="
                             f"{self.cfg.vocab_size}); got {prompt_BxP.min()}..{prompt_BxP.max()}: "
                             f"encode it with the run's own tokenizer.")
        return prompt_BxP

    def _prefill_window(self, window_BxT: np.ndarray, key, n: int, sampling):
        """The prefill's (token, logits, caches), once computed: a step queued behind a
        prefill slows it (docs/generation.md)."""
        padded_BxL = np.zeros((window_BxT.shape[0], self.cfg.max_seq_len), np.int32)
        padded_BxL[:, :window_BxT.shape[1]] = window_BxT
        return jax.block_until_ready(self.prefill_fn(
            self.leaves, padded_BxL, np.int32(window_BxT.shape[1]), key, np.int32(n), sampling))

    def stream(self, prompt_BxP, max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, stop_token: int | None = None,
               with_logits: bool = False, pad_token: int | None = None) -> Iterator:
        """Yields each new token [B] (with its logits [B, V] if `with_logits`) as it is made.

        A row that has produced `stop_token` yields `pad_token` (default: the stop token)
        after it, whatever the sampling draws; the stream stops after `max_new_tokens`, or
        once every row has stopped. The token at index n is drawn with fold_in(key(seed), n),
        so a seed gives the same text every run.
        """
        pad_token = stop_token if pad_token is None else pad_token
        prompt_BxP = self.check_prompt(prompt_BxP)
        context, keep = self.cfg.max_seq_len, self.cfg.max_seq_len // 2
        key, params = jax.random.key(seed), sampling.arrays()
        window_BxT = prompt_BxP  # the text so far, on the host (the cache: all but the newest)
        stopped_B = np.zeros(prompt_BxP.shape[0], bool)
        made = self._prefill_window(window_BxT, key, 0, params) if max_new_tokens else None
        for n in range(max_new_tokens):
            token_B, logits_BxV, cache = made
            # Token n goes to the cache's next slot, unless the window then outgrows the
            # context: that prefill needs the window on the host.
            steps_on = n + 1 < max_new_tokens and window_BxT.shape[1] + 1 <= context
            if steps_on:  # before token n is read back; a row that stopped decodes on unseen
                made = self.step_fn(self.leaves, cache, token_B, key, np.int32(n + 1), params)
            token_B = np.asarray(token_B)
            if stop_token is not None:  # what a row draws after its stop is not its text
                token_B = np.where(stopped_B, pad_token, token_B).astype(np.int32)
            window_BxT = np.concatenate([window_BxT, token_B[:, None]], axis=1)
            yield (token_B, logits_BxV) if with_logits else token_B
            if stop_token is not None:
                stopped_B |= token_B == stop_token
                if stopped_B.all():
                    return
            if not steps_on and n + 1 < max_new_tokens:
                window_BxT = window_BxT[:, -keep:]
                made = self._prefill_window(window_BxT, key, n + 1, params)


def prompt_tokens(tokenizer, text: str = "", instruction: str | None = None,
                  input: str = "",  # noqa: A002 (the data field's name)
                  messages=None) -> np.ndarray:
    """The token ids a run's model expects before the text it should continue.

    With `instruction`, the prompt is laid out as instruction data is for training
    ([BOS], then `instructions.format_prompt`), so the model answers with an `output`. With
    `messages` ([(role, content), ...] ending with a user turn), the conversation is laid out by
    the chat template of training (chat.py) with the generation prompt, so the model answers as
    the assistant (`chat.fit_prompt` also drops old turns to fit a context). Otherwise `text`
    itself; empty text becomes EOS, which is what precedes a document in a text corpus.
    """
    if messages is not None:
        return chat.encode(tokenizer, messages, add_generation_prompt=True)[0]
    if instruction is not None:
        body = np.asarray(tokenizer.encode(format_prompt(instruction, input)), np.int32)
        return np.concatenate([np.array([tokenizer.BOS], np.int32), body])
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    return tokens if tokens.size else np.array([tokenizer.EOS], np.int32)


def generate(model: MiniDeepSeek, prompt_ids, max_new_tokens: int, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0,
             stop_token: int | None = None, pad_token: int | None = None) -> np.ndarray:
    """The new token ids after each prompt, [B, N] int32 (`prompt_ids` [B, P] or one prompt
    [P]; the rows share a length P). Greedy at temperature 0, else sampled as `Sampling`
    says, token n drawn with fold_in(key(seed), n). A row stops at its first `stop_token`
    (included) and is padded with `pad_token` (default: `stop_token`) after it; N <
    max_new_tokens once every row has stopped."""
    sampling = Sampling(temperature, top_k, top_p)
    tokens = list(Generator(model).stream(prompt_ids, max_new_tokens, sampling, seed, stop_token,
                                          pad_token=pad_token))
    rows = np.atleast_2d(np.asarray(prompt_ids)).shape[0]
    new_BxN = np.stack(tokens, axis=1) if tokens else np.zeros((rows, 0), np.int32)
    return new_BxN.astype(np.int32)
