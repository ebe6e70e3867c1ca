"""Tokens in: text corpora, token files, instruction and chat data, and their tokenizers;
numpy only, never JAX and never the model. A run's tokenizer and batches come from
`load_tokenizer` and `make_source` (pipeline.py)."""

from minids_jax.data.corpus import DataError
from minids_jax.data.pipeline import Tokenizer, load_tokenizer, make_source

__all__ = ["DataError", "Tokenizer", "load_tokenizer", "make_source"]
