"""Token sources and the deterministic sampler.

A batch is a dict of numpy arrays, each [R, L] for the R rows this process holds:
  inputs   int32 tokens 0..L-1 of each row
  targets  int32 tokens 1..L (the next token at every position)
  weights  float32, 1.0 where the target counts toward the loss (0 for padding and prompts)
With document masking (data.doc_mask) also
  segments  int32 document number of each input token in its row (0, 1, ...)
  positions int32 each input token's position in its document (restarting at 0)
and a target in another document than its input (the next one's first token) does not count.
Row r of the batch of step s is a pure function of (seed, split, s, r): a resumed run sees exactly
the batches it would have seen, on any number of processes and devices, and each process builds
only its own rows. Shapes: B global batch, R rows of this process, L max_seq_len, L1 = L + 1.
"""

from __future__ import annotations

import bisect
from typing import Protocol

import numpy as np

from minids_jax.data.corpus import DataError
from minids_jax.data.instructions import TokenizedExamples

_SPLITS = {"train": 0, "val": 1}


class TokenSource(Protocol):
    def batch(self, step: int, batch_size: int, rows: slice, split: str) -> dict[str, np.ndarray]:
        ...


def _uniform(seed: int, split: str, step: int, first: int, count: int, high: int) -> np.ndarray:
    """Draws first..first+count-1 of the stream for (seed, split, step), uniform in [0, high).

    Philox is counter-based: skipping to draw `first` costs nothing, so a process draws only
    what its own rows need and still gets exactly the numbers of the whole batch.
    """
    key = (seed % 2**64) << 64 | _SPLITS[split] << 62 | (step % 2**62)
    bits = np.random.Philox(key=key)
    bits.advance(first // 4)  # counts Philox blocks, of 4 draws each
    raw = bits.random_raw(first % 4 + count)[first % 4:]
    return ((raw >> np.uint64(11)).astype(np.float64) * 2.0**-53 * high).astype(np.int64)


def _row_range(batch_size: int, rows: slice) -> range:
    r = range(batch_size)[rows]
    if r.step != 1:
        raise ValueError(f"rows={rows} must be a contiguous slice of the batch (step 1).")
    return r


def as_batch(rows_RxL1: np.ndarray, weights_RxL1: np.ndarray | None = None,
             segments_RxL1: np.ndarray | None = None):
    """The batch of rows of L+1 tokens; with `segments_RxL1` (each token's document number,
    nondecreasing along a row), document masked."""
    rows_RxL1 = np.asarray(rows_RxL1, np.int32)
    weights_RxL = (np.ones(rows_RxL1[:, 1:].shape, np.float32) if weights_RxL1 is None
                   else np.asarray(weights_RxL1[:, 1:], np.float32))
    batch = {"inputs": rows_RxL1[:, :-1], "targets": rows_RxL1[:, 1:], "weights": weights_RxL}
    if segments_RxL1 is None:
        return batch
    segments_RxL1 = np.asarray(segments_RxL1, np.int32)
    segments_RxL = segments_RxL1[:, :-1] - segments_RxL1[:, :1]
    index_L = np.arange(segments_RxL.shape[1])
    starts_here_RxL = np.concatenate([np.ones_like(segments_RxL[:, :1], bool),
                                      segments_RxL[:, 1:] != segments_RxL[:, :-1]], axis=1)
    document_start_RxL = np.maximum.accumulate(np.where(starts_here_RxL, index_L, 0), axis=1)
    batch["weights"] = weights_RxL * (segments_RxL1[:, 1:] == segments_RxL1[:, :-1])
    batch["segments"] = segments_RxL
    batch["positions"] = (index_L - document_start_RxL).astype(np.int32)
    return batch


def documents_ending_at(tokens_RxL1: np.ndarray, eos: int) -> np.ndarray:
    """Each token's document number in its row, a document ending with (and at) each EOS."""
    ended_RxL = np.cumsum(tokens_RxL1[:, :-1] == eos, axis=1)
    return np.concatenate([np.zeros_like(ended_RxL[:, :1]), ended_RxL], axis=1)


class RandomSource:
    """The original's data: uniform random tokens. Nothing to learn; loss stays near ln(vocab)."""

    def __init__(self, vocab_size: int, seq_len: int, seed: int):
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed

    def batch(self, step, batch_size, rows=slice(None), split="train"):
        r = _row_range(batch_size, rows)
        l1 = self.seq_len + 1
        tokens = _uniform(self.seed, split, step, r.start * l1, len(r) * l1, self.vocab_size)
        return as_batch(tokens.reshape(len(r), l1))


class WindowSource:
    """Windows of L+1 tokens at uniform random offsets of one token stream per split.

    The streams may be memory-mapped files: only the windows of this process's rows are read.
    With `doc_eos` (the EOS that ends each document), batches are document masked.
    """

    def __init__(self, splits: dict[str, np.ndarray], seq_len: int, seed: int, name: str,
                 doc_eos: int | None = None):
        for split, tokens in splits.items():
            if len(tokens) < seq_len + 1:
                raise DataError(
                    f"the {split} split of {name} has {len(tokens)} tokens, fewer than one "
                    f"sequence of model.max_seq_len+1={seq_len + 1}; use more data, lower "
                    f"model.max_seq_len, or raise data.val_fraction if the val split is short.")
        self.splits, self.seq_len, self.seed, self.name = splits, seq_len, seed, name
        self.doc_eos = doc_eos

    def batch(self, step, batch_size, rows=slice(None), split="train"):
        tokens, r = self.splits[split], _row_range(batch_size, rows)
        starts = _uniform(self.seed, split, step, r.start, len(r), len(tokens) - self.seq_len)
        rows_RxL1 = np.stack([tokens[s:s + self.seq_len + 1] for s in starts])
        if self.doc_eos is None:
            return as_batch(rows_RxL1)
        return as_batch(rows_RxL1, segments_RxL1=documents_ending_at(rows_RxL1, self.doc_eos))


def pack_best_fit(lengths: list[int], capacity: int) -> list[list[int]]:
    """Groups items into rows of at most `capacity` tokens: best-fit decreasing, deterministic."""
    rows: list[list[int]] = []
    space: list[tuple[int, int]] = []  # (space left, row), sorted
    for item in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = bisect.bisect_left(space, (lengths[item], -1))
        if slot == len(space):
            rows.append([item])
            left, row = capacity - lengths[item], len(rows) - 1
        else:
            left, row = space.pop(slot)
            rows[row].append(item)
            left -= lengths[item]
        if left > 0:
            bisect.insort(space, (left, row))
    return rows


class InstructionSource:
    """Instruction examples, one per row padded with PAD, or packed several to a row.

    Rows are fixed once; each epoch visits all of them in a fresh order drawn from (seed, split,
    epoch), so global row g of the run is row perm_e[g % n_rows] of epoch e = g // n_rows.
    In a packed row, later examples can attend to earlier ones unless `doc_mask` (each
    example its own document, the padding part of the last); each starts with BOS (or its chat
    template's opening), and only the tokens each marks as scored (outputs, answers, and the
    token ending each) are.
    """

    def __init__(self, splits: dict[str, TokenizedExamples], seq_len: int, seed: int, pad_id: int,
                 pack: bool, doc_mask: bool = False, records: dict[str, int] | None = None):
        self.splits, self.seq_len, self.seed, self.pad_id = splits, seq_len, seed, pad_id
        self.doc_mask = doc_mask
        self.records = records or {}  # how many alpaca and chat records the examples came from
        self.rows = {}
        for split, examples in splits.items():
            if pack:
                lengths = [examples.length(i) for i in range(len(examples))]
                self.rows[split] = pack_best_fit(lengths, seq_len + 1)
            else:
                self.rows[split] = [[i] for i in range(len(examples))]
        self._perms: dict[tuple[str, int], np.ndarray] = {}

    def fill(self, split: str) -> float:
        """The fraction of row tokens that are not padding."""
        examples = self.splits[split]
        return len(examples.tokens) / (len(self.rows[split]) * (self.seq_len + 1))

    def _order(self, split: str, epoch: int) -> np.ndarray:
        if (split, epoch) not in self._perms:
            if len(self._perms) > 8:
                self._perms.clear()
            rng = np.random.default_rng([self.seed % 2**64, _SPLITS[split], epoch])
            self._perms[split, epoch] = rng.permutation(len(self.rows[split]))
        return self._perms[split, epoch]

    def batch(self, step, batch_size, rows=slice(None), split="train"):
        examples, n_rows = self.splits[split], len(self.rows[split])
        tokens_RxL1 = np.full((len(_row_range(batch_size, rows)), self.seq_len + 1), self.pad_id)
        weights_RxL1 = np.zeros(tokens_RxL1.shape, np.float32)
        segments_RxL1 = np.zeros(tokens_RxL1.shape, np.int32)
        for out, r in enumerate(_row_range(batch_size, rows)):
            g = step * batch_size + r
            at = 0
            for i in self.rows[split][self._order(split, g // n_rows)[g % n_rows]]:
                start, end = examples.starts[i], examples.starts[i + 1]
                tokens_RxL1[out, at:at + end - start] = examples.tokens[start:end]
                weights_RxL1[out, at:at + end - start] = examples.scored[start:end]
                segments_RxL1[out, at:] += 1  # a document from here on
                at += end - start
        return as_batch(tokens_RxL1, weights_RxL1, segments_RxL1 if self.doc_mask else None)
