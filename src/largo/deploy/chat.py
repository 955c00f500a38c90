"""Chat messages as a prompt: an imported instruct model's own chat template (torch-free).

A Hugging Face instruct model (Qwen2.5-Instruct, Llama 3 Instruct, …) was fine-tuned on conversations
laid out by the Jinja template in its tokenizer_config.json (or chat_template.jinja). `largo import`
keeps it in the bundle (chat_template.json: the template and the special-token strings it reads), and
`ChatTemplate.render` lays a list of messages out as transformers' `apply_chat_template` does, ending
with the assistant's turn opened, so the model writes the answer. The template is compiled once, when
the bundle is read (a template that does not compile is refused at import), and runs in Jinja's
sandbox (it is data from the folder, not code to trust) with what transformers gives templates:
loop controls, `{% generation %}`, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII
text, and the special tokens (`bos_token`, `eos_token`, `pad_token`, `unk_token`).
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = "chat_template.json"  # in a bundle: {"template": …, "tokens": {"bos_token": …, …}}
TOKEN_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatPrompt(str):
    """A prompt a chat template laid out: the model reads its tokens as they are, with no
    beginning-of-text token put first (the template writes one where the model wants it, and
    transformers tokenizes a template's text without special tokens too)."""


class TemplateRaised(ValueError):
    """The template's own `raise_exception` (e.g. roles out of order): its message is the reason."""


def _token_text(value: Any) -> str | None:
    """A tokenizer_config.json special token: a string, or an AddedToken dict with its `content`."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_hf_chat(folder: Path) -> ChatTemplate | None:
    """A Hugging Face folder's chat template with the special-token strings it reads; None when it has
    none; ValueError when it does not compile. The template is chat_template.jinja, else
    tokenizer_config.json's `chat_template` (a string, or named templates: "default"); the tokens are
    tokenizer_config.json's (one it does not name renders as "", as in transformers)."""
    config_file = folder / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
    file = folder / "chat_template.jinja"
    template = file.read_text(encoding="utf-8") if file.is_file() else config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if not isinstance(template, str) or not template.strip():
        return None
    return ChatTemplate(template, {name: _token_text(config.get(name)) or "" for name in TOKEN_NAMES})


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """The messages as a list of dicts with a string role and a string content (other keys, such as a
    tool call's, are kept for the template); ValueError naming the first that is not."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages.{i}: an object with string role and content")
    return [dict(m) for m in messages]


def _raise(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _environment() -> Any:
    """Jinja's immutable sandbox as transformers sets it up for chat templates."""
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}…{% endgeneration %}` (marks the assistant's text for training masks in
        transformers): its body as it is."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template with its special-token strings; ValueError when it does not compile."""

    def __init__(self, template: str, tokens: dict[str, str]):
        from jinja2 import TemplateError

        self.source, self.tokens = template, {name: tokens.get(name) or "" for name in TOKEN_NAMES}
        try:
            self.compiled = _environment().from_string(template)
        except TemplateError as e:
            raise ValueError(f"the chat template does not compile: {e}") from None

    @classmethod
    def read(cls, bundle: Path) -> ChatTemplate | None:
        """A bundle's chat_template.json, or None when it has none."""
        file = bundle / CHAT_TEMPLATE
        if not file.is_file():
            return None
        data = json.loads(file.read_text(encoding="utf-8"))
        return cls(data["template"], data.get("tokens") or {})

    def write(self, bundle: Path) -> None:
        """Write chat_template.json into a bundle folder."""
        record = {"template": self.source, "tokens": self.tokens}
        (bundle / CHAT_TEMPLATE).write_text(
            json.dumps(record, ensure_ascii=False, indent=1), encoding="utf-8"
        )

    def render(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> ChatPrompt:
        """The prompt text of `messages`, the assistant's turn opened (unless not
        `add_generation_prompt`); ValueError when the template refuses them (its own message) or fails
        on them."""
        checked = check_messages(messages)
        try:
            text = self.compiled.render(
                messages=checked,
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.tokens,
            )
        except TemplateRaised:
            raise
        except Exception as e:  # noqa: BLE001 - a template is someone else's code: any failure is its
            raise ValueError(f"the chat template failed: {type(e).__name__}: {e}") from None
        return ChatPrompt(text)

    def turn_end(self, messages: list[dict[str, Any]]) -> str:
        """What the template writes after the last turn's content ("<|im_end|>\n" for ChatML,
        "<|eot_id|>" for Llama 3): the whole conversation laid out, less the prompt before the last
        turn and its content; "" when the layout does not split so."""
        whole = self.render(messages, add_generation_prompt=False)
        before = self.render(messages[:-1]) + messages[-1]["content"]
        return whole[len(before) :] if whole.startswith(before) else ""
