"""The Ollama `Modelfile` beside an exported `model.gguf` (docs/serving.md).

    write_modelfile(out_dir, chat_template=..., bos_text=..., add_bos=..., eos_text=...,
                    num_ctx=...)

Ollama does not run Jinja: its TEMPLATE is a Go text/template over `.Messages`. The chat
templates this project's families ship (R1-Distill's and DeepSeek-V3's `<｜User｜>` /
`<｜Assistant｜>`, deepseek-llm-7b-chat's and V2-Chat's `User: ` ... `Assistant:`, and the
project's own `### User:` sections) wrap each message in a fixed prefix and suffix by role,
with a fixed generation prompt. Those pieces are read off the Jinja template by rendering
probe conversations, and the translation is kept only if it renders probe conversations
exactly as the Jinja does; any other template gets a Modelfile without TEMPLATE and a logged
sentence saying to write one. BOS is printed by the template only where the tokenizer does
not add it (Ollama adds it when the GGUF's `add_bos_token` is true).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

from minids_jax.data import chat

MODELFILE = "Modelfile"
ROLES = ("system", "user", "assistant")
# Probe contents: distinct, and free of what a template might treat specially.
PROBES = {"system": "Sys probe", "user": "User probe one", "assistant": "Answer probe one",
          "user2": "User probe two"}


@dataclasses.dataclass(frozen=True)
class TurnFormat:
    """A chat template that wraps each message in fixed text by role."""

    lead: str  # before the first message (the template's BOS)
    wraps: dict[str, tuple[str, str]]  # role -> (prefix, suffix); no "system": refused
    generation: str  # the generation prompt

    def render(self, messages: list[tuple[str, str]], add_generation_prompt: bool) -> str:
        """What the Go template renders (the Jinja's text, if the translation is right)."""
        out = self.lead
        for role, content in messages:
            prefix, suffix = self.wraps[role]
            out += prefix + content + suffix
        if add_generation_prompt and messages and messages[-1][0] != "assistant":
            out += self.generation
        return out


def turn_format(jinja: str, bos_text: str | None, eos_text: str) -> TurnFormat | None:
    """The template's pieces, or None if it is not a fixed wrapper by role."""
    def render(messages, add_generation_prompt=False):
        return chat._compile(jinja).render(
            messages=[{"role": role, "content": content} for role, content in messages],
            add_generation_prompt=add_generation_prompt, bos_token=bos_text or "",
            eos_token=eos_text)

    user, answer, user2 = (("user", PROBES["user"]), ("assistant", PROBES["assistant"]),
                           ("user", PROBES["user2"]))
    try:
        first = render([user])
        with_answer = render([user, answer])
        two_users = render([user, answer, user2])
        generation = render([user], True)
        lead_and_prefix, user_suffix = first.split(PROBES["user"])
        answer_prefix, answer_suffix = with_answer[len(first):].split(PROBES["assistant"])
        user_prefix = two_users[len(with_answer):].split(PROBES["user2"])[0]
        if not (lead_and_prefix.endswith(user_prefix) and with_answer.startswith(first)
                and two_users.startswith(with_answer) and generation.startswith(first)):
            return None
        wraps = {"user": (user_prefix, user_suffix),
                 "assistant": (answer_prefix, answer_suffix)}
        fmt = TurnFormat(lead_and_prefix[:len(lead_and_prefix) - len(user_prefix)], wraps,
                         generation[len(first):])
        system = _system_wrap(render, fmt)
        if system is not None:
            fmt = dataclasses.replace(fmt, wraps={**wraps, "system": system})
        probes = [[user, answer, user2]]
        if system is not None:
            probes.append([("system", PROBES["system"]), user, answer, user2])
        if all(render(p, True) == fmt.render(p, True) for p in probes):
            return fmt
    except Exception:  # a template may raise anything on a probe: then it is not translated
        return None
    return None


def _system_wrap(render, fmt: TurnFormat) -> tuple[str, str] | None:
    """(prefix, suffix) of a leading system message, None if the template refuses one."""
    try:
        text = render([("system", PROBES["system"]), ("user", PROBES["user"])])
    except Exception:  # a template may refuse a system message by raising
        return None
    body = text[len(fmt.lead):] if text.startswith(fmt.lead) else None
    user_start = fmt.wraps["user"][0] + PROBES["user"]
    if body is None or PROBES["system"] not in body or user_start not in body:
        return None
    prefix, rest = body.split(PROBES["system"], 1)
    return prefix, rest[:rest.index(user_start)]


def _go_text(text: str) -> str:
    """Literal text inside a Go template (`{{` would start an action)."""
    return text.replace("{{", '{{ "{{" }}')


def go_template(fmt: TurnFormat, print_lead: bool) -> str:
    """Ollama's TEMPLATE for `fmt`: each message wrapped by role; the last message, if not
    an answer, followed by the generation prompt; an answer being continued left open."""
    branches = []
    for role in ROLES:
        if role not in fmt.wraps:
            continue
        prefix, suffix = map(_go_text, fmt.wraps[role])
        close = f"{{{{ if not $last }}}}{suffix}{{{{ end }}}}" if role == "assistant" else suffix
        branches.append(f'if eq .Role "{role}" }}}}{prefix}{{{{ .Content }}}}{close}')
    return ((_go_text(fmt.lead) if print_lead else "")
            + "{{ range $i, $_ := .Messages }}"
            + "{{ $last := eq (len (slice $.Messages $i)) 1 }}"
            + "{{ " + "{{ else ".join(branches) + "{{ end }}"
            + f'{{{{ if and $last (ne .Role "assistant") }}}}{_go_text(fmt.generation)}'
            + "{{ end }}{{ end }}")


def stop_words(fmt: TurnFormat | None, eos_text: str) -> list[str]:
    """The EOS token, and the role markers: a model that starts a new turn is done."""
    words = [eos_text]
    if fmt is not None:
        words += [fmt.wraps[role][0].strip() for role in ("user", "assistant")]
    return list(dict.fromkeys(word for word in words if word))


def write_modelfile(out_dir: pathlib.Path, *, chat_template: str | None,
                    bos_text: str | None, add_bos: bool, eos_text: str, num_ctx: int,
                    log: Callable[[str], None] = print) -> pathlib.Path:
    fmt = turn_format(chat_template, bos_text, eos_text) if chat_template else None
    lines = ["FROM ./model.gguf"]
    if fmt is not None:
        template = go_template(fmt, print_lead=not add_bos)
        if '"""' in template:
            fmt = None
        else:
            lines.append(f'TEMPLATE """{template}"""')
    if fmt is None:
        log("the chat template is not one the Modelfile translates (a fixed prefix and "
            "suffix per role); write its TEMPLATE in Ollama's Go syntax before chatting, or "
            "let Ollama pick one from the GGUF's tokenizer.chat_template")
    lines += [f"PARAMETER stop {json.dumps(word, ensure_ascii=False)}"
              for word in stop_words(fmt, eos_text)]
    lines.append(f"PARAMETER num_ctx {num_ctx}")
    path = out_dir / MODELFILE
    path.write_text("\n".join(lines) + "\n")
    return path
