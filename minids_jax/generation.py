"""Incremental decoding with per-layer caches, and sampling (temperature, top-k, top-p).

Shapes: B batch, L context (model.max_seq_len), D model width, H heads, Dh head width,
K latents, V vocab.

The prompt is run once through the whole model (prefill, one jitted call over the prompt padded
to L, so every prompt length shares one compilation); then each new token costs one jitted step
that sees only that token and the caches:

  MHA   keys and values of every position so far, [B, L, H, Dh]. One query per step.
  MHLA  the read keys/values of every position, and the latent-self and write keys/values of
        each latent, [B, K, H, Dh]. At position i only latent j = i // (L/K) is still open (its
        segment ends at e_j > i); the step writes the token into the read cache, re-reads that
        one latent from it (one query over L, like MHA), runs that latent through latent-self
        against the cached latents j' <= j, and refreshes its write keys/values. Position i
        then writes from the latents with e_j <= i + 1, whose entries are final: latent j is
        complete once position e_j - 1 has been seen, and is never touched again.

Per token that is a few D x D projections plus O(L + K) attention per layer, against O(L) tokens
of projections for a re-forward. Output equals the full forward token for token
(tests/test_generation.py). When the context is full, generation goes on from the last L/2
tokens (one new prefill), as an uncached model fed the cropped text would.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from minids_jax.attention import MHA, MHLA, latent_segment_ends
from minids_jax.model import MiniDeepSeek


class MHACache(NamedTuple):
    k_BxLxHxDh: jax.Array
    v_BxLxHxDh: jax.Array


class MHLACache(NamedTuple):
    read_k_BxLxHxDh: jax.Array
    read_v_BxLxHxDh: jax.Array
    self_k_BxKxHxDh: jax.Array
    self_v_BxKxHxDh: jax.Array
    write_k_BxKxHxDh: jax.Array
    write_v_BxKxHxDh: jax.Array


class PromptTooLongError(ValueError):
    """The prompt does not fit in the model's context."""


# --- prefill: the whole (padded) prompt at positions 0..L-1 -------------------------------------

def _prefill_attention(layer, x_BxLxD, positions_BxL):
    """The layer's ordinary forward, plus the caches it implies (XLA shares the projections)."""
    if isinstance(layer, MHA):
        cache = MHACache(*layer.attention.keys_values(x_BxLxD, positions_BxL))
        return layer(x_BxLxD, positions_BxL), cache
    latent_pos_BxK = layer.latent_positions(x_BxLxD.shape[0])
    z1_BxKxD = layer.read_sequence(x_BxLxD, positions_BxL)
    z2_BxKxD = layer.attend_latents(z1_BxKxD)
    cache = MHLACache(*layer.read.keys_values(x_BxLxD, positions_BxL),
                      *layer.latent_self.keys_values(z1_BxKxD, latent_pos_BxK),
                      *layer.write.keys_values(z2_BxKxD, latent_pos_BxK))
    return layer.write_sequence(x_BxLxD, positions_BxL, z2_BxKxD), cache


# --- decode: one token at position `pos` ----------------------------------------------------------

def _put(cache_BxSxHxDh: jax.Array, new_Bx1xHxDh: jax.Array, index) -> jax.Array:
    return jax.lax.dynamic_update_slice_in_dim(cache_BxSxHxDh, new_Bx1xHxDh.astype(
        cache_BxSxHxDh.dtype), index, axis=1)


def _cache_keys_values(projections, sources_Bx1xD, source_pos_Bx1, k_cache, v_cache, index):
    """Projects one source's key and value and writes them into the caches at slot `index`."""
    k_Bx1xHxDh, v_Bx1xHxDh = projections.keys_values(sources_Bx1xD, source_pos_Bx1)
    return _put(k_cache, k_Bx1xHxDh, index), _put(v_cache, v_Bx1xHxDh, index)


def _up_to(index, size: int, batch: int) -> jax.Array:
    """Mask [B, 1, size]: True at slots 0..index."""
    return jnp.broadcast_to(jnp.arange(size) <= index, (batch, 1, size))


def _decode_mha(layer: MHA, x_Bx1xD, pos, cache: MHACache):
    attention, batch = layer.attention, x_Bx1xD.shape[0]
    pos_Bx1 = jnp.full((batch, 1), pos)
    cache = MHACache(*_cache_keys_values(attention, x_Bx1xD, pos_Bx1, cache.k_BxLxHxDh,
                                         cache.v_BxLxHxDh, pos))
    mask_Bx1xL = _up_to(pos, cache.k_BxLxHxDh.shape[1], batch)
    return attention.attend_keys_values(x_Bx1xD, pos_Bx1, *cache, mask_BxQxS=mask_Bx1xL), cache


def _decode_mhla(layer: MHLA, x_Bx1xD, pos, cache: MHLACache):
    cfg, batch = layer.cfg, x_Bx1xD.shape[0]
    segment = cfg.max_seq_len // cfg.latent_k
    open_latent = pos // segment  # the one latent whose segment is still being read
    pos_Bx1 = jnp.full((batch, 1), pos)
    latent_pos_Bx1 = jnp.full((batch, 1), (open_latent + 1) * segment - 1)

    # Read: the open latent attends to every position seen so far (all lie before its end).
    read_k, read_v = _cache_keys_values(layer.read, x_Bx1xD, pos_Bx1, cache.read_k_BxLxHxDh,
                                        cache.read_v_BxLxHxDh, pos)
    z0_Bx1xD = jnp.broadcast_to(
        jax.lax.dynamic_slice_in_dim(layer.latents[...], open_latent, 1).astype(x_Bx1xD.dtype),
        (batch, 1, cfg.d_model))
    z1_Bx1xD = layer.read_norm(z0_Bx1xD + layer.read.attend_keys_values(
        z0_Bx1xD, latent_pos_Bx1, read_k, read_v,
        mask_BxQxS=_up_to(pos, cfg.max_seq_len, batch)))

    # Latent self: causal over latents, against the cached (complete) latents before it.
    self_k, self_v = _cache_keys_values(layer.latent_self, z1_Bx1xD, latent_pos_Bx1,
                                        cache.self_k_BxKxHxDh, cache.self_v_BxKxHxDh,
                                        open_latent)
    z2_Bx1xD = layer.latent_self_norm(z1_Bx1xD + layer.latent_self.attend_keys_values(
        z1_Bx1xD, latent_pos_Bx1, self_k, self_v,
        mask_BxQxS=_up_to(open_latent, cfg.latent_k, batch)))

    # Write: only latents whose segment has ended; the open one counts once pos = e_j - 1.
    write_k, write_v = _cache_keys_values(layer.write, z2_Bx1xD, latent_pos_Bx1,
                                          cache.write_k_BxKxHxDh, cache.write_v_BxKxHxDh,
                                          open_latent)
    ended_Bx1xK = jnp.broadcast_to(latent_segment_ends(cfg) <= pos + 1, (batch, 1, cfg.latent_k))
    out_Bx1xD = layer.write.attend_keys_values(x_Bx1xD, pos_Bx1, write_k, write_v,
                                              mask_BxQxS=ended_Bx1xK)
    return out_Bx1xD, MHLACache(read_k, read_v, self_k, self_v, write_k, write_v)


# --- the model with caches ------------------------------------------------------------------------

def _exact_moe(model: MiniDeepSeek) -> MiniDeepSeek:
    """Switches the MoE layers to the dropless dispatch (same output as dense).

    Capacity dispatch drops tokens depending on how many share a batch, a training-time trade
    that would make a token's output depend on the prompt's padding. Called on the copy that
    `nnx.merge` makes inside a jitted function, never on the caller's model.
    """
    for block in model.blocks:
        block.moe.cfg = dataclasses.replace(block.moe.cfg, moe_dispatch="dropless")
    return model


def _forward(model: MiniDeepSeek, tokens_BxT, attention_fn):
    """The blocks of `model.__call__`, with each attention layer replaced by `attention_fn`."""
    x_BxTxD = model.embed(tokens_BxT)
    caches = []
    for block in model.blocks:
        attended_BxTxD, cache = attention_fn(block.attn, block.norm1(x_BxTxD))
        x_BxTxD = x_BxTxD + attended_BxTxD
        moe_out_BxTxD, _ = block.moe(block.norm2(x_BxTxD))
        x_BxTxD = x_BxTxD + moe_out_BxTxD
        caches.append(cache)
    return x_BxTxD, caches


def _next_token_logits(model: MiniDeepSeek, x_BxD) -> jax.Array:
    return model.head(model.final_norm(x_BxD)).astype(jnp.float32)


def sample_logits(logits_BxV, key, temperature, top_k, top_p) -> jax.Array:
    """One token per row: greedy when temperature == 0, else from softmax(logits / temperature)
    restricted to the top_k most likely tokens (0: no limit) and, among those, the smallest
    set whose probability reaches top_p (nucleus sampling; 1.0: no limit). All arguments may be
    traced, so changing them does not recompile."""
    vocab = logits_BxV.shape[-1]
    scaled_BxV = logits_BxV / jnp.maximum(temperature, 1e-6)
    sorted_BxV = -jnp.sort(-scaled_BxV, axis=-1)  # most likely first
    k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
    in_top_k_V = jnp.arange(vocab) < k
    probs_BxV = jax.nn.softmax(jnp.where(in_top_k_V, sorted_BxV, -jnp.inf), axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    n_keep_Bx1 = jnp.minimum(jnp.sum(mass_before_BxV < top_p, axis=-1, keepdims=True), k)
    threshold_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep_Bx1 - 1, axis=-1)
    kept_BxV = jnp.where(scaled_BxV >= threshold_Bx1, scaled_BxV, -jnp.inf)
    sampled_B = jax.random.categorical(key, kept_BxV, axis=-1)
    return jnp.where(temperature > 0, sampled_B, jnp.argmax(logits_BxV, axis=-1)).astype(jnp.int32)


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


def _prefill(graphdef, state, tokens_BxL, length, key, n, sampling):
    """Samples token n after tokens[:length]; returns it, its logits and the caches."""
    model = _exact_moe(nnx.merge(graphdef, state))
    positions_BxL = jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape)
    x_BxLxD, caches = _forward(model, tokens_BxL,
                               lambda layer, h: _prefill_attention(layer, h, positions_BxL))
    logits_BxV = _next_token_logits(model, jax.lax.dynamic_index_in_dim(
        x_BxLxD, length - 1, axis=1, keepdims=False))
    return sample_logits(logits_BxV, jax.random.fold_in(key, n), *sampling), logits_BxV, caches


def _step(graphdef, state, caches, token_B, pos, key, n, sampling):
    """Puts token at position `pos` and samples token n after it (caches updated in place)."""
    model = _exact_moe(nnx.merge(graphdef, state))
    layer_caches = iter(caches)  # consumed in layer order by _forward

    def attention_fn(layer, h_Bx1xD):
        decode = _decode_mha if isinstance(layer, MHA) else _decode_mhla
        return decode(layer, h_Bx1xD, pos, next(layer_caches))

    x_Bx1xD, caches = _forward(model, token_B[:, None], attention_fn)
    logits_BxV = _next_token_logits(model, x_Bx1xD[:, 0])
    return sample_logits(logits_BxV, jax.random.fold_in(key, n), *sampling), logits_BxV, caches


@functools.lru_cache(maxsize=16)
def _compiled(graphdef):
    """One pair of jitted functions per model structure, shared by its Generators (the
    structure is hashed once here rather than on every token)."""
    return (jax.jit(functools.partial(_prefill, graphdef)),
            jax.jit(functools.partial(_step, graphdef), donate_argnums=1))


class Generator:
    """Streams tokens from one model. Prompt length, position and sampling settings never
    cause a recompile; models of the same structure share the compiled functions."""

    def __init__(self, model: MiniDeepSeek):
        self.cfg = model.cfg
        self.graphdef, self.state = nnx.split(model)
        self._prefill, self._step = _compiled(self.graphdef)

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
        padded_BxL = np.zeros((window_BxT.shape[0], self.cfg.max_seq_len), np.int32)
        padded_BxL[:, :window_BxT.shape[1]] = window_BxT
        return self._prefill(self.state, padded_BxL, np.int32(window_BxT.shape[1]), key,
                             np.int32(n), sampling)

    def stream(self, prompt_BxP, max_new_tokens: int, sampling: Sampling = Sampling(),
               seed: int = 0, stop_token: int | None = None,
               with_logits: bool = False) -> Iterator:
        """Yields each new token [B] (with its logits [B, V] if `with_logits`) as it is made.

        Stops after `max_new_tokens`, or once every row has produced `stop_token`. The token
        at index n is drawn with fold_in(key(seed), n), so a seed gives the same text every run.
        """
        prompt_BxP = self.check_prompt(prompt_BxP)
        context, keep = self.cfg.max_seq_len, self.cfg.max_seq_len // 2
        key, params = jax.random.key(seed), sampling.arrays()
        window_BxT = prompt_BxP
        stopped_B = np.zeros(prompt_BxP.shape[0], bool)
        for n in range(max_new_tokens):
            if n == 0 or window_BxT.shape[1] > context:
                window_BxT = window_BxT[:, -keep:] if n else window_BxT
                token_B, logits_BxV, caches = self._prefill_window(window_BxT, key, n, params)
            else:  # the newest token sits at position T - 1 of the window
                token_B, logits_BxV, caches = self._step(
                    self.state, caches, window_BxT[:, -1], np.int32(window_BxT.shape[1] - 1),
                    key, np.int32(n), params)
            token_B = np.asarray(token_B)
            window_BxT = np.concatenate([window_BxT, token_B[:, None]], axis=1)
            yield (token_B, logits_BxV) if with_logits else token_B
            if stop_token is not None:
                stopped_B |= token_B == stop_token
                if stopped_B.all():
                    return


def prompt_tokens(tokenizer, text: str = "", instruction: str | None = None,
                  input: str = "") -> np.ndarray:  # noqa: A002 (the data field's name)
    """The token ids a run's model expects before the text it should continue.

    With `instruction`, the prompt is laid out as instruction data is for training
    ([BOS], then `instructions.format_prompt`), so the model answers with an `output`. Otherwise
    `text` itself; empty text becomes EOS, which is what precedes a document in a text corpus.
    """
    if instruction is not None:
        from minids_jax.instructions import format_prompt
        body = np.asarray(tokenizer.encode(format_prompt(instruction, input)), np.int32)
        return np.concatenate([np.array([tokenizer.BOS], np.int32), body])
    tokens = np.asarray(tokenizer.encode(text), np.int32)
    return tokens if tokens.size else np.array([tokenizer.EOS], np.int32)


def generate(model: MiniDeepSeek, prompt_BxP, max_new_tokens: int,
             sampling: Sampling = Sampling(), seed: int = 0,
             stop_token: int | None = None) -> np.ndarray:
    """All new tokens at once, [B, N] (N < max_new_tokens if every row hit `stop_token`)."""
    tokens = list(Generator(model).stream(prompt_BxP, max_new_tokens, sampling, seed, stop_token))
    prompt_rows = np.asarray(prompt_BxP).reshape(-1, np.shape(prompt_BxP)[-1]).shape[0]
    return np.stack(tokens, axis=1) if tokens else np.zeros((prompt_rows, 0), np.int32)
