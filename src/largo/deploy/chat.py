"""Chat messages as a prompt: an imported instruct model's own chat template (torch-free).

A Hugging Face instruct model (Qwen2.5-Instruct, Llama 3 Instruct, …) was fine-tuned on conversations
laid out by the Jinja template in its tokenizer_config.json (or chat_template.jinja). `largo import`
copies it into the bundle as chat_template.jinja; `render_chat` lays a list of messages out the same way
and ends with the assistant's turn opened (`add_generation_prompt`), so the model writes the answer.
The template runs in Jinja's sandbox (a template is data from the folder, not code to trust), with
what transformers gives templates: `raise_exception`, `strftime_now` and a `tojson` that keeps non-ASCII
text as it is.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

CHAT_TEMPLATE = "chat_template.jinja"  # in a bundle: the template of an imported instruct model


def read_hf_chat_template(folder: Path) -> str | None:
    """A Hugging Face folder's chat template: chat_template.jinja, else tokenizer_config.json's
    `chat_template` (a string, or a list of named templates: the one named "default"); None if none."""
    file = folder / CHAT_TEMPLATE
    if file.is_file():
        return file.read_text(encoding="utf-8")
    config = folder / "tokenizer_config.json"
    if not config.is_file():
        return None
    template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) and template.strip() else None


def check_messages(messages: Any) -> list[dict[str, str]]:
    """The messages as a list of {"role", "content"} string pairs; ValueError naming the first that is
    not one."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages: a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise ValueError(f"messages.{i}: an object with string role and content")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _raise(message: str) -> None:
    raise ValueError(message)


def render_chat(template: str, messages: list[dict[str, str]], bos_token: str, eos_token: str) -> str:
    """The prompt text of `messages` laid out by `template`, the assistant's turn opened; ValueError
    when the template refuses them (its own `raise_exception`, e.g. roles out of order)."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template).render(
            messages=check_messages(messages),
            add_generation_prompt=True,
            bos_token=bos_token,
            eos_token=eos_token,
            tools=None,
        )
    except TemplateError as e:
        raise ValueError(f"the chat template failed: {e}") from None
