"""Problems as ``nurture validate`` reports them: one per line, ``file:line: key: message``.

A problem is found once, at its source (the playbook key or the template line that
causes it), with a suggestion when a near name exists ("did you mean 'purchase'?").
Pure: no rendering, no database.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass

# ``nurture.yaml:12: scoring.events.page_veiw: ...``: how the playbook loader words its problems.
_LOCATED = re.compile(r"^(?P<file>.+?):(?P<line>\d+): (?P<rest>.*)$", re.DOTALL)
_KEY_PATH = re.compile(r"^(?:\(top level\)|[\w.\-/]+)$")


@dataclass(frozen=True, slots=True)
class Problem:
    """Something a marketer must fix, where it is, and (when there is one) the likely intended value."""

    file: str
    line: int | None
    message: str
    key: str | None = None
    suggestion: str | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line is not None else self.file
        return f"{where}: {self.key}: {self.message}" if self.key else f"{where}: {self.message}"

    def sort_key(self) -> tuple[str, int, str]:
        return (self.file, self.line or 0, str(self))

    def to_json(self) -> dict[str, object]:
        return {
            "file": self.file,
            "line": self.line,
            "key": self.key,
            "message": self.message,
            "suggestion": self.suggestion,
        }


def closest(word: str, candidates: Iterable[str]) -> str | None:
    """The candidate ``word`` is most likely a typo of, or None."""
    found = difflib.get_close_matches(word, sorted(set(candidates)), n=1, cutoff=0.7)
    return found[0] if found else None


def did_you_mean(suggestion: str | None) -> str:
    """`` (did you mean 'purchase'?)``, or nothing."""
    return f" (did you mean {suggestion!r}?)" if suggestion else ""


def from_text(text: str, *, default_file: str) -> Problem:
    """A problem worded ``file:line: key: message`` (the playbook loader's errors) as a Problem."""
    match = _LOCATED.match(text)
    if match is None:
        file, _, rest = text.partition(": ")
        if not rest:
            return Problem(default_file, None, text)
        return Problem(file, None, rest)
    key, sep, message = match["rest"].partition(": ")
    if sep and _KEY_PATH.match(key):
        return Problem(match["file"], int(match["line"]), message, key=key)
    return Problem(match["file"], int(match["line"]), match["rest"])


def unique_sorted(problems: Iterable[Problem]) -> list[Problem]:
    """Each problem once, by file and line."""
    return sorted(dict.fromkeys(problems), key=Problem.sort_key)
