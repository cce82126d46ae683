"""Prompt templates as files, and their loader.

A template is a text file in this folder. Lines ``<|system|>``, ``<|user|>`` and ``<|assistant|>``
start a chat message, so a file holds a whole conversation, few-shot turns included. Fields are
``$name`` (``string.Template``), so code with braces in a prompt needs no escaping; ``$$`` is a
literal dollar sign.
"""

from __future__ import annotations

import re
from functools import cache
from importlib import resources
from string import Template

from agentkit.errors import ConfigError

ROLE_LINE = re.compile(r"^<\|(system|user|assistant)\|>[ \t]*\n", re.MULTILINE)


@cache
def load_prompt(name: str) -> str:
    """The raw text of ``prompts/<name>`` (``.txt`` or ``.md`` may be left off)."""
    folder = resources.files(__name__)
    for candidate in (name, f"{name}.txt", f"{name}.md"):
        path = folder / candidate
        if path.is_file():
            return path.read_text(encoding="utf-8")
    raise ConfigError(f"no prompt named {name!r} in agentkit/prompts; check the name")


def render(text: str, **fields: object) -> str:
    """Substitute ``$field``; a missing field is an error, not a silent blank."""
    try:
        return Template(text).substitute({k: str(v) for k, v in fields.items()})
    except KeyError as error:
        raise ConfigError(f"prompt field {error} was not given") from None


def load_messages(name: str, **fields: object) -> list[dict[str, str]]:
    """The chat messages of a template file, with ``fields`` substituted."""
    text = load_prompt(name)
    parts = ROLE_LINE.split(text)
    if parts[0].strip() or len(parts) < 3:
        raise ConfigError(f"prompt {name!r} must start with a <|system|> or <|user|> line")
    roles, bodies = parts[1::2], parts[2::2]
    return [
        {"role": role, "content": render(body.strip("\n"), **fields)}
        for role, body in zip(roles, bodies)
    ]
