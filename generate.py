"""Sample text from a trained run, printing tokens as they are made.

    python generate.py --workdir runs/tiny --prompt "def " --max_new_tokens 200 \
        --temperature 0.8 --top_k 50 --top_p 0.95 --seed 0

The prompt is echoed, then the continuation streams to stdout; timings go to stderr. The
latest checkpoint is used unless --step names another; the run's own tokenizer encodes the
prompt. --temperature 0 decodes greedily.
"""

import sys
import time

from absl import flags

from minids_jax import cli

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


def main(argv):
    del argv
    import minids_jax
    from minids_jax import data, generation
    from minids_jax.errors import UserError

    try:
        sampling = generation.Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value)
    except ValueError as error:
        raise UserError(f"--{error}") from error
    model, config = minids_jax.load(_WORKDIR.value, step=_STEP.value)
    tokenizer = data.load_tokenizer(config, _WORKDIR.value)
    prompt = generation.prompt_tokens(tokenizer, _PROMPT.value, _INSTRUCTION.value, _INPUT.value)
    shown = _PROMPT.value if _INSTRUCTION.value is None else tokenizer.decode(prompt)

    generator = generation.Generator(model)
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
    # Token 1 comes from the prefill, token 2 from the first decode step: both compile.
    count, rate = len(token_times), float("nan")
    if count > 2 and token_times[-1] > token_times[1]:
        rate = (count - 2) / (token_times[-1] - token_times[1])
    print(f"[{count} tokens in {time.perf_counter() - start:.1f}s | "
          f"{rate:.1f} tokens/s once compiled]", file=sys.stderr)

if __name__ == "__main__":
    cli.run(main)
