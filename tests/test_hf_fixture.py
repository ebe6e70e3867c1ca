"""A random tiny DeepseekV3ForCausalLM made by transformers (tests/fixtures/hf_tiny, by
scripts/make_hf_fixture.py: group-limited routing with non-zero correction biases, a dense first
layer, YaRN, an MTP layer), and its FP8 copy: imported here, they give the logits, greedy tokens
and MTP logits transformers computed. Needs neither torch nor transformers."""

from __future__ import annotations

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import minids_jax
from minids_jax.data.tokenization import HFTokenizer
from minids_jax.generation import generate
from minids_jax.hf import convert
from minids_jax.model.mtp import mtp_chain
from tests.factories import REPO, assert_close_logits, tiny_config

FIXTURE = REPO / "tests" / "fixtures" / "hf_tiny"
FIXTURE_FP8 = REPO / "tests" / "fixtures" / "hf_tiny_fp8"


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(FIXTURE / "reference.npz"))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("imported")
    convert.import_dir(FIXTURE, workdir, tiny_config(), log=lambda _: None)
    return (workdir, *minids_jax.load(workdir))


def test_imported_logits_and_greedy_tokens_are_transformers(imported, reference):
    _, model, config = imported
    assert config.model.mtp_depth == 1 and config.model.rope_yarn_factor > 1
    assert float(jnp.abs(model.blocks[1].moe.bias[...]).max()) > 0  # the correction bias
    logits = np.asarray(nnx.jit(lambda model, tokens: model(tokens).logits_BxLxV)(
        model, reference["tokens"]))  # one program: eager, each op compiles on its own
    assert_close_logits(logits, reference["logits"])
    prompt = reference["prompt"]
    new = generate(model, prompt, reference["greedy"].shape[1] - prompt.shape[1])
    np.testing.assert_array_equal(new, reference["greedy"][:, prompt.shape[1]:])


def test_the_mtp_layer_gives_transformers_mtp_logits(imported, reference):
    _, model, _ = imported
    tokens = jnp.asarray(reference["tokens"])

    @nnx.jit
    def mtp_head(model, tokens):
        features, _, _ = model.hidden(tokens)  # after the final norm, what the head reads
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        ahead, _ = mtp_chain(model.mtp, model.embed, tokens, features, positions)
        return model.head(ahead[0])

    mtp_logits = np.asarray(mtp_head(model, tokens))[:, :-1]  # positions with a token ahead
    assert_close_logits(mtp_logits, reference["mtp_logits"])


def test_the_fp8_copy_imports_to_the_same_weights_and_template_file(imported, tmp_path):
    # Saved as newer transformers save it: the chat template in chat_template.jinja.
    shutil.copytree(FIXTURE_FP8, tmp_path / "hf")
    settings = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    (tmp_path / "hf" / "chat_template.jinja").write_text(settings.pop("chat_template"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps(settings))
    convert.import_dir(tmp_path / "hf", tmp_path / "fp8", tiny_config(), log=lambda _: None)
    assert (tmp_path / "fp8" / "chat_template.jinja").is_file()
    assert HFTokenizer(tmp_path / "fp8").chat_template == HFTokenizer(FIXTURE).chat_template
    # The fixture's float32 weights are the FP8 ones dequantized: the same numbers.
    fp8 = convert.flat_paths(minids_jax.load_params(tmp_path / "fp8"))
    plain = convert.flat_paths(minids_jax.load_params(imported[0]))
    assert fp8.keys() == plain.keys()
    for path, array in plain.items():
        np.testing.assert_array_equal(fp8[path], array, err_msg=str(path))


def test_the_tokenizer_comes_with_its_specials_and_chat_template(imported):
    _, _, config = imported
    assert config.data.tokenizer == "hf"
    tokenizer = HFTokenizer(FIXTURE)
    hf = __import__("json").loads((FIXTURE / "config.json").read_text())
    assert (tokenizer.BOS, tokenizer.EOS) == (hf["bos_token_id"], hf["eos_token_id"])
    assert "<｜Assistant｜>" in tokenizer.chat_template
    text = "The quick brown fox."
    assert tokenizer.decode(tokenizer.encode(text)) == text
