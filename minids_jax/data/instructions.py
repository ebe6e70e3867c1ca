"""Instruction data: alpaca and chat records of a JSONL/JSON file -> tokenized examples.

An alpaca record (`instruction`, `input`, `output`) becomes [BOS] prompt output [EOS], the prompt
being `format_prompt(instruction, input)`; only the output and EOS are scored. A chat record
(ShareGPT `conversations` or OpenAI `messages`, told apart record by record) is laid out by a
chat template (chat.py); only its assistant turns, and the token ending each, are scored. Also
here: the held-out split and fitting to the context.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib

import numpy as np
from absl import logging

from minids_jax.data import chat
from minids_jax.data.cache import cached
from minids_jax.data.corpus import DataError, content_digest
from minids_jax.data.tokenization import token_dtype

LAYOUT = "scored-v2"  # of the cached arrays: tokens, starts and a score per token


@dataclasses.dataclass(frozen=True)
class Example:
    """One instruction record: the model learns `output` given `prompt`."""

    prompt: str
    output: str
    where: str  # e.g. "train.jsonl line 7", for messages

    @property
    def text(self) -> str:
        return self.prompt + self.output

    @property
    def key(self) -> str:
        return f"{self.prompt}\0{self.output}"

    def segments(self, tokenizer) -> list[chat.Segment]:
        return [(tokenizer.BOS, False), (self.prompt, False), (self.output, True),
                (tokenizer.EOS, True)]


@dataclasses.dataclass(frozen=True)
class TokenizedExamples:
    """Instruction and chat examples as one flat token array: example i is
    tokens[starts[i]:starts[i+1]], and `scored` marks the tokens that count toward the loss:
    outputs and answers, and the token ending each (not BOS, prompts, user turns, scaffolding).
    An alpaca example is [BOS] prompt output [EOS], scored from its output on; a conversation
    has one scored segment per assistant turn.
    """

    tokens: np.ndarray
    starts: np.ndarray  # [N + 1]
    scored: np.ndarray  # bool, one per token

    def __len__(self) -> int:
        return len(self.starts) - 1

    def length(self, i: int) -> int:
        return int(self.starts[i + 1] - self.starts[i])

    def first_scored(self, i: int) -> int:
        """How many tokens of example i come before its first scored one (its length if none)."""
        scored = self.scored[self.starts[i]:self.starts[i + 1]]
        return int(np.argmax(scored)) if scored.any() else len(scored)


def format_prompt(instruction: str, input: str = "") -> str:  # noqa: A002 (the field's name)
    """The prompt template of instruction data (Alpaca's); generation should use it too."""
    prompt = f"### Instruction:\n{instruction}\n\n"
    if input:
        prompt += f"### Input:\n{input}\n\n"
    return prompt + "### Response:\n"


def _example(record, where: str) -> Example | chat.Conversation:
    if chat.is_chat(record):
        return chat.conversation(record, where)
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with 'instruction', 'input' (optional) "
                        f"and 'output', or a chat record with 'messages' or 'conversations', "
                        f"got {type(record).__name__}.")
    for field, required in (("instruction", True), ("input", False), ("output", True)):
        if required and field not in record:
            raise DataError(
                f"{where} has no {field!r} field (it has {sorted(record)}); every record needs "
                f"'instruction' and 'output' strings, e.g. "
                f'{{"instruction": "Add the numbers.", "input": "2 3", "output": "5"}}, or is a '
                f'chat record: {{"messages": [{{"role": "user", "content": ...}}, ...]}}.')
        if field in record and not isinstance(record[field], str):
            raise DataError(f"{where}: field {field!r} must be a string, got "
                            f"{type(record[field]).__name__}; convert it to text.")
    return Example(format_prompt(record["instruction"], record.get("input", "")),
                   record["output"], where)


def read_instructions(path: str, fmt: str) -> tuple[list[Example | chat.Conversation], str]:
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


def tokenize_examples(examples: list, digest: str, tokenizer, cache_dir: str) -> TokenizedExamples:
    """Each example's tokens and which of them are scored; cached."""
    has_chat = any(isinstance(e, chat.Conversation) for e in examples)

    def build():
        try:
            template = chat.template_for(tokenizer) if has_chat else None
        except chat.TemplateError as error:
            raise DataError(f"{error}; chat records need a template that renders.") from None
        segments = []
        for example in examples:
            try:
                segments.append(example.segments(tokenizer) if isinstance(example, Example)
                                else template.segments(example.messages))
            except chat.TemplateError as error:
                raise DataError(f"{example.where}: {error}") from None
        encoded = chat.encode_segments(tokenizer, segments)
        lengths = [len(tokens) for tokens, _ in encoded]
        return {"tokens": np.concatenate([t for t, _ in encoded]).astype(
                    token_dtype(tokenizer.vocab_size)),
                "starts": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
                "scored": np.concatenate([s for _, s in encoded])}

    # (The template itself is part of the tokenizer's fingerprint.)
    layout = f"{LAYOUT}/{chat.template_kind(tokenizer) if has_chat else 'alpaca'}"
    key = {"examples": digest, "tokenizer": tokenizer.fingerprint, "layout": layout}
    arrays = cached(cache_dir, "examples", key, build)
    return TokenizedExamples(arrays["tokens"], arrays["starts"], arrays["scored"])


def held_out(examples: list, val_fraction: float, name: str) -> np.ndarray:
    """Whether each example is held out: those with the smallest content hashes.

    The split depends on neither the seed nor the file order, and stays put as records are added.
    """
    if len(examples) < 2:
        raise DataError(f"{name} holds {len(examples)} example; "
                        f"at least 2 are needed (one is held out for evaluation).")
    hashes = [hashlib.sha256(e.key.encode()).digest() for e in examples]
    n_val = max(1, round(len(examples) * val_fraction))
    is_val = np.zeros(len(examples), bool)
    is_val[sorted(range(len(examples)), key=hashes.__getitem__)[:n_val]] = True
    return is_val


def fit_examples(all_examples: TokenizedExamples, chosen: np.ndarray, examples: list,
                 seq_len: int, overlong: str, split: str) -> TokenizedExamples:
    """The chosen examples, each cut to seq_len + 1 tokens (or dropped, per data.overlong).

    An example left without a scored token (its prompt fills the context) is always dropped.
    """
    pieces, scores, lengths, dropped, cut = [], [], [], [], 0
    for i in np.flatnonzero(chosen):
        start, length = all_examples.starts[i], all_examples.length(i)
        kept = min(length, seq_len + 1)
        scored = all_examples.scored[start:start + kept]
        # (Token 0 is never a target: a score there would count for nothing.)
        if (length > kept and overlong == "drop") or not scored[1:].any():
            dropped.append(i)
            continue
        cut += length > kept
        pieces.append(all_examples.tokens[start:start + kept])
        scores.append(scored)
        lengths.append(kept)
    if cut:
        logging.warning("%d %s example(s) longer than model.max_seq_len+1=%d tokens: their end "
                        "is cut to fit (data.overlong='truncate').", cut, split, seq_len + 1)
    if dropped:
        logging.warning("dropped %d %s example(s) longer than model.max_seq_len+1=%d tokens (or "
                        "with no answer token in them), e.g. %s", len(dropped), split, seq_len + 1,
                        ", ".join(examples[i].where for i in dropped[:3]))
    if not lengths:
        i = dropped[0]
        prompt_len = all_examples.first_scored(i)
        if prompt_len >= all_examples.length(i):
            raise DataError(f"no {split} example has a token to score, e.g. {examples[i].where}; "
                            f"give its assistant turns some text.")
        fix = "shorten the prompts" if prompt_len > seq_len else "set data.overlong='truncate'"
        raise DataError(
            f"every {split} example is longer than model.max_seq_len+1={seq_len + 1} tokens, "
            f"e.g. {examples[i].where} (BOS and prompt alone, before its first answer: "
            f"{prompt_len} tokens); raise model.max_seq_len or {fix}.")
    return TokenizedExamples(np.concatenate(pieces), np.concatenate([[0], np.cumsum(lengths)]),
                             np.concatenate(scores))
