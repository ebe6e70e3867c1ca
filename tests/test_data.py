"""Data sources, the sampler, instruction masking, caching, prepare, and bad-input errors."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from minids_jax import config as config_lib
from minids_jax.data import pipeline as data
from minids_jax.prepare import prepare
from tests.factories import tiny_config

ROOT = pathlib.Path(__file__).resolve().parents[1]
BYTE = data.ByteTokenizer()


def make_config(tmp_path, seq_len=16, vocab=259, seed=7, **data_fields):
    data_fields.setdefault("cache_dir", str(tmp_path / "cache"))
    return tiny_config(model=dict(vocab_size=vocab, max_seq_len=seq_len, d_model=16),
                       train=dict(seed=seed), data=data_fields)


def write_text_corpus(root: pathlib.Path, n_files=6) -> pathlib.Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_files):
        lines = [f"Line {j} of document {i}: the quick brown fox, ünïcödé\n" for j in range(40)]
        (root / f"doc{i}.txt").write_text("".join(lines))
    return root


def write_instructions(path: pathlib.Path, n=30) -> pathlib.Path:
    with open(path, "w") as f:
        for i in range(n):
            record = {"instruction": "Add the numbers.", "output": str(2 * i + 1) * (1 + i % 3)}
            if i % 2:
                record["input"] = f"{i} {i + 1}"
            f.write(json.dumps(record) + "\n")
    return path


def write_bin(path: pathlib.Path, tokens, dtype=np.uint16) -> pathlib.Path:
    np.asarray(tokens, dtype).tofile(path)
    return path


@pytest.fixture
def sources(tmp_path):
    """One source of every kind, each with the same seed and a 16-token context."""
    corpus = write_text_corpus(tmp_path / "corpus")
    jsonl = write_instructions(tmp_path / "train.jsonl")
    bin_file = write_bin(tmp_path / "tokens.bin", np.arange(3000) % 250)
    configs = {
        "random": make_config(tmp_path),
        "text": make_config(tmp_path, source="text", path=str(corpus)),
        "padded": make_config(tmp_path, seq_len=192, source="jsonl", path=str(jsonl)),
        "packed": make_config(tmp_path, seq_len=192, source="jsonl", path=str(jsonl), pack=True),
        "tokens": make_config(tmp_path, source="tokens", path=str(bin_file)),
    }
    return {name: (config, data.make_source(config)) for name, config in configs.items()}


# ------------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("kind", ["random", "text", "padded", "packed", "tokens"])
def test_batch_is_a_pure_function_of_seed_step_and_row(sources, kind):
    config, source = sources[kind]
    full = source.batch(5, 8, slice(None), "train")
    assert {k: v.shape for k, v in full.items()} == {k: (8, config.model.max_seq_len)
                                                     for k in ("inputs", "targets", "weights")}
    assert full["inputs"].dtype == np.int32 and full["weights"].dtype == np.float32
    # A fresh source (a resumed run) asked for step 5 first gives the same batch.
    fresh = data.make_source(config)
    again = fresh.batch(5, 8, slice(None), "train")
    for name in full:
        np.testing.assert_array_equal(again[name], full[name])
    # Processes holding rows [0,1), [1,4), [4,8) together build exactly the global batch.
    parts = [fresh.batch(5, 8, rows, "train") for rows in (slice(0, 1), slice(1, 4), slice(4, 8))]
    for name in full:
        np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), full[name])
    assert not np.array_equal(source.batch(6, 8)["inputs"], full["inputs"])
    assert not np.array_equal(source.batch(5, 8, split="val")["inputs"], full["inputs"])


def test_targets_are_the_next_tokens_of_contiguous_windows(tmp_path):
    tokens = np.arange(200, dtype=np.uint16)  # every window of a counting stream counts by 1
    config = make_config(tmp_path, seq_len=16, source="tokens",
                         path=str(write_bin(tmp_path / "t.bin", tokens)), val_fraction=0.2)
    source = data.make_source(config)
    boundary = 160
    starts = []
    for step in range(300):
        batch = source.batch(step, 8)
        np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)
        assert batch["weights"].all()
        starts += batch["inputs"][:, 0].tolist()
        assert batch["targets"].max() < boundary  # training never reads the held-out tail
        val = source.batch(step, 4, split="val")
        assert val["inputs"].min() >= boundary
    # Every start, including the last one that fits, is drawn: no off-by-one.
    assert set(starts) == set(range(boundary - 16))


def test_random_source_is_uniform_over_the_vocab(sources):
    _, source = sources["random"]
    tokens = np.concatenate([source.batch(s, 8)["inputs"].ravel() for s in range(200)])
    counts = np.bincount(tokens, minlength=259)
    assert len(counts) == 259 and counts.min() > 0  # ids 0..258, each drawn
    assert 0.7 < counts.std() / np.sqrt(counts.mean()) < 1.3  # the spread of independent draws


# -------------------------------------------------------------------- instruction data


def test_padded_rows_hold_one_example_and_score_only_its_output(sources):
    config, source = sources["padded"]
    expected = {ex.output for ex in data.read_instructions(config.data.path, "jsonl")[0]}
    for step in range(4):
        batch = source.batch(step, 8)
        for inputs, targets, weights in zip(batch["inputs"], batch["targets"], batch["weights"]):
            assert inputs[0] == BYTE.BOS and (inputs == BYTE.BOS).sum() == 1
            scored = targets[weights > 0]
            assert scored[-1] == BYTE.EOS and (targets[weights == 0] != BYTE.EOS).all()
            assert BYTE.decode(scored) in expected  # exactly the output, no prompt byte
            prompt = BYTE.decode(inputs[:np.argmax(weights > 0) + 1])
            assert prompt.startswith("### Instruction:\nAdd the numbers.") and prompt.endswith(
                "### Response:\n")
            assert (targets[np.flatnonzero(weights)[-1] + 1:] == BYTE.PAD).all()


def test_packed_rows_visit_every_train_example_once_per_epoch(sources):
    config, source = sources["packed"]
    n_rows = len(source.rows["train"])
    n_examples = len(source.splits["train"])
    assert n_rows < n_examples  # several examples share a row
    assert source.fill("train") > 0.7
    outputs = []
    for step in range(n_rows):  # batch size 1: steps 0..n_rows-1 are exactly one epoch
        batch = source.batch(step, 1)
        targets, weights = batch["targets"][0], batch["weights"][0]
        scored = BYTE.decode(np.where(targets == BYTE.EOS, ord("|"), targets)[weights > 0])
        outputs += scored.split("|")[:-1]
    all_outputs = [ex.output for ex in data.read_instructions(config.data.path, "jsonl")[0]]
    val_outputs = [o for o, v in zip(all_outputs, data.held_out(
        data.read_instructions(config.data.path, "jsonl")[0], 0.02, "x")) if v]
    assert len(outputs) == n_examples == len(all_outputs) - len(val_outputs)
    assert sorted(outputs + val_outputs) == sorted(all_outputs)


def test_held_out_examples_do_not_depend_on_seed_or_order(tmp_path):
    examples = data.read_instructions(str(write_instructions(tmp_path / "a.jsonl", 40)), "jsonl")[0]
    is_val = data.held_out(examples, 0.1, "a.jsonl")
    assert is_val.sum() == 4
    flipped = data.held_out(examples[::-1], 0.1, "a.jsonl")[::-1]
    np.testing.assert_array_equal(flipped, is_val)
    config = make_config(tmp_path, seq_len=96, source="jsonl", path=str(tmp_path / "a.jsonl"),
                         val_fraction=0.1)
    for seed in (1, 2):
        source = data.make_source(make_config(tmp_path, seq_len=96, seed=seed, source="jsonl",
                                              path=config.data.path, val_fraction=0.1))
        assert len(source.splits["val"]) == 4
        assert bytes(source.splits["val"].tokens) == bytes(
            data.make_source(config).splits["val"].tokens)


def test_overlong_examples_are_cut_or_dropped(tmp_path, caplog):
    path = tmp_path / "long.jsonl"
    rows = [{"instruction": "Say.", "output": "x" * 100}, {"instruction": "Hi.", "output": "ok"},
            {"instruction": "y" * 100, "output": "z"}, {"instruction": "A.", "output": "b"}]
    # The template adds 38 bytes around the instruction, BOS and EOS 2 more: 80 fits "Say.".
    path.write_text("".join(json.dumps(r) + "\n" for r in rows * 10))
    cut = data.make_source(make_config(tmp_path, seq_len=80, source="jsonl", path=str(path)))
    lengths = [cut.splits["train"].length(i) for i in range(len(cut.splits["train"]))]
    assert max(lengths) == 81  # "x" * 100 cut to the context
    assert len(cut.splits["train"]) + len(cut.splits["val"]) == 30  # long prompts dropped
    assert "line 3" in caplog.text
    drop = data.make_source(make_config(tmp_path, seq_len=80, source="jsonl", path=str(path),
                                        overlong="drop"))
    assert len(drop.splits["train"]) + len(drop.splits["val"]) == 20


# ---------------------------------------------------------------- caching and tokenizers


def test_text_is_tokenized_once_per_content_and_tokenizer(tmp_path, monkeypatch):
    corpus = write_text_corpus(tmp_path / "corpus")
    calls = []
    original = data.ByteTokenizer.encode_batch
    monkeypatch.setattr(data.ByteTokenizer, "encode_batch",
                        lambda self, texts: calls.append(len(texts)) or original(self, texts))
    config = make_config(tmp_path, source="text", path=str(corpus))
    first = data.make_source(config).batch(3, 4)
    assert calls and len(list((tmp_path / "cache").glob("tokens-*"))) == 1
    calls.clear()
    second = data.make_source(config).batch(3, 4)
    assert not calls  # read from the cache
    np.testing.assert_array_equal(first["inputs"], second["inputs"])
    with open(corpus / "doc0.txt", "a") as f:
        f.write("one more line\n")
    data.make_source(config)
    assert calls and len(list((tmp_path / "cache").glob("tokens-*"))) == 2  # new content, new entry


def test_bpe_is_trained_once_saved_in_workdir_and_reused(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", n_files=20)
    config = make_config(tmp_path, vocab=320, source="text", path=str(corpus), tokenizer="bpe")
    workdir = tmp_path / "run"
    source = data.make_source(config, str(workdir))
    saved = workdir / "tokenizer.json"
    assert saved.is_file() and len(list((tmp_path / "cache").glob("bpe-*"))) == 1
    tokenizer = data.load_tokenizer(config, str(workdir))
    assert 259 < tokenizer.vocab_size <= 320 and tokenizer.kind == "bpe"
    tokens = source.batch(0, 4)["inputs"]
    assert tokens.max() < tokenizer.vocab_size and tokens.max() > 258  # merges are in use
    text = tokenizer.decode(tokens[0])
    assert "document" in text or "quick" in text or "fox" in text
    # On resume the saved tokenizer is used: no corpus or cache needed.
    for path in list(corpus.iterdir()) + list((tmp_path / "cache").rglob("*.json")):
        path.unlink()
    assert data.load_tokenizer(config, str(workdir)).fingerprint == tokenizer.fingerprint
    small = make_config(tmp_path, vocab=300, source="text", path=str(corpus), tokenizer="bpe")
    with pytest.raises(config_lib.ConfigError, match=r"has 3\d\d tokens but model.vocab_size=300"):
        data.load_tokenizer(small, str(workdir))


def test_non_utf8_files_are_skipped_and_counted(tmp_path, caplog):
    corpus = write_text_corpus(tmp_path / "corpus", n_files=2)
    (corpus / "latin1.txt").write_bytes("café olé".encode("latin-1"))
    (corpus / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0\0")
    (corpus / ".hidden").write_text("not read")
    read = data.read_corpus(make_config(tmp_path, source="text", path=str(corpus)).data)
    assert len(read.documents) == 2
    assert "skipped 2 file(s)" in caplog.text and "latin1.txt" in caplog.text


def test_glob_and_single_file_paths(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", n_files=3)
    (corpus / "notes.md").write_text("# notes\n")
    glob_config = make_config(tmp_path, source="text", path=str(tmp_path / "**" / "*.txt"))
    assert len(data.read_corpus(glob_config.data).documents) == 3
    file_config = make_config(tmp_path, source="text", path=str(corpus / "notes.md"))
    assert data.read_corpus(file_config.data).documents == ["# notes\n"]


# ------------------------------------------------------------------ prepare and .bin files


def test_prepare_writes_token_files_the_tokens_source_reads(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", n_files=20)
    text_config = make_config(tmp_path, vocab=320, source="text", path=str(corpus),
                              tokenizer="bpe", val_fraction=0.1)
    out = tmp_path / "prepared"
    meta = prepare(text_config, str(out))
    assert meta["dtype"] == "uint16" and meta["tokenizer"] == "bpe"
    train = np.fromfile(out / "train.bin", np.uint16)
    val = np.fromfile(out / "val.bin", np.uint16)
    tokenizer = data.load_tokenizer(text_config)
    stream = data.corpus_tokens(data.read_corpus(text_config.data), tokenizer, "")
    np.testing.assert_array_equal(np.concatenate([train, val]), stream)
    assert len(val) == len(stream) - int(len(stream) * 0.9)
    assert (stream == tokenizer.EOS).sum() == 20  # one EOS after each document
    tokens_config = make_config(tmp_path, vocab=320, source="tokens", path=str(out),
                                tokenizer="bpe")
    source = data.make_source(tokens_config, str(tmp_path / "run"))
    batch = source.batch(2, 4)
    row = np.concatenate([batch["inputs"][0], batch["targets"][0, -1:]])
    assert any(np.array_equal(train[s:s + 17], row) for s in range(len(train) - 16))
    loaded = data.load_tokenizer(tokens_config, str(tmp_path / "run"))
    assert loaded.fingerprint == tokenizer.fingerprint
    with pytest.raises(config_lib.ConfigError, match="data.tokenizer='bpe'"):
        data.make_source(make_config(tmp_path, vocab=320, source="tokens", path=str(out)))


def test_uint32_token_files(tmp_path):
    bin_file = write_bin(tmp_path / "big.bin", np.arange(70_000, 70_300), np.uint32)
    config = make_config(tmp_path, vocab=80_000, source="tokens", path=str(bin_file),
                         token_dtype="uint32", val_fraction=0.1)
    batch = data.make_source(config).batch(0, 4)
    assert batch["inputs"].min() >= 70_000
    np.testing.assert_array_equal(batch["targets"], batch["inputs"] + 1)


@pytest.mark.slow
def test_prepare_command_line(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus", n_files=2)
    result = subprocess.run(
        [sys.executable, "-m", "minids_jax.prepare", "--config", "configs/tiny.py",
         "--config.data.source=text", f"--config.data.path={corpus}",
         f"--config.data.cache_dir={tmp_path / 'cache'}", f"--out={tmp_path / 'out'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 0, result.stderr
    assert "--config.data.source=tokens" in result.stdout
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    total = sum(meta["num_tokens"].values())
    assert total == sum(len(p.read_bytes()) for p in corpus.iterdir()) + 2  # bytes + EOS each


# --------------------------------------------------------------------------- bad input


def bad_input_cases(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "binaries").mkdir()
    (tmp_path / "binaries" / "a.bin").write_bytes(b"\xff\xfe\x00\x01")
    (tmp_path / "short.txt").write_text("too short")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": \n')
    (tmp_path / "no_output.jsonl").write_text(
        '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": "d"}\n')
    (tmp_path / "no_output.json").write_text(
        '[{"instruction": "a", "output": "b"}, {"instruction": "c"}]')
    (tmp_path / "long_prompt.jsonl").write_text(
        "".join(json.dumps({"instruction": "p" * 50, "output": "o"}) + "\n" for _ in range(3)))
    write_bin(tmp_path / "odd.bin", np.arange(100)).open("ab").write(b"\0")
    write_bin(tmp_path / "big_ids.bin", np.arange(100) + 200)
    return [  # (data fields, error type, message pattern)
        (dict(source="text", path=str(tmp_path / "empty.txt")), data.DataError,
         r"corpus .*empty\.txt.* is empty .*add text"),
        (dict(source="text", path=str(tmp_path / "binaries")), data.DataError,
         r"binaries.* holds no text files: all 1 file\(s\) .* not UTF-8 .*a\.bin"),
        (dict(source="text", path=str(tmp_path / "nowhere")), data.DataError,
         r"data.path=.*nowhere.* does not exist"),
        (dict(source="text", path=str(tmp_path / "short.txt")), data.DataError,
         r"train split of data.path=.*short\.txt.* has \d tokens, fewer than one sequence .*"
         r"model.max_seq_len"),
        (dict(source="jsonl", path=str(tmp_path / "bad.jsonl")), data.DataError,
         r"bad\.jsonl line 2 is not valid JSON"),
        (dict(source="jsonl", path=str(tmp_path / "no_output.jsonl")), data.DataError,
         r"no_output\.jsonl line 3 has no 'output' field"),
        (dict(source="json", path=str(tmp_path / "no_output.json")), data.DataError,
         r"no_output\.json record 1 has no 'output' field"),
        (dict(source="jsonl", path=str(tmp_path / "long_prompt.jsonl")), data.DataError,
         r"longer than model.max_seq_len\+1=17 .*long_prompt\.jsonl line \d .*prompt alone"),
        (dict(source="tokens", path=str(tmp_path / "odd.bin")), data.DataError,
         r"odd\.bin is 201 bytes, not a multiple of 2 \(uint16\).*data.token_dtype"),
        (dict(source="tokens", path=str(tmp_path / "big_ids.bin")), data.DataError,
         r"big_ids\.bin holds token id 299, but model.vocab_size=259 .* >= 300"),
        (dict(source="tokens", path=str(tmp_path)), data.DataError,
         r"has no train\.bin or val\.bin; write them with `python -m minids_jax.prepare"),
        (dict(source="text"), config_lib.ConfigError, r"data.path, which is empty"),
        (dict(source="builtin", path="x.txt"), config_lib.ConfigError,
         r"data.path='x.txt' is set but data.source='builtin' does not read it"),
        (dict(source="random", tokenizer="bpe"), config_lib.ConfigError,
         r"data.source='random' has none"),
        (dict(source="csv", path="x.csv"), config_lib.ConfigError, r"data.source='csv'"),
    ]


def test_bad_input_errors_name_the_problem_and_the_fix(tmp_path):
    for fields, error, pattern in bad_input_cases(tmp_path):
        with pytest.raises(error, match=pattern):
            data.make_source(make_config(tmp_path, **fields))


def test_one_example_is_too_few(tmp_path):
    path = tmp_path / "one.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n')
    with pytest.raises(data.DataError, match=r"one\.jsonl holds 1 example; at least 2"):
        data.make_source(make_config(tmp_path, source="jsonl", path=str(path)))


def test_byte_tokenizer_refused_for_a_bpe_run(tmp_path):
    corpus = write_text_corpus(tmp_path / "corpus")
    workdir = str(tmp_path / "run")
    data.make_source(make_config(tmp_path, vocab=300, source="text", path=str(corpus),
                                 tokenizer="bpe"), workdir)
    with pytest.raises(config_lib.ConfigError, match=r"tokenizer.json holds the BPE tokenizer"):
        data.make_source(make_config(tmp_path, source="text", path=str(corpus)), workdir)


def test_trainer_learns_from_instruction_data_with_a_bpe_tokenizer(tmp_path):
    from minids_jax.training import trainer

    path = write_instructions(tmp_path / "sft.jsonl", 40)
    config = config_lib.from_config_dict({
        "model": {"vocab_size": 320, "max_seq_len": 64, "d_model": 32, "n_heads": 2,
                  "latent_k": 4, "n_layers": 1, "n_experts": 2},
        "optim": {"lr": 3e-3, "warmup_steps": 2, "total_steps": 30},
        "train": {"batch_size": 4, "log_every": 10, "eval_batches": 2},
        "data": {"source": "jsonl", "path": str(path), "tokenizer": "bpe", "pack": True,
                 "val_fraction": 0.1, "cache_dir": str(tmp_path / "cache")},
    })
    history = trainer.run(config, str(tmp_path / "run"))
    losses = [h["loss"] for h in history if "loss" in h]
    assert (tmp_path / "run" / "tokenizer.json").is_file()
    # From ln(vocab) at the start; 0 would mean nothing was scored.
    assert 0 < losses[-1] < 0.75 * np.log(320)
    assert np.isfinite(history[-1]["eval_loss"])


def test_an_unwritable_cache_costs_speed_not_the_run(tmp_path):
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache directory should be")
    config = make_config(tmp_path, source="text", path=str(write_text_corpus(tmp_path / "c")),
                         cache_dir=str(blocker / "cache"))
    batch = data.make_source(config).batch(0, 4)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])
