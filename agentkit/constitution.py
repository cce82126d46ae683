"""A constitution: principles, each with a critique request and a revision request.

The file is Markdown: every ``## name`` heading starts a principle, and the lines ``Critique:``
and ``Revision:`` under it hold its two requests (Bai et al. 2022, "Constitutional AI"). Text
before the first heading is a description and is ignored. The default is
``prompts/constitution.md``; ``AGENTKIT_CONSTITUTION=path`` names another.

    constitution = load_constitution()            # AGENTKIT_CONSTITUTION or the default
    constitution.critique_requests()              # the numbered requests, for a prompt
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from agentkit.errors import ConfigError
from agentkit.prompts import load_prompt

HEADING = re.compile(r"^##[ \t]+(.+?)[ \t]*$", re.MULTILINE)
FIELD = re.compile(r"^(Critique|Revision):[ \t]*(.*)$", re.MULTILINE)
MAX_PRINCIPLES = 64
MAX_REQUEST_CHARS = 2000


@dataclass(frozen=True)
class Principle:
    name: str
    critique: str
    revision: str


@dataclass(frozen=True)
class Constitution:
    principles: tuple[Principle, ...]
    source: str = "prompts/constitution.md"

    def names(self) -> list[str]:
        return [p.name for p in self.principles]

    def select(self, names: list[str] | None) -> Constitution:
        """Only the principles called ``names`` (all when None); ConfigError for an unknown one."""
        if not names:
            return self
        unknown = sorted(set(names) - set(self.names()))
        if unknown:
            raise ConfigError(f"no principle {unknown} in {self.source}; it has {self.names()}")
        chosen = tuple(p for p in self.principles if p.name in names)
        return Constitution(chosen, self.source)

    def critique_requests(self) -> str:
        return "\n".join(f"{i}. {p.critique}" for i, p in enumerate(self.principles, 1))

    def revision_requests(self) -> str:
        return "\n".join(f"{i}. {p.revision}" for i, p in enumerate(self.principles, 1))

    def summary(self) -> str:
        """One line per principle: its name and critique request (for judge prompts)."""
        return "\n".join(f"- {p.name}: {p.critique}" for p in self.principles)


def parse_constitution(text: str, source: str = "the constitution") -> Constitution:
    """The principles of a constitution file; ConfigError naming what is missing or repeated."""
    parts = HEADING.split(text)
    principles: list[Principle] = []
    for name, body in zip(parts[1::2], parts[2::2]):
        fields: dict[str, str] = {}
        for kind, value in FIELD.findall(body):
            if kind in fields:
                raise ConfigError(f"{source}: principle {name!r} has two {kind}: lines")
            fields[kind] = value.strip()
        for kind in ("Critique", "Revision"):
            if not fields.get(kind):
                raise ConfigError(f"{source}: principle {name!r} needs a non-empty `{kind}:` line")
            if len(fields[kind]) > MAX_REQUEST_CHARS:
                raise ConfigError(
                    f"{source}: principle {name!r}: the {kind} request is longer than "
                    f"{MAX_REQUEST_CHARS} characters"
                )
        if name in {p.name for p in principles}:
            raise ConfigError(f"{source}: principle {name!r} appears twice; rename one")
        principles.append(Principle(name, fields["Critique"], fields["Revision"]))
    if not principles:
        raise ConfigError(
            f"{source} has no principles: write `## name` headings, each with `Critique:` and "
            "`Revision:` lines"
        )
    if len(principles) > MAX_PRINCIPLES:
        raise ConfigError(f"{source} has more than {MAX_PRINCIPLES} principles")
    return Constitution(tuple(principles), source)


@lru_cache(maxsize=8)
def _load(path: str | None) -> Constitution:
    if path is None:
        return parse_constitution(load_prompt("constitution.md"), "prompts/constitution.md")
    file = Path(path)
    try:
        text = file.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(
            f"cannot read the constitution {file} ({error}); fix AGENTKIT_CONSTITUTION"
        ) from None
    return parse_constitution(text, str(file))


def load_constitution(path: Path | str | None = None) -> Constitution:
    """The constitution at ``path``, else ``AGENTKIT_CONSTITUTION``, else the default one."""
    if path is None:
        from agentkit.settings import get_settings

        path = get_settings().constitution
    return _load(str(path) if path else None)
