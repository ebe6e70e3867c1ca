"""Sample text from a trained run, printing tokens as they are made.

    python generate.py --workdir runs/tiny --prompt "def " --max_new_tokens 200 \
        --temperature 0.8 --top_k 50 --top_p 0.95 --seed 0

The prompt is echoed, then the continuation streams to stdout; timings go to stderr. The
latest checkpoint is used unless --step names another; the run's own tokenizer encodes the
prompt. --temperature 0 decodes greedily.

    python generate.py --workdir runs/chat --chat [--system "Be brief."] < turns.txt

--chat holds a conversation: each line of stdin is a user turn; each answer streams to stdout
(then a newline), the prompt laid out by the chat template the run trained with. Compiled
programs are kept where the run's devices.compile_cache says, so a second call starts sooner.
"""

import itertools
import sys
import time

from absl import flags

from minids_jax import cli
from minids_jax.errors import UserError
from minids_jax.workdir import read_records, saved_compile_cache

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (checkpoints, config.json).",
                               required=True)
_PROMPT = flags.DEFINE_string("prompt", "", "Text to continue; empty starts a new document.")
_MAX_NEW_TOKENS = flags.DEFINE_integer("max_new_tokens", 200, "Tokens to generate.",
                                      lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 50, "Sample among the k likeliest tokens; 0: all.")
_TOP_P = flags.DEFINE_float("top_p", 0.95, "Nucleus: the likeliest tokens up to this mass.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed; the same seed gives the same text.")
_INSTRUCTION = flags.DEFINE_string(
    "instruction", None, "For a model trained on instruction data (jsonl/json): the "
    "instruction, laid out as in training; replaces --prompt.")
_INPUT = flags.DEFINE_string("input", "", "With --instruction: the record's optional input.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step to load (default: the latest).")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop at the end-of-document token.")
_CHAT = flags.DEFINE_bool(
    "chat", False, "Converse: read user turns from stdin, one a line, until EOF; each answer "
    "stops at the template's end-of-turn token and joins the history.")
_SYSTEM = flags.DEFINE_string("system", None, "With --chat: the system message.")


class TextStream:
    """Turns tokens into text as they come, holding back a character cut in the middle
    (a byte-level or BPE token can end inside a multi-byte UTF-8 character)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], 0

    def push(self, token: int, final: bool = False) -> str:
        if token is not None:
            self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        ready = text if final else text.rstrip("\ufffd")
        new, self.shown = ready[self.shown:], max(self.shown, len(ready))
        return new


def _timing(start: float, token_times: list[float], prompt: str = "") -> str:
    # Token 1 comes from the prefill, token 2 from the first decode step: both compile.
    count = len(token_times)
    speed = "too few tokens to time the decoding"
    if count > 2 and token_times[-1] > token_times[1]:
        speed = f"{(count - 2) / (token_times[-1] - token_times[1]):.1f} tokens/s once compiled"
    return f"[{prompt}{count} tokens in {time.perf_counter() - start:.1f}s | {speed}]"


def _check_chat_flags():
    if _CHAT.value:
        given = [f"--{name}" for name in ("prompt", "instruction", "input")
                 if flags.FLAGS[name].present]
        if given:
            raise UserError(f"--chat reads the user's turns from stdin, so {' and '.join(given)} "
                            f"cannot be given with it; drop {given[0]}, or drop --chat.")
    elif _SYSTEM.value is not None:
        raise UserError("--system sets the system message of a --chat conversation; add "
                        "--chat, or drop --system.")


def converse(generator, tokenizer, context: int, sampling) -> None:
    """--chat: one answer per line of stdin, each prompted with the conversation so far."""
    from minids_jax.data import chat

    try:
        template = chat.template_for(tokenizer)
    except chat.TemplateError as error:
        raise UserError(str(error)) from error
    records = read_records(_WORKDIR.value)
    if records.get("alpaca") and not records.get("chat"):
        print("warning: this run was fine-tuned on instruction records (instruction, input, "
              "output), laid out as '### Instruction: ... ### Response:', never on chat turns; "
              "prompt it that way with --instruction for answers like its training",
              file=sys.stderr, flush=True)
    history = [("system", _SYSTEM.value)] if _SYSTEM.value else []
    room = min(_MAX_NEW_TOKENS.value, context // 2)  # kept free for the answer if it can be
    interactive = sys.stdin.isatty()
    for turn in itertools.count():
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            return
        if not line.strip():
            continue
        history.append(("user", line.rstrip("\r\n")))
        try:
            prompt, kept = chat.fit_prompt(tokenizer, history, context, room, template)
        except chat.ConversationTooLong as error:
            print(f"[skipped this turn: {error}]", file=sys.stderr)
            history.pop()
            continue
        except chat.TemplateError as error:
            raise UserError(str(error)) from error
        if len(kept) < len(history):
            print(f"[the conversation outgrew the context of {context} tokens: left out its "
                  f"{len(history) - len(kept)} oldest message(s)]", file=sys.stderr)
            history = kept
        stream, answer = TextStream(tokenizer), []
        start, token_times = time.perf_counter(), []
        for token_B in generator.stream(prompt, _MAX_NEW_TOKENS.value, sampling,
                                        _SEED.value + turn, template.end_token):
            token_times.append(time.perf_counter())
            if int(token_B[0]) == template.end_token:
                break
            answer.append(int(token_B[0]))
            sys.stdout.write(stream.push(answer[-1]))
            sys.stdout.flush()
        sys.stdout.write(stream.push(None, final=True) + "\n")
        sys.stdout.flush()
        history.append(("assistant", tokenizer.decode(answer)))
        print(_timing(start, token_times, f"prompt {len(prompt)} tokens | "),
              file=sys.stderr)


def main(argv):
    del argv
    _check_chat_flags()
    import minids_jax
    from minids_jax import generation, startup
    from minids_jax.config import DevicesConfig
    from minids_jax.data import pipeline as data

    try:
        sampling = generation.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    except ValueError as error:
        raise UserError(f"--{error}") from error
    startup.keep_compiled_programs(DevicesConfig(
        compile_cache=saved_compile_cache(_WORKDIR.value)))
    model, config = minids_jax.load(_WORKDIR.value, step=_STEP.value)
    tokenizer = data.load_tokenizer(config, _WORKDIR.value)
    generator = generation.Generator(model)
    if _CHAT.value:
        return converse(generator, tokenizer, config.model.max_seq_len, sampling)
    prompt = generation.prompt_tokens(tokenizer, _PROMPT.value, _INSTRUCTION.value, _INPUT.value)
    shown = _PROMPT.value if _INSTRUCTION.value is None else tokenizer.decode(prompt)
    try:
        generator.check_prompt(prompt)
    except ValueError as error:  # a prompt too long for the context, or foreign token ids
        raise UserError(str(error)) from error
    stream = TextStream(tokenizer)
    sys.stdout.write(shown)
    sys.stdout.flush()
    start, token_times = time.perf_counter(), []
    for token_B in generator.stream(prompt, _MAX_NEW_TOKENS.value, sampling, _SEED.value,
                                    tokenizer.EOS if _STOP_AT_EOS.value else None):
        token_times.append(time.perf_counter())
        sys.stdout.write(stream.push(int(token_B[0])))
        sys.stdout.flush()
    sys.stdout.write(stream.push(None, final=True) + "\n")
    print(_timing(start, token_times), file=sys.stderr)


if __name__ == "__main__":
    cli.run(main)
