"""Instruction data: records with `instruction`, `input`, `output` -> tokenized examples.

Each example is [BOS] prompt output [EOS], the prompt being `format_prompt(instruction, input)`;
only the output and EOS are scored. Also here: the held-out split and fitting to the context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
from absl import logging

from minids_jax.corpus import DataError, cached, content_digest
from minids_jax.sources import TokenizedExamples
from minids_jax.tokenization import token_dtype


@dataclasses.dataclass(frozen=True)
class Example:
    """One instruction record: the model learns `output` given `prompt`."""

    prompt: str
    output: str
    where: str  # e.g. "train.jsonl line 7", for messages


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (the field's name)
    """The prompt template of instruction data (Alpaca's); generation should use it too."""
    prompt = f"### Instruction:\n{instruction}\n\n"
    if input:
        prompt += f"### Input:\n{input}\n\n"
    return prompt + "### Response:\n"


def _example(record, where: str) -> Example:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction', 'input' (optional) "
                        f"and 'output', got {type(record).__name__}.")
    for field, required in (("instruction", True), ("input", False), ("output", True)):
        if required and field not in record:
            raise DataError(
                f"{where} has no {field!r} field (it has {sorted(record)}); every record needs "
                f"'instruction' and 'output' strings, e.g. "
                f'{{"instruction": "Add the numbers.", "input": "2 3", "output": "5"}}.')
        if field in record and not isinstance(record[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got "
                            f"{type(record[field]).__name__}; convert it to text.")
    return Example(format_prompt(record["instruction"], record.get("input", "")),
                   record["output"], where)


def read_instructions(path: str, fmt: str) -> tuple[list[Example], str]:
    """Records of a JSONL file (one object a line) or a JSON file (an array of objects)."""
    file = pathlib.Path(path).expanduser()
    if not file.is_file():
        raise DataError(f"data.path={path!r} is not a file; for data.source={fmt!r} point it at "
                        f"one {'JSON Lines' if fmt == 'jsonl' else 'JSON'} file.")
    raw = file.read_bytes()
    try:
        text = raw.decode("utf-8-sig")  # tolerate the byte-order mark some editors write
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{file} line {line} is not UTF-8; save the file as UTF-8.") from None
    examples = []
    if fmt == "jsonl":
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise DataError(f"{file} line {number} is not valid JSON ({error.msg}, column "
                                f"{error.colno}); each line must hold one JSON object.") from None
            examples.append(_example(record, f"{file} line {number}"))
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(
                f"{file} line {error.lineno} is not valid JSON ({error.msg}, column "
                f"{error.colno}); for one object per line use data.source='jsonl'.") from None
        if not isinstance(records, list):
            raise DataError(f"{file} holds a JSON {type(records).__name__}; data.source='json' "
                            f"expects an array of objects [{{...}}, ...].")
        examples = [_example(record, f"{file} record {index}")
                    for index, record in enumerate(records)]
    if not examples:
        raise DataError(f"the corpus {file} is empty: it holds no records; add records or point "
                        f"data.path at another file.")
    return examples, content_digest([text])


def tokenize_examples(examples: list[Example], digest: str, tokenizer,
                      cache_dir: str) -> TokenizedExamples:
    """Each example as [BOS] prompt output [EOS], with its prompt length; cached."""

    def build():
        prompts = tokenizer.encode_batch([e.prompt for e in examples])
        outputs = tokenizer.encode_batch([e.output for e in examples])
        pieces, lengths, prompt_lens = [], [], []
        for prompt, output in zip(prompts, outputs):
            pieces += [[tokenizer.BOS], prompt, output, [tokenizer.EOS]]
            lengths.append(len(prompt) + len(output) + 2)
            prompt_lens.append(len(prompt) + 1)
        return {"tokens": np.concatenate(pieces).astype(token_dtype(tokenizer.vocab_size)),
                "starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                "prompt_lens": np.asarray(prompt_lens, np.int64)}

    key = {"examples": digest, "tokenizer": tokenizer.fingerprint}
    arrays = cached(cache_dir, "examples", key, build)
    return TokenizedExamples(arrays["tokens"], arrays["starts"], arrays["prompt_lens"])


def held_out(examples: list[Example], val_fraction: float, name: str) -> np.ndarray:
    """Whether each example is held out: those with the smallest content hashes.

    The split depends on neither the seed nor the file order, and stays put as records are added.
    """
    if len(examples) < 2:
        raise DataError(f"{name} holds {len(examples)} example; "
                        f"at least 2 are needed (one is held out for evaluation).")
    hashes = [hashlib.sha256(f"{e.prompt}\0{e.output}".encode()).digest() for e in examples]
    n_val = max(1, round(len(examples) * val_fraction))
    is_val = np.zeros(len(examples), bool)
    is_val[sorted(range(len(examples)), key=hashes.__getitem__)[:n_val]] = True
    return is_val


def fit_examples(all_examples: TokenizedExamples, chosen: np.ndarray, examples: list[Example],
                 seq_len: int, overlong: str, split: str) -> TokenizedExamples:
    """The chosen examples, each cut to seq_len + 1 tokens (or dropped, per data.overlong).

    An example whose prompt leaves no room for a single output token is always dropped.
    """
    pieces, lengths, prompt_lens, dropped, cut = [], [], [], [], 0
    for i in np.flatnonzero(chosen):
        length, prompt_len = all_examples.length(i), int(all_examples.prompt_lens[i])
        if length > seq_len + 1:
            if overlong == "drop" or prompt_len > seq_len:
                dropped.append((i, prompt_len))
                continue
            length, cut = seq_len + 1, cut + 1
        start = all_examples.starts[i]
        pieces.append(all_examples.tokens[start:start + length])
        lengths.append(length)
        prompt_lens.append(prompt_len)
    if cut:
        logging.warning("%d %s example(s) longer than model.max_seq_len+1=%d tokens: their output "
                        "is cut to fit (data.overlong='truncate').", cut, split, seq_len + 1)
    if dropped:
        logging.warning("dropped %d %s example(s) longer than model.max_seq_len+1=%d tokens, "
                        "e.g. %s", len(dropped), split, seq_len + 1,
                        ", ".join(examples[i].where for i, _ in dropped[:3]))
    if not lengths:
        i, prompt_len = dropped[0]
        fix = ("shorten the prompts" if prompt_len > seq_len else "set data.overlong='truncate'")
        raise DataError(
            f"every {split} example is longer than model.max_seq_len+1={seq_len + 1} tokens, "
            f"e.g. {examples[i].where} (BOS and prompt alone: {prompt_len} tokens); raise "
            f"model.max_seq_len or {fix}.")
    return TokenizedExamples(np.concatenate(pieces), np.concatenate([[0], np.cumsum(lengths)]),
                             np.asarray(prompt_lens))
