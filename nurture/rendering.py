"""Render nurture emails from the marketers' Jinja2 templates.

One sandboxed environment (marketers write templates, so templates cannot reach
Python internals), autoescaping for ``.html`` so a lead named
``<script>`` stays text, and ``StrictUndefined`` so a typo fails the message
instead of sending an email with blanks. Each email template ``NAME`` is a pair:
``NAME.html`` and ``NAME.txt``, both extending the layout that carries the
unsubscribe link and the postal address.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import (
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateSyntaxError,
    meta,
    select_autoescape,
)
from jinja2.exceptions import SecurityError, TemplateNotFound, UndefinedError
from jinja2.sandbox import SandboxedEnvironment

from nurture.errors import TemplateError
from nurture.playbook import TEMPLATE_NAME, Playbook

# Every HTML email must show these, or it is not allowed to go out.
FOOTER_MARKERS = ("unsubscribe_url", "postal_address")


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    subject: str
    html: str
    text: str


def _blank_none(value: Any) -> Any:
    # An empty profile field renders as nothing, not as the word "None".
    return "" if value is None else value


class _PlainNameLoader(FileSystemLoader):
    """Loads only templates whose names are plain file names (``welcome.html``, ``parts/footer.html``).

    Jinja compiles a template's name into Python code; a name carrying quotes or braces
    ran code before Jinja 3.1.5 (CVE-2024-56201), and ``..`` or an absolute path would
    reach outside the templates folder. Such a name is refused before any file is read,
    whoever asked for it: the playbook, ``{% include %}``, ``{% extends %}`` or ``{% from %}``.
    """

    def get_source(self, environment: Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        if not TEMPLATE_NAME.match(template):
            raise SecurityError(f"template name {template[:80]!r} is refused: only letters, digits, _ . - and /")
        return super().get_source(environment, template)


class EmailRenderer:
    """Renders subjects and both parts of an email; built once per process or run."""

    def __init__(self, templates_dir: Path) -> None:
        self.templates_dir = templates_dir.resolve()
        self._env = SandboxedEnvironment(
            loader=_PlainNameLoader(str(self.templates_dir)),
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=StrictUndefined,
            finalize=_blank_none,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
        )
        self._subjects: dict[str, Template] = {}

    def _subject_template(self, source: str) -> Template:
        # Subjects come from the playbook: a handful of distinct strings, compiled once each.
        compiled = self._subjects.get(source)
        if compiled is None:
            compiled = self._subjects[source] = self._env.from_string(source)
        return compiled

    def render(self, *, template: str, subject: str, context: Mapping[str, Any]) -> RenderedEmail:
        """Render one email; raises TemplateError naming the template and the problem."""
        where = template
        try:
            where = f"subject of {template}"
            rendered_subject = " ".join(self._subject_template(subject).render(context).split())
            where = f"{template}.html"
            html = self._env.get_template(f"{template}.html").render(context)
            where = f"{template}.txt"
            text = self._env.get_template(f"{template}.txt").render(context)
        except TemplateNotFound as exc:
            raise TemplateError(f"{where}: template file {exc.name} not found in {self.templates_dir}") from exc
        except TemplateSyntaxError as exc:
            raise TemplateError(f"{exc.filename or where}:{exc.lineno}: {exc.message}") from exc
        except (UndefinedError, SecurityError) as exc:
            raise TemplateError(f"{where}: {exc}") from exc
        except Exception as exc:  # a marketer's template can fail in any way; never send it
            raise TemplateError(f"{where}: {type(exc).__name__}: {exc}") from exc
        return RenderedEmail(subject=rendered_subject, html=html, text=text)

    def check(self, playbook: Playbook) -> list[str]:
        """Problems with the templates a playbook uses: syntax, missing footer, bad subjects."""
        problems: list[str] = []
        for name in sorted(playbook.template_names()):
            for suffix in (".html", ".txt"):
                problems.extend(self._check_file(f"{name}{suffix}", footer=suffix == ".html"))
        for seq_name, seq in playbook.sequences.items():
            for i, step in enumerate(seq.steps):
                try:
                    self._env.parse(step.subject)
                except TemplateSyntaxError as exc:
                    problems.append(f"sequences.{seq_name}.steps.{i}.subject: {exc.message}")
        if not problems:
            for seq_name, seq in playbook.sequences.items():
                for step in seq.steps:
                    try:
                        self.render(template=step.template, subject=step.subject, context=sample_context(playbook))
                    except TemplateError as exc:
                        problems.append(f"sequence {seq_name}: {exc} (rendered for a sample lead)")
        return problems

    def _check_file(self, filename: str, *, footer: bool) -> Iterable[str]:
        path = self.templates_dir / filename
        try:
            source = path.read_text(encoding="utf-8")
            self._env.parse(source, filename=filename)
        except OSError as exc:
            return [f"{path}: cannot read: {exc.strerror}"]
        except TemplateSyntaxError as exc:
            return [f"{path}:{exc.lineno}: {exc.message}"]
        if footer and not self._reaches_footer(filename):
            return [f"{path}: must extend the layout (or show {' and '.join(FOOTER_MARKERS)}) so the footer is kept"]
        return []

    def _reaches_footer(self, filename: str) -> bool:
        """Whether the template, through the templates it extends or includes, shows the footer."""
        seen: set[str] = set()
        pending = [filename]
        text = ""
        while pending:
            name = pending.pop()
            if name in seen:
                continue
            seen.add(name)
            try:
                source = (self.templates_dir / name).read_text(encoding="utf-8")
            except OSError:
                continue
            text += source
            pending.extend(ref for ref in meta.find_referenced_templates(self._env.parse(source)) if ref)
        return all(marker in text for marker in FOOTER_MARKERS)


def sample_context(playbook: Playbook) -> dict[str, Any]:
    """A made-up lead to render templates with in checks and previews."""
    return email_context(
        playbook,
        lead={
            "email": "jordan.lee@example.com",
            "first_name": "Jordan",
            "last_name": "Lee",
            "company": "Example Corp",
            "job_title": "Head of Growth",
            "company_size": 120,
            "country": "US",
            "timezone": "America/New_York",
            "attributes": {},
            "stage": "warm",
            "score": 42.0,
        },
        unsubscribe_url="https://nurture.example/unsubscribe/sample-token",
        postal_address="Example Inc., 1 Sample Street, Springfield",
        sequence="sample",
        step=0,
    )


def email_context(
    playbook: Playbook,
    *,
    lead: Mapping[str, Any],
    unsubscribe_url: str,
    postal_address: str,
    sequence: str,
    step: int,
) -> dict[str, Any]:
    """Everything a template may use; the list is documented in docs/templates.md."""
    return {
        "lead": dict(lead),
        "brand": playbook.brand.model_dump(),
        "links": dict(playbook.links),
        "unsubscribe_url": unsubscribe_url,
        "postal_address": postal_address,
        "sequence": sequence,
        "step": step,
    }
