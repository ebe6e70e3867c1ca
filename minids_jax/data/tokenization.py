"""Tokenizers: UTF-8 bytes (the default, nothing to train), byte-level BPE trained locally, and
an imported model's Hugging Face tokenizer.

Each turns a str into an int32 token array and back, and expose `kind`, `vocab_size`, the special
ids `PAD`, `BOS`, `EOS`, and a `fingerprint` that changes whenever the mapping does (it keys the
token caches). BPE is the Hugging Face `tokenizers` implementation: byte-level (every string
encodes, no unknown token) with the GPT-2 pre-tokenization.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
from typing import Iterable, Iterator

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from minids_jax.workdir import write_atomic

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 of a trained BPE tokenizer
BPE_MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # the byte alphabet must fit before any merge
TOKENIZER_FILE = "tokenizer.json"
_CHUNK_CHARS = 1 << 20
_SAFE_CUT = re.compile(r"(?<=\S)\n(?=\S)")


class ByteTokenizer:
    """UTF-8 bytes are tokens 0..255; PAD, BOS, EOS follow."""

    kind = "byte"
    PAD, BOS, EOS = 256, 257, 258
    vocab_size = 259
    fingerprint = "byte-v1"

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [self.encode(text) for text in texts]

    def decode(self, tokens) -> str:
        return bytes(int(t) for t in tokens if 0 <= int(t) < 256).decode("utf-8", errors="replace")


class BpeTokenizer:
    """A byte-level BPE `tokenizers.Tokenizer` with the specials of SPECIAL_TOKENS."""

    kind = "bpe"

    def __init__(self, hf_tokenizer: tokenizers.Tokenizer, origin: str = "a trained tokenizer"):
        ids = [hf_tokenizer.token_to_id(token) for token in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(
                f"{origin} lacks the special tokens {SPECIAL_TOKENS}; it was not made by "
                f"minids_jax: delete it and let the run train a new one.")
        # Text that spells "<eos>" must stay text: only the data pipeline inserts specials.
        hf_tokenizer.encode_special_tokens = True
        self.hf = hf_tokenizer
        self.PAD, self.BOS, self.EOS = ids
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.fingerprint = "bpe-" + hashlib.sha256(hf_tokenizer.to_str().encode()).hexdigest()[:20]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> BpeTokenizer:
        if vocab_size < BPE_MIN_VOCAB:
            raise ValueError(
                f"a BPE vocabulary needs at least {BPE_MIN_VOCAB} tokens, got {vocab_size}.")
        hf = tokenizers.Tokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        hf.train_from_iterator(texts, trainer=trainer)
        return cls(hf)

    @classmethod
    def load(cls, path: str | os.PathLike) -> BpeTokenizer:
        return cls(tokenizers.Tokenizer.from_file(str(path)), origin=str(path))

    def save(self, path: str | os.PathLike) -> None:
        write_atomic(pathlib.Path(path), self.hf.to_str().encode())

    def encode(self, text: str) -> np.ndarray:
        return np.concatenate([np.zeros(0, np.int32)] + self.encode_batch([text]))

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """Encodes in parallel; long texts are cut where it cannot change the tokens."""
        pieces, owners = [], []
        for owner, text in enumerate(texts):
            for piece in safe_chunks(text):
                pieces.append(piece)
                owners.append(owner)
        encoded = self.hf.encode_batch_fast(pieces, add_special_tokens=False)
        out: list[list[np.ndarray]] = [[] for _ in texts]
        for owner, encoding in zip(owners, encoded):
            out[owner].append(np.asarray(encoding.ids, np.int32))
        return [np.concatenate(parts) if parts else np.zeros(0, np.int32) for parts in out]

    def decode(self, tokens) -> str:
        return self.hf.decode([int(t) for t in tokens], skip_special_tokens=True)


class HFTokenizer:
    """An imported model's Hugging Face tokenizer: its `tokenizer.json`, with the BOS/EOS/PAD
    tokens and chat template of its `tokenizer_config.json` (PAD falls back to EOS; the template
    may also be a `chat_template.jinja` beside it, as newer transformers save it)."""

    kind = "hf"
    CONFIG_FILE = "tokenizer_config.json"
    TEMPLATE_FILE = "chat_template.jinja"

    def __init__(self, directory: str | os.PathLike):
        directory = pathlib.Path(directory)
        try:
            self.hf = tokenizers.Tokenizer.from_file(str(directory / TOKENIZER_FILE))
        except Exception as error:  # the library raises a bare Exception for a bad file
            raise ValueError(f"{directory / TOKENIZER_FILE} is not a tokenizer the tokenizers "
                             f"library reads ({str(error)[:200]})") from error
        config_path = directory / self.CONFIG_FILE
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
        if not template and (directory / self.TEMPLATE_FILE).is_file():
            template = (directory / self.TEMPLATE_FILE).read_text()
        self.chat_template = template or None
        # The special tokens by name, as a chat template sees them ({{ bos_token }}, ...).
        self.special_tokens = {}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            token = config.get(name)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                self.special_tokens[name] = token
        ids = {name: self.hf.token_to_id(self.special_tokens[f"{name}_token"])
               if f"{name}_token" in self.special_tokens else None
               for name in ("bos", "eos", "pad")}
        if ids["eos"] is None:
            raise ValueError(f"{config_path} names no eos_token that {directory / TOKENIZER_FILE} "
                             f"knows; generation and the data need one.")
        self.EOS = ids["eos"]
        self.BOS = self.EOS if ids["bos"] is None else ids["bos"]
        self.PAD = self.EOS if ids["pad"] is None else ids["pad"]
        self.special_ids = frozenset(
            i for i, t in self.hf.get_added_tokens_decoder().items() if t.special) | {self.EOS}
        self.vocab_size = self.hf.get_vocab_size()
        digest = hashlib.sha256(self.hf.to_str().encode())
        digest.update(json.dumps([ids, self.chat_template]).encode())
        self.fingerprint = "hf-" + digest.hexdigest()[:20]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.hf.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32)
                for e in self.hf.encode_batch_fast(texts, add_special_tokens=False)]

    def decode(self, tokens) -> str:
        return self.hf.decode([int(t) for t in tokens], skip_special_tokens=True)


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def safe_chunks(text: str) -> Iterator[str]:
    """Pieces of about _CHUNK_CHARS, cut after a newline with non-space on both sides.

    The byte-level pre-tokenizer makes such a newline a pre-token of its own, so encoding the pieces
    separately gives exactly the tokens of the whole, while letting one huge file use all cores.
    """
    start = 0
    while len(text) - start > _CHUNK_CHARS:
        cut = _SAFE_CUT.search(text, start + _CHUNK_CHARS)
        if cut is None:
            break
        yield text[start:cut.end()]
        start = cut.end()
    yield text[start:]
