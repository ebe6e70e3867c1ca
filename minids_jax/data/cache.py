"""A content-addressed cache of arrays (tokenized corpora, tokenized examples, trained
tokenizers) under data.cache_dir: written once, atomically, and memory-mapped on later calls."""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil
from typing import Callable

import numpy as np
from absl import logging

CACHE_VERSION = 1  # bump when the cached layout or the tokenization recipe changes


def cache_entry(cache_dir: str, kind: str, key: dict) -> pathlib.Path | None:
    """Where the `kind` artifact for `key` lives under cache_dir (None: caching is off).

    `key` must hold everything the artifact depends on (content digest, tokenizer fingerprint).
    """
    if not cache_dir:
        return None
    digest = hashlib.sha256(json.dumps({**key, "v": CACHE_VERSION}, sort_keys=True).encode())
    return pathlib.Path(cache_dir).expanduser() / f"{kind}-{digest.hexdigest()[:24]}"


def cached(cache_dir: str, kind: str, key: dict, build: Callable[[], dict[str, np.ndarray]]):
    """`build()`'s arrays, stored once under cache_dir and memory-mapped on later calls."""
    entry = cache_entry(cache_dir, kind, key)
    if entry is None:
        return build()
    if not entry.is_dir():
        arrays = build()
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name, array in arrays.items():
                np.save(tmp / f"{name}.npy", array)
            (tmp / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
        except OSError as error:  # a full or read-only disk costs speed, not the run
            logging.warning("could not cache %s in %s (%s); set data.cache_dir to a writable "
                            "directory to tokenize only once.", kind, cache_dir, error)
            shutil.rmtree(tmp, ignore_errors=True)
            return arrays
        try:
            os.rename(tmp, entry)  # atomic; another process may have won the race
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
        logging.info("cached %s at %s", kind, entry)
    return {p.stem: np.load(p, mmap_mode="r") for p in entry.glob("*.npy")}
