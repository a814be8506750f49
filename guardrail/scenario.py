"""Parse the scenario document: the one Markdown file in which a bot owner lists what the bot is for.

    # <assistant name>
    <one or more lines: what the assistant is for>
    ## Scenarios
    - <one scenario per bullet>
    ## Examples                  (optional: typical on-topic user messages)
    - ...
    ## Off-topic examples        (optional: messages that must be refused)
    - ...

Parsing is strict: anything else is a ``ScenarioError`` naming the file and line.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

from guardrail.errors import ScenarioError

_SECTIONS = {"scenarios": "scenarios", "examples": "examples", "off-topic examples": "off_topic"}
_BULLETS = ("- ", "* ", "+ ")


@dataclass(frozen=True)
class ScenarioDocument:
    """What a bot is for: its name, description, scenarios and optional example messages."""

    title: str
    description: str
    scenarios: tuple[str, ...]
    examples: tuple[str, ...] = ()
    off_topic: tuple[str, ...] = ()
    path: str = "<string>"
    digest: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        """A short name for labels and logs: the file's stem, or the title."""
        return Path(self.path).stem if self.path != "<string>" else self.title


def load_scenario(path: str | Path) -> ScenarioDocument:
    """Read and parse the scenario document at ``path``."""
    try:
        # utf-8-sig: editors on Windows often save a byte-order mark first.
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"cannot read the scenario document: {exc}", str(path)) from exc
    return parse_scenario(text, str(path))


def parse_scenario(text: str, path: str = "<string>") -> ScenarioDocument:
    """Parse a scenario document's text; ``path`` is only used in error messages."""
    title: str | None = None
    description: list[str] = []
    # Each section's bullets with the line each starts on, and the line of the section's heading.
    sections: dict[str, list[tuple[str, int]]] = {}
    headings: dict[str, int] = {}
    current: str | None = None
    last_bullet_line = 0
    lines = text.removeprefix("\ufeff").splitlines()

    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or (line.startswith("<!--") and line.endswith("-->")):
            continue
        if title is None:
            if not line.startswith("# ") or not line[2:].strip():
                raise ScenarioError(
                    "the document must start with a title line: '# <assistant name>'", path, number
                )
            title = line[2:].strip()
            continue
        if line.startswith("#"):
            if not line.startswith("## "):
                raise ScenarioError(f"unexpected heading {line!r}: sections are '## <name>'", path, number)
            name = line[3:].strip().rstrip(":").lower()
            if name not in _SECTIONS:
                known = ", ".join(f"'## {s.capitalize()}'" for s in _SECTIONS)
                raise ScenarioError(f"unknown section {line!r}; expected one of {known}", path, number)
            current = _SECTIONS[name]
            if current in sections:
                raise ScenarioError(f"section {line!r} appears twice", path, number)
            sections[current] = []
            headings[current] = number
            continue
        if current is None:
            description.append(line)
            continue
        if line in ("-", "*", "+") or line.startswith(_BULLETS):
            item = line[1:].strip()
            if not item:
                raise ScenarioError("empty bullet", path, number)
            sections[current].append((item, number))
            last_bullet_line = number
        elif raw[:1].isspace() and last_bullet_line == number - 1 and sections[current]:
            # An indented line right under a bullet continues it, as in Markdown.
            item, start = sections[current][-1]
            sections[current][-1] = (f"{item} {line}", start)
            last_bullet_line = number
        else:
            raise ScenarioError(f"expected a '- ' bullet in this section, got {line!r}", path, number)

    if title is None:
        raise ScenarioError("the document is empty: it needs a '# <assistant name>' title", path, 1)
    if "scenarios" not in sections:
        raise ScenarioError("the document has no '## Scenarios' section", path, max(len(lines), 1))
    if not sections["scenarios"]:
        raise ScenarioError(
            "the '## Scenarios' section needs at least one '- ' bullet", path, headings["scenarios"]
        )
    for bullets in sections.values():
        _check_duplicates(bullets, path)
    return ScenarioDocument(
        title=title,
        description=" ".join(description),
        scenarios=_texts(sections["scenarios"]),
        examples=_texts(sections.get("examples", [])),
        off_topic=_texts(sections.get("off_topic", [])),
        path=path,
        digest=hashlib.sha256(text.encode()).hexdigest()[:16],
    )


def _texts(bullets: list[tuple[str, int]]) -> tuple[str, ...]:
    return tuple(item for item, _ in bullets)


def _check_duplicates(bullets: list[tuple[str, int]], path: str) -> None:
    first: dict[str, int] = {}
    for item, number in bullets:
        key = " ".join(item.casefold().split())
        if key in first:
            raise ScenarioError(f"duplicate bullet {item!r} (first on line {first[key]})", path, number)
        first[key] = number
