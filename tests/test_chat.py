"""Chat data (ShareGPT and OpenAI messages): templates, which tokens are scored, malformed
records, fitting to the context, and `generate.py --chat`."""

from __future__ import annotations

import json
import pathlib
import shutil
import subprocess
import sys

import numpy as np
import pytest

from minids_jax import generation
from minids_jax.data import chat
from minids_jax.data import pipeline as data
from minids_jax.data.instructions import format_prompt
from minids_jax.data.tokenization import HFTokenizer
from tests.factories import REPO, subprocess_env, tiny_config

BYTE = data.ByteTokenizer()
HF_TOKENIZER = REPO / "tests" / "fixtures" / "hf_tiny" / "tokenizer.json"
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# deepseek-ai/DeepSeek-V3's tokenizer_config.json chat_template, as published.
DEEPSEEK_V3_TEMPLATE = r"""{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}{% set ns = namespace(is_first=false, is_tool=false, is_output_first=true, system_prompt='', is_first_sp=true) %}{%- for message in messages %}{%- if message['role'] == 'system' %}{%- if ns.is_first_sp %}{% set ns.system_prompt = ns.system_prompt + message['content'] %}{% set ns.is_first_sp = false %}{%- else %}{% set ns.system_prompt = ns.system_prompt + '\n\n' + message['content'] %}{%- endif %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}{%- for message in messages %}{%- if message['role'] == 'user' %}{%- set ns.is_tool = false -%}{{'<｜User｜>' + message['content']}}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is none %}{%- set ns.is_tool = false -%}{%- for tool in message['tool_calls']%}{%- if not ns.is_first %}{{'<｜Assistant｜><｜tool▁calls▁begin｜><｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{%- set ns.is_first = true -%}{%- else %}{{'\n' + '<｜tool▁call▁begin｜>' + tool['type'] + '<｜tool▁sep｜>' + tool['function']['name'] + '\n' + '```json' + '\n' + tool['function']['arguments'] + '\n' + '```' + '<｜tool▁call▁end｜>'}}{{'<｜tool▁calls▁end｜><｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor %}{%- endif %}{%- if message['role'] == 'assistant' and message['content'] is not none %}{%- if ns.is_tool %}{{'<｜tool▁outputs▁end｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- set ns.is_tool = false -%}{%- else %}{{'<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endif %}{%- if message['role'] == 'tool' %}{%- set ns.is_tool = true -%}{%- if ns.is_output_first %}{{'<｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- set ns.is_output_first = false %}{%- else %}{{'\n<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>'}}{%- endif %}{%- endif %}{%- endfor -%}{% if ns.is_tool %}{{'<｜tool▁outputs▁end｜>'}}{% endif %}{% if add_generation_prompt and not ns.is_tool %}{{'<｜Assistant｜>'}}{% endif %}"""  # noqa: E501

CONVERSATION = [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello there"),
                ("user", "Add 2 3"), ("assistant", "5")]


def sharegpt(messages):
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return {"conversations": [{"from": names[r], "value": c} for r, c in messages]}


def openai(messages):
    return {"messages": [{"role": r, "content": c} for r, c in messages]}


def write_jsonl(path: pathlib.Path, records) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return str(path)


def hf_tokenizer(directory: pathlib.Path, template=DEEPSEEK_V3_TEMPLATE, **config) -> HFTokenizer:
    """The fixture's tiny byte-level BPE (with DeepSeek's special tokens) and a hand-written
    tokenizer_config.json holding `template`."""
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(HF_TOKENIZER, directory / "tokenizer.json")
    config = {"bos_token": BOS, "eos_token": EOS, "chat_template": template, **config}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False))
    return HFTokenizer(directory)


def scored_text(tokens, scored, decode) -> str:
    """The scored tokens, each run of them ended by "|"."""
    runs, text = [], []
    for token, score in zip(tokens, scored):
        if score:
            text.append(int(token))
        elif text:
            runs.append(decode(text)), text.clear()
    return "|".join(runs + ([decode(text)] if text else [])) + "|"


def byte_decode(tokens) -> str:
    return BYTE.decode(tokens) + ("<eos>" if tokens[-1] == BYTE.EOS else "")


def hf_decoder(tokenizer):
    return lambda tokens: tokenizer.hf.decode([int(t) for t in tokens], skip_special_tokens=False)


def tokenized(path, tokenizer, tmp_path):
    examples, digest = data.read_instructions(path, "jsonl")
    return examples, data.tokenize_examples(examples, digest, tokenizer, str(tmp_path / "cache"))


# ------------------------------------------------------------- the project's template


def test_both_formats_render_the_same_and_score_only_the_answers(tmp_path):
    records = [sharegpt(CONVERSATION), openai(CONVERSATION), openai(CONVERSATION[1:]),
               {"instruction": "Add the numbers.", "output": "5"}]  # alpaca beside chat
    _, all_examples = tokenized(write_jsonl(tmp_path / "c.jsonl", records), BYTE, tmp_path)
    (tok0, sc0), (tok1, sc1), (tok2, sc2), (tok3, sc3) = (
        (all_examples.tokens[a:b], all_examples.scored[a:b])
        for a, b in zip(all_examples.starts[:-1], all_examples.starts[1:]))
    np.testing.assert_array_equal(tok0, tok1)
    np.testing.assert_array_equal(sc0, sc1)
    # Every token of the layout: BOS, scaffolding and questions unscored, each answer and its
    # EOS scored.
    want = [(BYTE.BOS, False), ("### System:\nBe brief.\n\n", False),
            ("### User:\nHi\n\n### Assistant:\n", False), ("Hello there", True), (BYTE.EOS, True),
            ("### User:\nAdd 2 3\n\n### Assistant:\n", False), ("5", True), (BYTE.EOS, True)]
    expected = [(token, score) for piece, score in want
                for token in (list(piece.encode()) if isinstance(piece, str) else [piece])]
    assert list(zip(tok0.tolist(), sc0.tolist())) == expected
    assert scored_text(tok0, sc0, byte_decode) == "Hello there<eos>|5<eos>|"
    # The system message is optional: without it the layout opens with the user.
    assert BYTE.decode(tok2).startswith("### User:\nHi\n\n### Assistant:\nHello there")
    assert scored_text(tok2, sc2, byte_decode) == "Hello there<eos>|5<eos>|"
    # The alpaca record keeps its layout: [BOS] prompt output [EOS], the output scored.
    assert BYTE.decode(tok3) == format_prompt("Add the numbers.") + "5"
    assert scored_text(tok3, sc3, byte_decode) == "5<eos>|"


def test_batches_weight_every_answer_of_each_conversation(tmp_path):
    records = []
    for i in range(12):
        turns = [("user", f"q{i}.{k}") for k in range(1 + i % 3)]
        messages = [("system", f"s{i}")] * (i % 2) + [
            m for k, user in enumerate(turns) for m in (user, ("assistant", f"a{i}.{k}"))]
        records.append(sharegpt(messages) if i % 2 else openai(messages))
    path = write_jsonl(tmp_path / "chat.jsonl", records)
    examples, _ = data.read_instructions(path, "jsonl")
    is_val = data.held_out(examples, 0.2, path)
    answers = [[c for r, c in e.messages if r == "assistant"] for e in examples]
    train_answers = sorted(a for e, v in zip(answers, is_val) if not v for a in e)
    for pack in (False, True):
        config = tiny_config(model=dict(vocab_size=259, max_seq_len=192),
                             data=dict(source="jsonl", path=path, pack=pack, val_fraction=0.2,
                                       cache_dir=str(tmp_path / "cache")))
        source = data.make_source(config)
        assert (len(source.rows["train"]) < len(source.splits["train"])) == pack
        seen = []
        for step in range(len(source.rows["train"])):  # batch size 1: one epoch
            batch = source.batch(step, 1)
            targets, weights = batch["targets"][0], batch["weights"][0]
            assert (targets[weights == 0] != BYTE.EOS).all()  # every EOS ends an answer
            text = BYTE.decode(np.where(targets == BYTE.EOS, ord("|"), targets)[weights > 0])
            row = text.split("|")[:-1]
            if not pack:  # one conversation a row: all its answers, nothing else
                assert row in answers
            seen += row
        assert sorted(seen) == train_answers


# ---------------------------------------------------------- a Hugging Face chat template


def test_deepseek_v3_template_scores_the_answers_and_their_end_token(tmp_path):
    tokenizer = hf_tokenizer(tmp_path / "tok")
    assert tokenizer.chat_template == DEEPSEEK_V3_TEMPLATE
    assert tokenizer.special_tokens == {"bos_token": BOS, "eos_token": EOS}
    template = chat.template_for(tokenizer)
    assert isinstance(template, chat.JinjaTemplate) and template.end_token == tokenizer.EOS
    path = write_jsonl(tmp_path / "c.jsonl", [sharegpt(CONVERSATION), openai(CONVERSATION[1:])])
    _, examples = tokenized(path, tokenizer, tmp_path)
    with_system = (examples.tokens[:examples.starts[1]], examples.scored[:examples.starts[1]])
    without = (examples.tokens[examples.starts[1]:], examples.scored[examples.starts[1]:])
    decode = hf_decoder(tokenizer)
    # The text transformers' apply_chat_template gives, token for token as if encoded whole.
    rendered = (f"{BOS}Be brief.<｜User｜>Hi<｜Assistant｜>Hello there{EOS}"
                f"<｜User｜>Add 2 3<｜Assistant｜>5{EOS}")
    np.testing.assert_array_equal(with_system[0], tokenizer.encode(rendered))
    np.testing.assert_array_equal(without[0], tokenizer.encode(rendered.replace("Be brief.", "")))
    for tokens, scored in (with_system, without):
        assert scored_text(tokens, scored, decode) == f"Hello there{EOS}|5{EOS}|"
    # Generation is prompted with exactly the tokens training put before the last answer.
    prompt = generation.prompt_tokens(tokenizer, messages=CONVERSATION[:-1])
    last_answer = len(with_system[0]) - 2  # "5" and EOS
    np.testing.assert_array_equal(prompt, with_system[0][:last_answer])
    assert decode(prompt).endswith("<｜User｜>Add 2 3<｜Assistant｜>")


def test_an_imported_run_trains_on_its_template(tmp_path):
    """data.tokenizer='hf' takes the template from checkpoint.init_from's run into the new
    run's batches: the weighted targets are the answers and their end token."""
    base = tmp_path / "base"
    hf_tokenizer(base)
    path = write_jsonl(tmp_path / "c.jsonl", [openai(CONVERSATION)] * 2 + [
        sharegpt([("user", f"q{i}"), ("assistant", f"a{i}")]) for i in range(4)])
    config = tiny_config(model=dict(vocab_size=300, max_seq_len=64),
                         data=dict(source="jsonl", path=path, tokenizer="hf", val_fraction=0.2),
                         checkpoint=dict(init_from=str(base)))
    source = data.make_source(config, str(tmp_path / "run"))
    tokenizer = HFTokenizer(tmp_path / "run")
    assert tokenizer.chat_template == DEEPSEEK_V3_TEMPLATE  # copied into the run
    decode = hf_decoder(tokenizer)
    for step in range(len(source.rows["train"])):
        batch = source.batch(step, 1)
        inputs, targets, weights = (batch[k][0] for k in ("inputs", "targets", "weights"))
        assert inputs[0] == tokenizer.BOS
        answers = decode(targets[weights > 0])
        assert answers in (f"Hello there{EOS}5{EOS}", *(f"a{i}{EOS}" for i in range(4)))


def test_the_answer_starts_where_the_generation_prompt_and_the_history_part(tmp_path):
    """A reasoning template opens the generation prompt with "<think>" but renders past answers
    without it; the answer is still exactly the content and the end token."""
    template = ("{% for m in messages %}{% if m['role'] == 'user' %}<｜User｜>{{ m['content'] }}"
                "{% else %}<｜Assistant｜>{{ m['content'] }}{{ eos_token }}\n{% endif %}"
                "{% endfor %}{% if add_generation_prompt %}<｜Assistant｜><think>{% endif %}")
    tokenizer = hf_tokenizer(tmp_path / "tok", template)
    tokens, scored = chat.encode(tokenizer, CONVERSATION[1:])
    decode = hf_decoder(tokenizer)
    # The newline after each end token is the template's scaffolding, not the answer.
    assert scored_text(tokens, scored, decode) == f"Hello there{EOS}|5{EOS}|"
    # A template without a generation prompt: the model learns to open its turn too, and the
    # turn still ends at EOS (not at the "<｜Assistant｜>" that opens it).
    no_prompt = template.replace("{% if add_generation_prompt %}<｜Assistant｜><think>{% endif %}",
                                 "")
    tokenizer = hf_tokenizer(tmp_path / "no_prompt", no_prompt)
    assert chat.template_for(tokenizer).end_token == tokenizer.EOS
    tokens, scored = chat.encode(tokenizer, CONVERSATION[1:])
    assert scored_text(tokens, scored, hf_decoder(tokenizer)) == (
        f"<｜Assistant｜>Hello there{EOS}|<｜Assistant｜>5{EOS}|")


def test_template_sources_and_failures(tmp_path):
    jinja_file = tmp_path / "jinja"
    hf_tokenizer(jinja_file, None)
    (jinja_file / "chat_template.jinja").write_text("{{ bos_token }}")
    assert HFTokenizer(jinja_file).chat_template == "{{ bos_token }}"
    named = hf_tokenizer(tmp_path / "named", [{"name": "tool_use", "template": "x"},
                                              {"name": "default", "template": "y"}])
    assert named.chat_template == "y"
    assert isinstance(chat.template_for(hf_tokenizer(tmp_path / "none", None)),
                      chat.SimpleTemplate)
    path = write_jsonl(tmp_path / "c.jsonl", [openai(CONVERSATION[1:3])] * 2)
    refuses = "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    with pytest.raises(data.DataError, match=r"c\.jsonl line 1: .*roles must alternate"):
        tokenized(path, hf_tokenizer(tmp_path / "refuses", refuses), tmp_path)
    reversed_order = "{% for m in messages|reverse %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(data.DataError, match=r"c\.jsonl line 1: .*does not render message 1 "
                                             r"\(an assistant turn\) as a continuation"):
        tokenized(path, hf_tokenizer(tmp_path / "reversed", reversed_order), tmp_path)
    with pytest.raises(data.DataError, match=r"chat_template does not compile"):
        tokenized(path, hf_tokenizer(tmp_path / "broken", "{% if %}"), tmp_path)


# ------------------------------------------------------------------------- bad records


BAD_RECORDS = [
    ({"messages": [{"role": "robot", "content": "x"}]},
     r"line 2, messages\[0\] has role='robot'; set 'role' to one of 'system', 'user', "
     r"'assistant'"),
    ({"conversations": [{"value": "x"}]},
     r"line 2, conversations\[0\] has no 'from' field; set 'from' to one of 'system', 'human'"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]},
     r"line 2, conversations\[0\] has no 'value' field; every turn needs its text"),
    ({"messages": [{"role": "user", "content": "hi"}]},
     r"line 2 has no assistant turn, so it holds nothing to learn; add the answer"),
    ({"messages": []}, r"line 2: 'messages' must be a non-empty list of turns, got an empty"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]},
     r"line 2, messages\[0\]: 'content' must be a string, got list; convert it to text"),
    ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
     r"line 2, messages\[1\] is a system message after the first turn; only the first"),
    ({"messages": ["hi"]}, r"line 2, messages\[0\] is a str, not an object with 'role'"),
]


@pytest.mark.parametrize("record, message", BAD_RECORDS)
def test_malformed_chat_records_name_the_line_and_the_fix(tmp_path, record, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [openai(CONVERSATION), record])
    with pytest.raises(data.DataError, match=r"bad\.jsonl " + message):
        data.read_instructions(path, "jsonl")


def test_a_json_array_names_the_record(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps([openai(CONVERSATION), {"messages": [{"role": "gpt"}]}]))
    with pytest.raises(data.DataError, match=r"bad\.json record 1, messages\[0\] has no "
                                             r"'content' field"):
        data.read_instructions(str(path), "json")


# ----------------------------------------------------------- the context and the split


def test_long_conversations_are_cut_after_an_answer_or_dropped(tmp_path):
    cut_second = openai([("user", "q"), ("assistant", "aaaaa"), ("user", "r"),
                         ("assistant", "b" * 100)])
    long_prompt = openai([("user", "x" * 100), ("assistant", "y")])
    short = openai([("user", "q"), ("assistant", "ok")])
    path = write_jsonl(tmp_path / "long.jsonl", [cut_second, long_prompt, short])
    examples, all_examples = tokenized(path, BYTE, tmp_path)
    everything = np.ones(3, bool)
    fit = data.fit_examples(all_examples, everything, examples, 80, "truncate", "train")
    assert len(fit) == 2 and fit.length(0) == 81  # the long prompt is dropped
    first = slice(0, fit.starts[1])
    # Both answers keep their weight up to the cut: BOS and "### User:\nq\n\n### Assistant:\n"
    # are 29 tokens, the second user turn 28 more.
    assert scored_text(fit.tokens[first], fit.scored[first], byte_decode) == (
        "aaaaa<eos>|" + "b" * (81 - 29 - 6 - 28) + "|")
    dropped = data.fit_examples(all_examples, everything, examples, 80, "drop", "train")
    assert len(dropped) == 1 and BYTE.decode(dropped.tokens).endswith("ok")
    with pytest.raises(data.DataError, match=r"every val example is longer than "
                                             r"model.max_seq_len\+1=81 tokens, e.g. .*long\.jsonl "
                                             r"line 2 \(BOS and prompt alone.*: 128 tokens\); "
                                             r"raise model.max_seq_len or shorten the prompts"):
        data.fit_examples(all_examples, np.array([False, True, False]), examples, 80,
                          "truncate", "val")


def test_held_out_chat_records_depend_on_content_not_order(tmp_path):
    records = [openai([("user", "same question"), ("assistant", f"answer {i}")])
               for i in range(40)]
    examples, _ = data.read_instructions(write_jsonl(tmp_path / "c.jsonl", records), "jsonl")
    is_val = data.held_out(examples, 0.1, "c.jsonl")
    assert is_val.sum() == 4
    np.testing.assert_array_equal(data.held_out(examples[::-1], 0.1, "c.jsonl")[::-1], is_val)
    # The hash covers the answers: records sharing a question are not all held out together.
    assert len({e.key for e in examples}) == 40


def test_a_long_conversation_keeps_its_system_and_newest_turns(tmp_path):
    messages = [("system", "S")] + [m for i in range(6) for m in (("user", f"question {i}"),
                                                                  ("assistant", f"answer {i}"))]
    messages.append(("user", "last"))
    full, _ = chat.encode(BYTE, messages, add_generation_prompt=True)
    tokens, kept = chat.fit_prompt(BYTE, messages, context=len(full) - 1)
    # Whole exchanges go, oldest first, the system message stays.
    assert kept == [messages[0]] + messages[3:]
    np.testing.assert_array_equal(tokens, chat.encode(BYTE, kept, True)[0])
    assert BYTE.decode(tokens).endswith("### User:\nlast\n\n### Assistant:\n")
    # Room for the answer is kept when it can be; else the prompt just fits.
    # (An exchange here is 46 tokens: leaving 60 free takes two of them out.)
    _, roomy = chat.fit_prompt(BYTE, messages, context=len(full), room=60)
    assert roomy == [messages[0]] + messages[5:]
    last_only = len(chat.encode(BYTE, [messages[0], messages[-1]], True)[0])
    assert chat.fit_prompt(BYTE, messages, last_only, room=last_only)[1] == [
        messages[0], messages[-1]]
    with pytest.raises(chat.ConversationTooLong, match=r"last turn is \d+ tokens"):
        chat.fit_prompt(BYTE, messages, last_only - 1)


# -------------------------------------------------------------------- generate.py --chat


@pytest.mark.slow
def test_generate_chat_answers_piped_turns_with_the_history(tmp_path, compile_cache):
    import minids_jax
    from minids_jax.training import trainer

    records = [openai([("user", f"What is {i}?"), ("assistant", f"It is {i}.")])
               for i in range(8)]
    workdir = str(tmp_path / "run")
    context, max_new = 128, 6
    config = tiny_config(model=dict(vocab_size=259, max_seq_len=context),
                         optim=dict(total_steps=2),
                         data=dict(source="jsonl", path=write_jsonl(tmp_path / "c.jsonl", records),
                                   val_fraction=0.2))
    trainer.run(config, workdir)

    turns = ["What is 3?", "And 4?", "And 5?"]
    args = [sys.executable, "generate.py", f"--workdir={workdir}", "--chat", "--system=Be brief.",
            "--temperature=0", f"--max_new_tokens={max_new}"]
    env = {**subprocess_env(compile_cache), "PYTHONIOENCODING": "utf-8"}
    run = subprocess.run(args, input="".join(t + "\n" for t in turns).encode(), cwd=REPO,
                         env=env, capture_output=True, timeout=300)
    assert run.returncode == 0, run.stderr.decode()[-2000:]

    # The same conversation through the library: greedy answers, each stopped at EOS and
    # added to the history the next prompt is built from; the third turn no longer fits (with
    # room for an answer) and the oldest exchange is left out.
    model, _ = minids_jax.load(workdir)
    generator = generation.Generator(model)
    history, answers, prompt_lens, kept_lens = [("system", "Be brief.")], [], [], []
    for turn, text in enumerate(turns):
        prompt, history = chat.fit_prompt(BYTE, history + [("user", text)], context, max_new)
        tokens = [int(t[0]) for t in generator.stream(prompt, max_new, generation.Sampling(0.0),
                                                       seed=turn, stop_token=BYTE.EOS)]
        answers.append(BYTE.decode([t for t in tokens if t != BYTE.EOS]))
        kept_lens.append(len(history))
        history.append(("assistant", answers[-1]))
        prompt_lens.append(len(prompt))
    assert kept_lens == [2, 4, 4]  # system + user; + the first exchange; the second only
    assert run.stdout.decode("utf-8") == "".join(a + "\n" for a in answers)
    stderr = run.stderr.decode()
    reported = [int(line.split("prompt ")[1].split(" ")[0])
                for line in stderr.splitlines() if line.startswith("[prompt ")]
    assert reported == prompt_lens
    assert stderr.count("left out its 2 oldest message(s)") == 1

    both = subprocess.run(args + ["--prompt=hi"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert both.returncode == 2 and "--chat reads the user's turns from stdin" in both.stderr
    assert "Traceback" not in both.stderr
