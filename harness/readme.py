"""The shell lines of a Markdown document, as a reader would type them: for
tests that walk the README and run every command in it.

A document is cut into sections at every heading (any level, outside code
fences); a section runs from its heading to the next one. Each ```sh (or
```bash, ```shell) fence in a section gives its lines: backslash
continuations are joined as bash joins them (the backslash and the line
break go, the next line's indentation stays), and a comment (`#` at the
start of a word, outside quotes) is cut off with the whitespace before it.
Lines left empty, such as comment lines, are dropped. Other fences (```python,
```json, plain ```) give none."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

SHELL_LANGUAGES = frozenset({"sh", "bash", "shell", "console"})
_HEADING = re.compile(r"^(#{1,6})\s+(.+?)\s*#*\s*$")
_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w+-]*)")


@dataclass(frozen=True)
class ShellLine:
    """One command: `text` with continuations joined and the comment cut;
    `comment` is what the comment said (without the `#`), `number` the line
    of the document (1-based) it starts on."""

    text: str
    comment: str
    number: int
    section: str


@dataclass
class Section:
    title: str
    level: int
    number: int  # the heading's line, 1-based
    blocks: list[list[ShellLine]] = field(default_factory=list)

    @property
    def lines(self) -> list[ShellLine]:
        return [line for block in self.blocks for line in block]


class ReadmeError(ValueError):
    """The document cannot be read as shell lines (an unclosed fence or quote)."""


def split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of one logical shell line: `#` starts a comment
    only at the start of a word and outside quotes, as in bash, so
    `"a # b"`, `'#'`, `a#b` and `\\#` stay. Raises ReadmeError for a quote
    left open."""
    quote = ""
    escaped = False
    for index, char in enumerate(line):
        if escaped:
            escaped = False
        elif quote == "'":
            if char == "'":
                quote = ""
        elif char == "\\":
            escaped = True
        elif quote == '"':
            if char == '"':
                quote = ""
        elif char in "'\"":
            quote = char
        elif char == "#" and (index == 0 or line[index - 1].isspace()):
            return line[:index].rstrip(), line[index + 1 :].strip()
    if quote:
        raise ReadmeError(f"unclosed {quote} in: {line}")
    return line.rstrip(), ""


def shell_lines(text: str, first_number: int = 1, section: str = "") -> list[ShellLine]:
    """The commands of one fenced block's text (without the fences);
    `first_number` is the document line of its first line."""
    result: list[ShellLine] = []
    pending = ""
    start = first_number
    for offset, raw in enumerate(text.splitlines()):
        if not pending:
            start = first_number + offset
        joined = pending + raw
        stripped = joined.lstrip()
        # A backslash ends a comment line too, but joins nothing there.
        if joined.endswith("\\") and not stripped.startswith("#"):
            pending = joined[:-1]
            continue
        pending = ""
        command, comment = split_comment(joined)
        if command.strip():
            result.append(ShellLine(command.strip(), comment, start, section))
    if pending:
        raise ReadmeError(f"line {start}: a continuation backslash ends the block")
    return result


def sections(markdown: str) -> list[Section]:
    """Every section of the document, in order, with its shell blocks. The
    text before the first heading is a section titled ""."""
    found = [Section("", 0, 0)]
    fence = ""
    language = ""
    body: list[str] = []
    body_start = 0
    for number, line in enumerate(markdown.splitlines(), start=1):
        if fence:
            if line.strip().startswith(fence) and line.strip().strip(fence[0]) == "":
                if language in SHELL_LANGUAGES:
                    section = found[-1]
                    section.blocks.append(shell_lines("\n".join(body), body_start, section.title))
                fence = ""
            else:
                body.append(line)
            continue
        opened = _FENCE.match(line.strip())
        if opened:
            fence, language = opened.group(1), opened.group(2).lower()
            body, body_start = [], number + 1
            continue
        heading = _HEADING.match(line)
        if heading:
            found.append(Section(heading.group(2), len(heading.group(1)), number))
    if fence:
        raise ReadmeError(f"a {fence} fence opened at line {body_start - 1} is never closed")
    return found


def section(all_sections: list[Section], title: str) -> Section:
    """The one section with this title; KeyError naming the titles there are."""
    matches = [s for s in all_sections if s.title == title]
    if len(matches) != 1:
        titles = ", ".join(repr(s.title) for s in all_sections if s.title)
        raise KeyError(f"{len(matches)} sections titled {title!r}; there are: {titles}")
    return matches[0]
