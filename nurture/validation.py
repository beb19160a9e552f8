"""``nurture validate``: the playbook and every template checked together, like a compiler.

Every problem at once, each once at its source (``file:line: key: message``), sorted by
file and line. There are no warnings: each problem is something a marketer must fix
before the change ships, so any problem fails the check (and a pre-commit hook).
Pure and quick (no database, no Prefect): the event kinds already stored, if wanted,
are a parameter the CLI reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nurture.diagnostics import Problem, from_text, unique_sorted
from nurture.errors import PlaybookError
from nurture.playbook import Playbook, load_playbook, missing_templates
from nurture.playbook_checks import check_playbook
from nurture.rendering import EmailRenderer
from nurture.template_checks import check_templates


@dataclass(frozen=True)
class Report:
    """What ``nurture validate`` found, and what it checked."""

    playbook_path: Path
    templates_dir: Path
    problems: list[Problem]
    playbook: Playbook | None = None
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "problems": [p.to_json() for p in self.problems], "summary": self.summary}


def validate_files(
    playbook_path: Path,
    templates_dir: Path,
    *,
    stored_event_kinds: Iterable[str] = (),
    environment: Mapping[str, str] | None = None,
) -> Report:
    """Load the playbook and check it and every template it uses; never raises for bad input.

    ``environment``: the variables set where it will run, to check that every webhook can be signed.
    """
    try:
        playbook = load_playbook(playbook_path)
    except PlaybookError as exc:
        problems = unique_sorted(from_text(text, default_file=str(playbook_path)) for text in exc.problems)
        summary = {"playbook": str(playbook_path), "templates": str(templates_dir), "problems": len(problems)}
        return Report(playbook_path, templates_dir, problems, None, summary)
    missing = missing_templates(playbook, templates_dir)
    renderer = EmailRenderer(templates_dir)
    problems = unique_sorted(
        [
            *(from_text(text, default_file=str(playbook_path)) for _, text in missing),
            *check_playbook(playbook, stored_event_kinds=stored_event_kinds, environment=environment),
            *check_templates(
                renderer, playbook, shown_dir=str(templates_dir), skip=frozenset(name for name, _ in missing)
            ),
        ]
    )
    summary = {
        "playbook": str(playbook_path),
        "version": playbook.version,
        "templates": str(templates_dir),
        "event_kinds": len(playbook.scoring.events),
        "fit_rules": len(playbook.scoring.fit),
        "sequences": len(playbook.sequences),
        "emails": sum(len(s.steps) for s in playbook.sequences.values()),
        "template_files": len(playbook.template_names()),
        "webhooks": len(playbook.webhooks),
        "problems": len(problems),
    }
    return Report(playbook_path, templates_dir, problems, playbook, summary)
