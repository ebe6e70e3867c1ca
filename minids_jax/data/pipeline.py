"""The data of a run: its tokenizer and its token source, built from the `data` config.

    source = make_source(config, workdir)          # batches: see sources.py
    tokenizer = load_tokenizer(config, workdir)    # encode(str) -> int32 array, decode(tokens)

Text is tokenized once and cached under data.cache_dir, keyed by the corpus content and the
tokenizer. A BPE tokenizer is trained on the corpus the first time (also cached) and saved as
<workdir>/tokenizer.json, which resumed runs, evaluation and generation then load.
"""

from __future__ import annotations

import json
import pathlib

import numpy as np
from absl import logging

from minids_jax.config import Config, ConfigError, DataConfig
from minids_jax.data.cache import cache_entry, cached
from minids_jax.data.corpus import (
    DataError,
    TextCorpus,
    builtin_corpus_files,
    read_text_corpus,
    text_files,
)
from minids_jax.data.instructions import (
    Example,
    fit_examples,
    held_out,
    read_instructions,
    tokenize_examples,
)
from minids_jax.data.sources import (
    InstructionSource,
    RandomSource,
    TokenSource,
    WindowSource,
)
from minids_jax.data.tokenization import (
    TOKENIZER_FILE,
    BpeTokenizer,
    ByteTokenizer,
    HFTokenizer,
    token_dtype,
)
from minids_jax.workdir import write_atomic

Tokenizer = ByteTokenizer | BpeTokenizer | HFTokenizer
META_FILE = "meta.json"  # beside token .bin files: dtype, tokenizer, counts (see prepare.py)
INSTRUCTION_SOURCES = ("jsonl", "json")
_ENCODE_BATCH_CHARS = 8 << 20  # encode this much text per call: bounds the tokenizer's memory


# ----------------------------------------------------------------------------- text corpora


def read_corpus(data: DataConfig) -> TextCorpus:
    if data.source == "builtin":
        # The standard library's tests hold a few deliberately non-UTF-8 files.
        return read_text_corpus(builtin_corpus_files(), "the builtin corpus", data.max_bytes,
                                expect_skips=True)
    return read_text_corpus(text_files(data.path), f"data.path={data.path!r}", data.max_bytes)


def corpus_tokens(corpus: TextCorpus, tokenizer: Tokenizer, cache_dir: str) -> np.ndarray:
    """The corpus as one token stream, each document followed by EOS; cached."""

    def build():
        pieces, batch, chars = [], [], 0
        for i, document in enumerate(corpus.documents):
            batch.append(document)
            chars += len(document)
            if chars >= _ENCODE_BATCH_CHARS or i == len(corpus.documents) - 1:
                for tokens in tokenizer.encode_batch(batch):
                    pieces += [tokens, np.array([tokenizer.EOS])]
                batch, chars = [], 0
        return {"tokens": np.concatenate(pieces).astype(token_dtype(tokenizer.vocab_size))}

    key = {"corpus": corpus.digest, "tokenizer": tokenizer.fingerprint}
    return cached(cache_dir, "tokens", key, build)["tokens"]


def split_tokens(tokens: np.ndarray, val_fraction: float) -> dict[str, np.ndarray]:
    """A fixed held-out split: the last `val_fraction` of the stream."""
    boundary = int(len(tokens) * (1 - val_fraction))
    return {"train": tokens[:boundary], "val": tokens[boundary:]}


# ------------------------------------------------------------------------ token .bin files


def _tokens_meta(path: pathlib.Path) -> dict:
    meta_file = (path if path.is_dir() else path.parent) / META_FILE
    return json.loads(meta_file.read_text()) if meta_file.is_file() else {}


def _check_token_file(file: pathlib.Path, dtype: np.dtype, vocab_size: int, meta: dict):
    size = file.stat().st_size
    if size % dtype.itemsize:
        raise DataError(
            f"{file} is {size} bytes, not a multiple of {dtype.itemsize} ({dtype.name}): it is "
            f"truncated or holds another dtype; set data.token_dtype to the dtype it was written "
            f"with, or write it again with `python -m minids_jax.prepare`.")
    if size == 0:
        raise DataError(f"the corpus {file} is empty (0 tokens); write it again with "
                        f"`python -m minids_jax.prepare` or point data.path at another file.")
    tokens = np.memmap(file, dtype=dtype, mode="r")
    recorded = meta.get("max_token", {}).get(file.name)
    if recorded is not None and meta.get("num_tokens", {}).get(file.name) == len(tokens):
        top = recorded
    else:  # no trustworthy record: scan in chunks, never the whole file in memory
        top = max(int(tokens[i:i + (1 << 26)].max()) for i in range(0, len(tokens), 1 << 26))
    if top >= vocab_size:
        raise DataError(
            f"{file} holds token id {top}, but model.vocab_size={vocab_size} allows ids up to "
            f"{vocab_size - 1}; set model.vocab_size >= {top + 1}, or check data.token_dtype "
            f"({dtype.name}) matches how the file was written.")
    return tokens


def token_file_splits(data: DataConfig, vocab_size: int) -> dict[str, np.ndarray]:
    """Memory-maps `train.bin`/`val.bin` of a directory, or splits the tail off one .bin file."""
    path = pathlib.Path(data.path).expanduser()
    if not path.exists():
        raise DataError(f"data.path={data.path!r} does not exist; point it at a .bin token file or "
                        f"a directory written by `python -m minids_jax.prepare`.")
    meta = _tokens_meta(path)
    auto = data.token_dtype == "auto"
    dtype = np.dtype(meta.get("dtype", "uint16") if auto else data.token_dtype)
    if path.is_dir():
        missing = [name for name in ("train.bin", "val.bin") if not (path / name).is_file()]
        if missing:
            raise DataError(
                f"{path} has no {' or '.join(missing)}; write them with `python -m "
                f"minids_jax.prepare --out {path}`, or point data.path at one .bin file.")
        return {split: _check_token_file(path / f"{split}.bin", dtype, vocab_size, meta)
                for split in ("train", "val")}
    return split_tokens(_check_token_file(path, dtype, vocab_size, meta), data.val_fraction)


# ------------------------------------------------------------------------------- tokenizer


def _training_texts(config: Config):
    data = config.data
    if data.source in INSTRUCTION_SOURCES:
        examples, digest = read_instructions(data.path, data.source)
        return [e.text for e in examples], digest
    corpus = read_corpus(data)
    return corpus.documents, corpus.digest


def _train_bpe(config: Config, texts: list[str], digest: str) -> BpeTokenizer:
    data, vocab_size = config.data, config.model.vocab_size
    if data.bpe_train_bytes:
        kept, total = [], 0
        for text in texts:
            if total >= data.bpe_train_bytes:
                break
            kept.append(text[:data.bpe_train_bytes - total])
            total += len(kept[-1])
        texts = kept

    key = {"corpus": digest, "vocab_size": vocab_size, "bpe_train_bytes": data.bpe_train_bytes}
    entry = cache_entry(data.cache_dir, "bpe", key)
    if entry is not None and (entry / TOKENIZER_FILE).is_file():
        return BpeTokenizer.load(entry / TOKENIZER_FILE)
    logging.info("training a BPE tokenizer of %d tokens on %.1f MB of text", vocab_size,
                 sum(map(len, texts)) / 1e6)
    tokenizer = BpeTokenizer.train(texts, vocab_size)
    if entry is not None:
        try:
            tokenizer.save(entry / TOKENIZER_FILE)
        except OSError as error:  # only speed is lost
            logging.warning("could not cache the tokenizer in %s (%s)", entry, error)
    return tokenizer


def load_tokenizer(config: Config, workdir: str | None = None, _corpus=None) -> Tokenizer:
    """The run's tokenizer: bytes, or BPE (from the workdir, else trained and saved there).

    `_corpus` is (texts, digest) of the corpus when the caller has already read it.
    """
    data = config.data
    if data.source == "tokens":
        meta = _tokens_meta(pathlib.Path(data.path).expanduser())
        made_with = meta.get("tokenizer", data.tokenizer)
        if made_with != data.tokenizer:
            raise ConfigError(
                f"data.tokenizer={data.tokenizer!r}, but the tokens at data.path={data.path!r} "
                f"were made with the {made_with!r} tokenizer (see its {META_FILE}); set "
                f"data.tokenizer={made_with!r}.")
    saved = pathlib.Path(workdir) / TOKENIZER_FILE if workdir else None
    if data.tokenizer == "hf":
        return _imported_tokenizer(config, workdir)
    if data.tokenizer == "byte":
        if saved is not None and saved.is_file():
            raise ConfigError(
                f"data.tokenizer='byte', but {saved} holds the BPE tokenizer this run was "
                f"trained with; set data.tokenizer='bpe', or use a fresh workdir.")
        return ByteTokenizer()
    if saved is not None and saved.is_file():
        tokenizer = BpeTokenizer.load(saved)
    elif data.source == "tokens":
        path = pathlib.Path(data.path).expanduser()
        beside = (path if path.is_dir() else path.parent) / TOKENIZER_FILE
        if not beside.is_file():
            raise DataError(f"data.tokenizer='bpe' with data.source='tokens' needs the tokenizer "
                            f"the tokens were made with, but {beside} does not exist; copy the "
                            f"{TOKENIZER_FILE} written by `python -m minids_jax.prepare` there.")
        tokenizer = BpeTokenizer.load(beside)
    else:
        tokenizer = _train_bpe(config, *(_corpus or _training_texts(config)))
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(
            f"the BPE tokenizer {saved or ''} has {tokenizer.vocab_size} tokens but "
            f"model.vocab_size={config.model.vocab_size}; set model.vocab_size >= "
            f"{tokenizer.vocab_size} (or use a fresh workdir to train a smaller tokenizer).")
    if saved is not None and not saved.is_file():
        tokenizer.save(saved)
    return tokenizer


def _imported_tokenizer(config: Config, workdir: str | None) -> HFTokenizer:
    """The Hugging Face tokenizer of the workdir, else of checkpoint.init_from's run (then
    copied into the workdir, so the run keeps it)."""
    places = [pathlib.Path(workdir)] if workdir else []
    if config.checkpoint.init_from:
        origin = pathlib.Path(config.checkpoint.init_from).expanduser()
        places += [origin, origin.parent, origin.parent.parent]  # a workdir or a step's dir
    found = next((place for place in places if (place / TOKENIZER_FILE).is_file()), None)
    if found is None:
        raise ConfigError(
            f"data.tokenizer='hf' uses the tokenizer.json of an imported model, but none is in "
            f"{' or '.join(str(p) for p in places) or 'the workdir (none given)'}; import the "
            f"model with `python -m minids_jax.hf import`, or use data.tokenizer='byte'/'bpe'.")
    try:
        tokenizer = HFTokenizer(found)
    except (ValueError, OSError) as error:  # (JSONDecodeError is a ValueError)
        raise DataError(f"the tokenizer in {found} cannot be read: {error}") from error
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"the tokenizer in {found} has {tokenizer.vocab_size} tokens but "
                          f"model.vocab_size={config.model.vocab_size}.")
    if workdir and found != pathlib.Path(workdir):
        for name in (TOKENIZER_FILE, HFTokenizer.CONFIG_FILE, HFTokenizer.TEMPLATE_FILE):
            if (found / name).is_file():
                write_atomic(pathlib.Path(workdir) / name, (found / name).read_bytes())
    return tokenizer


# ---------------------------------------------------------------------------------- source


def make_source(config: Config, workdir: str | None = None) -> TokenSource:
    """The token source of config.data, with the run's tokenizer (saved into `workdir`)."""
    model, data, seed = config.model, config.data, config.train.seed
    if data.source == "random":
        return RandomSource(model.vocab_size, model.max_seq_len, seed)
    if data.source == "tokens":
        splits = token_file_splits(data, model.vocab_size)
        tokenizer = load_tokenizer(config, workdir)
        return WindowSource(splits, model.max_seq_len, seed, f"data.path={data.path!r}",
                            tokenizer.EOS if data.doc_mask else None)
    if data.source in INSTRUCTION_SOURCES:
        examples, digest = read_instructions(data.path, data.source)
        texts = [e.text for e in examples]
        tokenizer = load_tokenizer(config, workdir, (texts, digest))
        tokenized = tokenize_examples(examples, digest, tokenizer, data.cache_dir)
        is_val = held_out(examples, data.val_fraction, data.path)
        splits = {split: fit_examples(tokenized, chosen, examples, model.max_seq_len,
                                      data.overlong, split)
                  for split, chosen in (("train", ~is_val), ("val", is_val))}
        alpaca = sum(isinstance(example, Example) for example in examples)
        source = InstructionSource(splits, model.max_seq_len, seed, tokenizer.PAD, data.pack,
                                   data.doc_mask, {"alpaca": alpaca, "chat": len(examples) - alpaca})
        logging.info("%s: %d train / %d val examples in %d / %d rows (%.0f%% tokens, rest padding)",
                     data.path, len(splits["train"]), len(splits["val"]),
                     len(source.rows["train"]), len(source.rows["val"]), 100 * source.fill("train"))
        return source
    corpus = read_corpus(data)
    tokenizer = load_tokenizer(config, workdir, (corpus.documents, corpus.digest))
    tokens = corpus_tokens(corpus, tokenizer, data.cache_dir)
    logging.info("%s: %d tokens (%s tokenizer, %.2f bytes/token)", corpus.name, len(tokens),
                 tokenizer.kind, sum(len(d.encode()) for d in corpus.documents) / len(tokens))
    return WindowSource(split_tokens(tokens, data.val_fraction), model.max_seq_len, seed,
                        corpus.name, tokenizer.EOS if data.doc_mask else None)
