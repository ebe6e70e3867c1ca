"""Token sources, the byte-level tokenizer, and the deterministic batch sampler.

A batch is a dict of int32/float32 numpy arrays, each [B, L]:
  inputs   tokens 0..L-1 of each window
  targets  tokens 1..L (the next token at every position)
  weights  1.0 where the target counts toward the loss
The batch of step s is a pure function of (seed, s, split), so a resumed run sees exactly the
batches it would have seen, and each process can build only its own rows.
"""

from __future__ import annotations

import pathlib
import sysconfig
from typing import Protocol

import numpy as np

from minids_jax.config import Config, ConfigError


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; specials follow."""

    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint16)

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens if int(t) < 256).decode("utf-8", errors="replace")


class TokenSource(Protocol):
    def batch(self, step: int, batch_size: int, rows: slice, split: str) -> dict[str, np.ndarray]:
        ...


def _rng(seed: int, step: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, step, {"train": 0, "val": 1}[split]])


def _as_batch(windows_BxL1: np.ndarray) -> dict[str, np.ndarray]:
    windows_BxL1 = windows_BxL1.astype(np.int32)
    return {
        "inputs": windows_BxL1[:, :-1],
        "targets": windows_BxL1[:, 1:],
        "weights": np.ones(windows_BxL1[:, 1:].shape, np.float32),
    }


class RandomSource:
    """The seed's data: uniform random tokens. Nothing to learn; loss stays near ln(vocab)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def batch(self, step, batch_size, rows=slice(None), split="train"):
        windows = _rng(self.seed, step, split).integers(
            0, self.vocab_size, (batch_size, self.seq_len + 1), dtype=np.int32)
        return _as_batch(windows[rows])


class WindowSource:
    """Random windows of L+1 tokens out of one long token array per split."""

    def __init__(self, splits: dict[str, np.ndarray], seq_len: int, seed: int, name: str):
        for split, tokens in splits.items():
            if len(tokens) < seq_len + 2:
                raise ConfigError(
                    f"the {split} split of {name} has {len(tokens)} tokens, fewer than one "
                    f"sequence of model.max_seq_len+1={seq_len + 1}; use more data or lower "
                    f"model.max_seq_len.")
        self.splits, self.seq_len, self.seed = splits, seq_len, seed

    def batch(self, step, batch_size, rows=slice(None), split="train"):
        tokens = self.splits[split]
        starts = _rng(self.seed, step, split).integers(
            0, len(tokens) - self.seq_len - 1, batch_size)[rows]
        windows = np.stack([tokens[s:s + self.seq_len + 1] for s in starts])
        return _as_batch(windows)


def builtin_corpus_files() -> list[pathlib.Path]:
    """The running interpreter's standard-library sources, in a fixed (sorted) order."""
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in stdlib.rglob("*.py")
                  if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def builtin_tokens(max_bytes: int = 0) -> np.ndarray:
    """Byte tokens of the standard library, each file followed by EOS."""
    tokenizer, pieces, total = ByteTokenizer(), [], 0
    for path in builtin_corpus_files():
        data = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16)
        pieces += [data, np.array([tokenizer.EOS], np.uint16)]
        total += len(data) + 1
        if max_bytes and total >= max_bytes:
            break
    tokens = np.concatenate(pieces)
    return tokens[:max_bytes] if max_bytes else tokens


def split_tokens(tokens: np.ndarray, val_fraction: float) -> dict[str, np.ndarray]:
    """A fixed held-out split: the last `val_fraction` of the stream."""
    boundary = int(len(tokens) * (1 - val_fraction))
    return {"train": tokens[:boundary], "val": tokens[boundary:]}


def make_source(config: Config) -> TokenSource:
    model, data = config.model, config.data
    if data.source == "random":
        return RandomSource(model.vocab_size, model.max_seq_len, config.train.seed)
    if model.vocab_size < ByteTokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={model.vocab_size} is smaller than the byte tokenizer's "
            f"{ByteTokenizer.vocab_size} tokens; set model.vocab_size >= {ByteTokenizer.vocab_size}.")
    splits = split_tokens(builtin_tokens(data.max_bytes), data.val_fraction)
    return WindowSource(splits, model.max_seq_len, config.train.seed, "the builtin corpus")


def load_tokenizer(config: Config, workdir: str | None = None) -> ByteTokenizer:
    """The tokenizer of a run (the byte-level one; other kinds are saved in the workdir)."""
    del config, workdir
    return ByteTokenizer()
