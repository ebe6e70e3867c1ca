"""Tokenize a text corpus once into token files (the nanoGPT layout).

    python -m minids_jax.prepare --config configs/tiny.py --out data/stdlib
    python -m minids_jax.prepare --config configs/tiny.py --config.data.source=text \\
        --config.data.path='books/**/*.txt' --config.data.tokenizer=bpe \\
        --config.model.vocab_size=8192 --out data/books

writes OUT/train.bin and OUT/val.bin (flat uint16 tokens, uint32 past 65536 tokens; each document
followed by EOS; val is the last data.val_fraction of the stream), OUT/meta.json (dtype,
tokenizer, special ids, token counts) and, for BPE, OUT/tokenizer.json. Train on them with
    --config.data.source=tokens --config.data.path=OUT
"""

from __future__ import annotations

import json
import os

import numpy as np
from absl import flags

from minids_jax import cli
from minids_jax import workdir as workdir_lib
from minids_jax.config import Config, ConfigError
from minids_jax.data import pipeline as data_lib
from minids_jax.data.tokenization import TOKENIZER_FILE


def prepare(config: Config, out: str) -> dict:
    """Writes the token files of config.data's text corpus into `out`; returns the meta record."""
    data = config.data
    if data.source not in ("builtin", "text"):
        raise ConfigError(
            f"prepare tokenizes text corpora, but data.source={data.source!r}; set data.source to "
            f"'builtin' or 'text' (instruction data is tokenized and cached when training starts).")
    out_dir = workdir_lib.writable_directory(out, "--out")  # before the corpus is read
    corpus = data_lib.read_corpus(data)
    # Never reuse a tokenizer.json left in `out`: it may belong to another corpus.
    tokenizer = data_lib.load_tokenizer(config, None, (corpus.documents, corpus.digest))
    tokens = data_lib.corpus_tokens(corpus, tokenizer, data.cache_dir)
    dtype = data_lib.token_dtype(tokenizer.vocab_size)
    meta = {"dtype": dtype.name, "tokenizer": tokenizer.kind, "vocab_size": tokenizer.vocab_size,
            "pad_id": tokenizer.PAD, "bos_id": tokenizer.BOS, "eos_id": tokenizer.EOS,
            "num_tokens": {}, "max_token": {}, "source": data.source, "path": data.path,
            "documents": len(corpus.documents), "corpus_sha256": corpus.digest}
    for split, split_tokens in data_lib.split_tokens(tokens, data.val_fraction).items():
        name = f"{split}.bin"
        tmp = out_dir / f".{name}.{os.getpid()}.tmp"
        np.asarray(split_tokens, dtype).tofile(tmp)
        os.replace(tmp, out_dir / name)
        meta["num_tokens"][name] = len(split_tokens)
        meta["max_token"][name] = int(split_tokens.max()) if len(split_tokens) else -1
    if tokenizer.kind == "bpe":
        tokenizer.save(out_dir / TOKENIZER_FILE)
    else:
        (out_dir / TOKENIZER_FILE).unlink(missing_ok=True)
    workdir_lib.write_atomic(out_dir / data_lib.META_FILE, json.dumps(meta, indent=2).encode())
    return meta


def main() -> None:
    # Flags are defined here, not at import, so importing `prepare` defines no global flags.
    config_flag = cli.define_config_flag()
    out_flag = flags.DEFINE_string("out", None, "Directory for train.bin, val.bin, meta.json.",
                                   required=True)

    def run(argv):
        del argv
        out = out_flag.value
        meta = prepare(cli.config_from_flag(config_flag), out)
        counts = meta["num_tokens"]
        print(f"{out}: train.bin {counts['train.bin']:,} + val.bin {counts['val.bin']:,} "
              f"{meta['dtype']} tokens ({meta['tokenizer']} tokenizer, {meta['vocab_size']} ids); "
              f"train with --config.data.source=tokens --config.data.path={out}", flush=True)

    cli.run(run)


if __name__ == "__main__":
    main()
