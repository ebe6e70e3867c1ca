"""Tokenizers: exact round trips, specials that text cannot forge, deterministic BPE training."""

import numpy as np
import pytest

from minids_jax import config as config_lib
from minids_jax.data import tokenization
from minids_jax.data.corpus import builtin_corpus_files
from minids_jax.data.tokenization import BpeTokenizer, ByteTokenizer

UNSEEN = "Grüße, 世界! 🙂\n\tdef f(x):\n        return x ** 2  # <eos> <pad>\r\n"


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    texts, total = [], 0
    for path in builtin_corpus_files():
        texts.append(path.read_text("utf-8", errors="replace"))
        total += len(texts[-1])
        if total > 150_000:
            return texts
    return texts


@pytest.fixture(scope="module")
def bpe(corpus) -> BpeTokenizer:
    return BpeTokenizer.train(corpus, 400)


def test_byte_round_trip_and_specials():
    tok = ByteTokenizer()
    ids = tok.encode(UNSEEN)
    assert ids.dtype == np.int32 and ids.max() < 256 and len(ids) == len(UNSEEN.encode())
    assert tok.decode(ids) == UNSEEN
    assert len({tok.PAD, tok.BOS, tok.EOS}) == 3 and min(tok.PAD, tok.BOS, tok.EOS) >= 256
    assert tok.decode([tok.BOS, *ids, tok.EOS, tok.PAD]) == UNSEEN  # specials decode to nothing


def test_bpe_round_trips_unseen_text_and_compresses(bpe, corpus):
    assert tokenization.BPE_MIN_VOCAB < bpe.vocab_size <= 400
    ids = bpe.encode(UNSEEN)
    assert bpe.decode(ids) == UNSEEN
    text = corpus[0]
    assert len(bpe.encode(text)) < 0.7 * len(text.encode())  # merges were learned and used
    assert [bpe.PAD, bpe.BOS, bpe.EOS] == [0, 1, 2]


def test_bpe_text_cannot_produce_special_tokens(bpe):
    ids = bpe.encode("<eos><pad><bos>")
    assert not set(ids.tolist()) & {bpe.PAD, bpe.BOS, bpe.EOS}
    assert bpe.decode(ids) == "<eos><pad><bos>"


def test_bpe_training_is_deterministic(bpe, corpus, tmp_path):
    again = BpeTokenizer.train(corpus, 400)
    assert again.fingerprint == bpe.fingerprint
    bpe.save(tmp_path / "tokenizer.json")
    loaded = BpeTokenizer.load(tmp_path / "tokenizer.json")
    assert loaded.fingerprint == bpe.fingerprint
    np.testing.assert_array_equal(loaded.encode(UNSEEN), bpe.encode(UNSEEN))


def test_bpe_chunked_encoding_equals_whole_text(bpe, corpus, monkeypatch):
    text = "".join(corpus)[:60_000]
    whole = bpe.hf.encode(text, add_special_tokens=False).ids
    monkeypatch.setattr(tokenization, "_CHUNK_CHARS", 500)
    assert len(list(tokenization.safe_chunks(text))) > 20
    assert bpe.encode(text).tolist() == whole


def test_vocab_smaller_than_tokenizer_needs_is_a_clear_error():
    with pytest.raises(config_lib.ConfigError, match=r"model.vocab_size=200 .* >= 259"):
        config_lib.from_config_dict({"model": {"vocab_size": 200},
                                     "data": {"source": "builtin", "tokenizer": "bpe"}})
    with pytest.raises(ValueError, match="at least 259"):
        BpeTokenizer.train(["some text"], 100)
