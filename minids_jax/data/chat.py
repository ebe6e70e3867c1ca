"""Chat data: ShareGPT and OpenAI-messages records -> conversations -> scored token segments.

A conversation is an optional leading system message, then user and assistant turns. A template
lays it out as segments: text, or one special token id, each scored or not. Only the assistant
turns, and the token that ends each, are scored. The template is

- the `chat_template` of an imported Hugging Face tokenizer (Jinja, rendered as transformers'
  `apply_chat_template` renders it). The answers are found by rendering incrementally: the
  conversation before answer k with the generation prompt, and through answer k, are prefixes of
  the whole; the text between them is answer k, scored through the template's end-of-turn token.
- otherwise the project's own, in the style of the alpaca prompt (`instructions.format_prompt`):

  [BOS] "### System:\\n{system}\\n\\n" "### User:\\n{user}\\n\\n" "### Assistant:\\n" {answer} [EOS]
        "### User:\\n{user}\\n\\n" "### Assistant:\\n" {answer} [EOS] ...

  (the System section only when there is a system message).

Generation renders the same segments with the generation prompt, so a model is prompted exactly
as it was trained.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
from typing import Union

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox
import numpy as np

from minids_jax.data.corpus import DataError

Message = tuple[str, str]  # (role, content); role: "system", "user" or "assistant"
Segment = tuple[Union[str, int], bool]  # (text or one token id, scored)

_ROLES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
          "gpt": "assistant"}
# record key -> (role field, content field, its role names, an example record)
_FORMATS = {
    "conversations": ("from", "value", ("system", "human", "gpt"),
                      '{"conversations": [{"from": "human", "value": "Hi."}, '
                      '{"from": "gpt", "value": "Hello!"}]}'),
    "messages": ("role", "content", ("system", "user", "assistant"),
                 '{"messages": [{"role": "user", "content": "Hi."}, '
                 '{"role": "assistant", "content": "Hello!"}]}'),
}


class TemplateError(ValueError):
    """A chat template failed to render a conversation, or does not render it incrementally."""


@dataclasses.dataclass(frozen=True)
class Conversation:
    """One chat record: the model learns every assistant turn given the turns before it."""

    messages: tuple[Message, ...]
    where: str  # e.g. "train.jsonl line 7", for messages

    @property
    def text(self) -> str:
        """Its text in the project's template (what a BPE tokenizer is trained on)."""
        return "".join(p for p, _ in SimpleTemplate.layout(self.messages, 0, 0)
                       if isinstance(p, str))

    @property
    def key(self) -> str:
        """Its content, for the held-out hash."""
        return json.dumps(self.messages, ensure_ascii=False)


def is_chat(record) -> bool:
    return isinstance(record, dict) and any(key in record for key in _FORMATS)


def conversation(record: dict, where: str) -> Conversation:
    """The conversation of a ShareGPT or OpenAI-messages record; DataError if malformed."""
    key = "conversations" if "conversations" in record else "messages"
    role_key, content_key, names, example = _FORMATS[key]
    turns = record[key]
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if isinstance(turns, list) else f"a {type(turns).__name__}"
        raise DataError(f"{where}: {key!r} must be a non-empty list of turns, got {got}; "
                        f"e.g. {example}.")
    messages = []
    for i, turn in enumerate(turns):
        at = f"{where}, {key}[{i}]"
        if not isinstance(turn, dict):
            raise DataError(f"{at} is a {type(turn).__name__}, not an object with {role_key!r} "
                            f"and {content_key!r}; e.g. {example}.")
        role = turn.get(role_key)
        if not isinstance(role, str) or role not in _ROLES:
            shown = f"{role_key}={role!r}" if role_key in turn else f"no {role_key!r} field"
            raise DataError(f"{at} has {shown}; set {role_key!r} to one of "
                            f"{', '.join(map(repr, names))}.")
        if content_key not in turn:
            raise DataError(f"{at} has no {content_key!r} field; every turn needs its text, "
                            f"e.g. {example}.")
        content = turn[content_key]
        if not isinstance(content, str):
            raise DataError(f"{at}: {content_key!r} must be a string, got "
                            f"{type(content).__name__}; convert it to text (content in parts "
                            f"is not supported).")
        if _ROLES[role] == "system" and i:
            raise DataError(f"{at} is a system message after the first turn; only the first "
                            f"turn may be one: move it to the start or merge it into the first.")
        messages.append((_ROLES[role], content))
    if all(role != "assistant" for role, _ in messages):
        raise DataError(f"{where} has no assistant turn, so it holds nothing to learn; add the "
                        f"answer as a {role_key!r}: {names[2]!r} turn, or remove the record.")
    return Conversation(tuple(messages), where)


# ------------------------------------------------------------------------------ templates


class SimpleTemplate:
    """The project's template: `### System:` / `### User:` / `### Assistant:` sections, each
    answer followed by EOS (the end of a turn), BOS first."""

    kind = "simple-v1"

    def __init__(self, tokenizer):
        self.bos, self.eos = tokenizer.BOS, tokenizer.EOS
        self.end_token = tokenizer.EOS

    @staticmethod
    def layout(messages, bos: int, eos: int, add_generation_prompt=False) -> list[Segment]:
        out, scaffold = [(bos, False)], ""
        for role, content in messages:
            if role == "assistant":
                out += [(scaffold + "### Assistant:\n", False), (content, True), (eos, True)]
                scaffold = ""
            else:
                scaffold += f"### {role.title()}:\n{content}\n\n"
        return out + [(scaffold + ("### Assistant:\n" if add_generation_prompt else ""), False)]

    def segments(self, messages, add_generation_prompt=False) -> list[Segment]:
        return self.layout(messages, self.bos, self.eos, add_generation_prompt)


class _Generation(jinja2.ext.Extension):
    """transformers' `{% generation %}` block, which marks assistant text: rendered as is
    (the answers are found by incremental rendering instead)."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


@functools.lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    """A template in the environment transformers gives chat templates (sandboxed, same helpers)."""

    def raise_exception(message):
        raise jinja2.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _Generation])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as error:
        raise TemplateError(f"the tokenizer's chat_template does not compile: {error}") from None


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if a[:mid] == b[:mid] else (lo, mid)
    return lo


class JinjaTemplate:
    """An imported Hugging Face tokenizer's chat template."""

    kind = "jinja-v1"

    def __init__(self, tokenizer):
        self.template = _compile(tokenizer.chat_template)
        self.variables = dict(tokenizer.special_tokens)  # bos_token, eos_token, ...
        self.end_token = self._end_token(tokenizer)
        self.end_text = tokenizer.hf.id_to_token(self.end_token) or "\0"

    def render(self, messages, add_generation_prompt: bool) -> str:
        try:
            return self.template.render(
                messages=[{"role": role, "content": content} for role, content in messages],
                add_generation_prompt=add_generation_prompt, **self.variables)
        except (jinja2.TemplateError, TypeError) as error:  # (TypeError: e.g. str + None)
            raise TemplateError(f"the tokenizer's chat_template failed: {error}") from None

    def _end_token(self, tokenizer, probe="Hello.") -> int:
        """The first special token after a probe answer ends an assistant turn (EOS if none)."""
        try:
            prompt = self.render([("user", "Hi.")], True)
            whole = self.render([("user", "Hi."), ("assistant", probe)], False)
        except TemplateError:
            return tokenizer.EOS
        tail = whole[_common_prefix(prompt, whole):]
        after = tail[tail.find(probe) + len(probe):] if probe in tail else tail
        return next((int(t) for t in tokenizer.encode(after) if int(t) in tokenizer.special_ids),
                    tokenizer.EOS)

    def segments(self, messages, add_generation_prompt=False) -> list[Segment]:
        whole = self.render(messages, add_generation_prompt)
        out, done = [], 0
        for k, (role, _) in enumerate(messages):
            if role != "assistant":
                continue
            # The generation prompt may differ from how a past answer opens (a reasoning
            # template's "<think>"): the answer starts where the two part.
            start = _common_prefix(self.render(messages[:k], True), whole)
            through = self.render(messages[:k + 1], False)
            if (not whole.startswith(through) or start < done or start > len(through)
                    or start < len(self.render(messages[:k], False))):
                raise TemplateError(
                    f"the tokenizer's chat_template does not render message {k} (an assistant "
                    f"turn) as a continuation of the messages before it, so its answer cannot "
                    f"be told apart from the scaffolding; use another template (e.g. a "
                    f"tokenizer_config.json without chat_template: the project's own).")
            answer = whole[start:len(through)]
            cut = answer.rfind(self.end_text)
            cut = len(answer) if cut < 0 else cut + len(self.end_text)
            out += [(whole[done:start], False), (answer[:cut], True), (answer[cut:], False)]
            done = len(through)
        return out + [(whole[done:], False)]


def template_kind(tokenizer) -> str:
    return (JinjaTemplate if getattr(tokenizer, "chat_template", None) else SimpleTemplate).kind


def template_for(tokenizer) -> SimpleTemplate | JinjaTemplate:
    """The tokenizer's own chat template if it has one (an imported Hugging Face tokenizer),
    else the project's."""
    return JinjaTemplate(tokenizer) if getattr(tokenizer, "chat_template", None) \
        else SimpleTemplate(tokenizer)


# ------------------------------------------------------------------------------- encoding


def encode_segments(tokenizer, examples: list[list[Segment]]) -> list[tuple[np.ndarray,
                                                                              np.ndarray]]:
    """(tokens int32, scored bool) of each example's segments. Each text segment is encoded on
    its own (all in one batch), so a piece tokenizes alike in training and in generation."""
    texts = [piece for segments in examples for piece, _ in segments
             if isinstance(piece, str) and piece]
    encoded = iter(tokenizer.encode_batch(texts) if texts else [])
    out = []
    for segments in examples:
        tokens, scored = [np.zeros(0, np.int32)], [np.zeros(0, bool)]
        for piece, score in segments:
            if isinstance(piece, str):
                if not piece:
                    continue
                ids = np.asarray(next(encoded), np.int32)
            else:
                ids = np.array([piece], np.int32)
            tokens.append(ids)
            scored.append(np.full(len(ids), score))
        out.append((np.concatenate(tokens), np.concatenate(scored)))
    return out


def encode(tokenizer, messages, add_generation_prompt=False, template=None):
    """(tokens, scored) of one conversation; with `add_generation_prompt`, what precedes the
    model's answer to its last (user) turn."""
    template = template or template_for(tokenizer)
    return encode_segments(tokenizer, [template.segments(list(messages),
                                                         add_generation_prompt)])[0]


class ConversationTooLong(ValueError):
    """Not even the last turn fits."""


def fit_prompt(tokenizer, messages: list[Message], context: int, room: int = 0,
               template=None) -> tuple[np.ndarray, list[Message]]:
    """The generation prompt of `messages` (which end with a user turn), and the messages it
    holds: the oldest turns after the system message are left out, from a user turn on, until
    the prompt leaves `room` of the `context` tokens free for the answer (or, if not even the
    last turn leaves that much, until it fits at all)."""
    template = template or template_for(tokenizer)
    system = 1 if messages and messages[0][0] == "system" else 0
    fallback = None
    for first in range(system, len(messages)):
        if first > system and messages[first][0] != "user":
            continue
        kept = messages[:system] + messages[first:]
        tokens, _ = encode(tokenizer, kept, True, template)
        if len(tokens) <= context - room:
            return tokens, kept
        if fallback is None and len(tokens) <= context:
            fallback = tokens, kept
    if fallback is None:
        raise ConversationTooLong(
            f"the last turn is {len(tokens)} tokens with the template, more than the context of "
            f"{context}; shorten it (or use a model with a longer model.max_seq_len).")
    return fallback
