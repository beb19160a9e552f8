"""Render nurture emails from the marketers' Jinja2 templates.

One sandboxed environment (marketers write templates, so templates cannot reach
Python internals nor change the lists and dicts they are given), autoescaping for
``.html`` so a lead named ``<script>`` stays text, and ``StrictUndefined`` so a typo
fails the message instead of sending an email with blanks. Each email template
``NAME`` is a pair: ``NAME.html`` and ``NAME.txt``, both extending the layout that
carries the unsubscribe link and the postal address.

Templates are read only from regular files inside the templates folder, and each
email renders on a budget (nurture/render_budget.py) with each part's output capped:
a template that asks for more fails with a TemplateError naming the file and line.
"""

from __future__ import annotations

import os
import re
import stat
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

from jinja2 import (
    BaseLoader,
    Environment,
    StrictUndefined,
    Template,
    TemplateSyntaxError,
    nodes,
    select_autoescape,
)
from jinja2.exceptions import SecurityError, TemplateNotFound, UndefinedError

from nurture.diagnostics import closest, did_you_mean
from nurture.errors import TemplateError
from nurture.importing import LEAD_COLUMNS
from nurture.playbook import TEMPLATE_NAME, Playbook
from nurture.render_budget import BudgetedEnvironment, Refused, RenderLimits, finalize, spending

# Every email must show these in both parts, or it is not allowed to go out.
FOOTER_MARKERS = ("unsubscribe_url", "postal_address")
# What ``lead`` holds in a template: the profile, its free-form attributes, and where the lead is now.
LEAD_FIELDS = (*LEAD_COLUMNS, "attributes", "stage", "score")
# Profile fields a lead may lack (None): templates guard them with `or` / `if`.
OPTIONAL_LEAD_FIELDS = tuple(f for f in LEAD_COLUMNS if f not in ("email", "timezone"))
# How often a renderer looks for changed template files (it renders from compiled templates in between).
TEMPLATE_CHECK_SECONDS = 1.0


# ---------------------------------------------------------------------------------------------
# Reading templates


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file"


class _TemplatesFolderLoader(BaseLoader):
    """Loads templates only from regular files inside the templates folder.

    The name is checked first: Jinja compiles a template's name into Python code; a name
    carrying quotes or braces ran code before Jinja 3.1.5 (CVE-2024-56201), and ``..`` or an
    absolute path would reach outside the folder. Then the file: its real path, after every
    symbolic link is followed, must lie inside the folder (git stores links, and one to
    ``/proc/self/environ`` would put the process's secrets into every email), and it must be
    a regular file of at most ``max_bytes`` (a FIFO or device could block or never end). A
    link to another file inside the folder is followed. This holds whoever asks: the
    playbook, ``{% include %}``, ``{% extends %}``, ``{% import %}`` or ``{% from %}``.
    """

    def __init__(self, root: Path, *, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes

    def get_source(self, environment: Environment, template: str) -> tuple[str, str, Callable[[], bool]]:
        if not TEMPLATE_NAME.match(template):
            raise Refused(f"template name {template[:80]!r} is refused: only letters, digits, _ . - and /")
        path = self.root / template
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self.root):
            raise Refused(
                f"template {template!r} is refused: it leads to {real}, outside the templates folder "
                f"{self.root}; only files inside it can be used"
            )
        try:
            fd = os.open(real, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError as exc:
            raise TemplateNotFound(template) from exc
        except OSError as exc:
            raise Refused(f"template {template!r} cannot be read: {exc.strerror}") from exc
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                kind = _file_kind(info.st_mode)
                raise Refused(f"template {template!r} is refused: it is {kind}, not a regular file")
            with os.fdopen(fd, "rb", closefd=False) as file:
                raw = file.read(self.max_bytes + 1)
        except OSError as exc:
            raise Refused(f"template {template!r} cannot be read: {exc.strerror}") from exc
        finally:
            os.close(fd)
        if len(raw) > self.max_bytes:
            raise Refused(f"template {template!r} is refused: it is larger than {self.max_bytes:,} bytes")
        try:
            source = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Refused(f"template {template!r} is not UTF-8 text (byte {exc.start}); save it as UTF-8") from exc

        filename, followed = str(path), str(real) != str(path)
        link = os.lstat(filename)

        def uptodate() -> bool:
            # Checked on every use of the cached template: a named link that changes is loaded (and checked) again.
            try:
                now = os.lstat(filename)
                if now.st_mtime_ns != link.st_mtime_ns or now.st_ino != link.st_ino:
                    return False
                return not followed or os.stat(real).st_mtime_ns == info.st_mtime_ns
            except OSError:
                return False

        return source, filename, uptodate


# How Jinja words a missing name on ``lead``: "'nurture.rendering.LeadFields object' has no attribute 'x'".
_NO_LEAD_FIELD = re.compile(r"^'[\w.]*LeadFields object' has no attribute '(?P<name>[^']*)'$")


def describe_error(exc: BaseException, templates_dir: Path) -> str:
    """What went wrong while rendering, in a line (not the whole traceback)."""
    if isinstance(exc, UndefinedError) and (missing := _NO_LEAD_FIELD.match(str(exc))):
        message = f"lead has no field {missing['name']!r}{did_you_mean(closest(missing['name'], LEAD_FIELDS))}"
    elif isinstance(exc, TemplateNotFound):
        message = f"template file {exc.name} not found in {templates_dir}"
    elif isinstance(exc, UndefinedError | SecurityError | Refused):
        message = str(exc)
    elif isinstance(exc, RecursionError):
        message = "calls itself too deeply (a macro, include or recursive loop that never stops)"
    else:
        message = f"{type(exc).__name__}: {exc}"
    return message if len(message) <= 400 else message[:400] + "…"


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RenderedEmail:
    """One email, rendered. ``preheader`` is the preview text the HTML part hides at its top ("" for none)."""

    subject: str
    html: str
    text: str
    preheader: str = ""


class EmailRenderer:
    """Renders subjects and both parts of an email; built once per process or run.

    ``clock`` (seconds, monotonic) is only read for the deadline in ``limits.seconds``.
    """

    def __init__(
        self,
        templates_dir: Path,
        *,
        limits: RenderLimits | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.templates_dir = templates_dir.resolve()
        self.limits = limits or RenderLimits()
        self._clock = clock
        self._loader = _TemplatesFolderLoader(self.templates_dir, max_bytes=self.limits.template_bytes)
        self._env = BudgetedEnvironment(
            loader=self._loader,
            autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
            undefined=StrictUndefined,
            finalize=finalize,
            trim_blocks=True,
            lstrip_blocks=True,
            keep_trailing_newline=True,
            # Compiled templates are kept and used as they are; _keep_fresh looks at the files once a second.
            auto_reload=False,
        )
        self._subjects: dict[str, Template] = {}
        self._fresh_until = 0.0

    def _subject_template(self, source: str) -> Template:
        # Subjects come from the playbook: a handful of distinct strings, compiled once each.
        compiled = self._subjects.get(source)
        if compiled is None:
            compiled = self._subjects[source] = self._env.from_string(source)
        return compiled

    def _keep_fresh(self) -> None:
        """Forget the compiled templates if a file changed (checked at most once a second, not per email).

        Jinja's own check reads the file's status for each template an email uses, every
        time; at hundreds of emails a second that is most of a render's cost.
        """
        now = time.monotonic()
        if now < self._fresh_until:
            return
        self._fresh_until = now + TEMPLATE_CHECK_SECONDS
        cache = self._env.cache
        if cache is not None and not all(template.is_up_to_date for template in cache.values()):
            cache.clear()

    def _budget(self) -> AbstractContextManager[None]:
        return spending(self.limits, self._clock)

    def render(self, *, template: str, subject: str, context: Mapping[str, Any], preheader: str = "") -> RenderedEmail:
        """Render one email; raises TemplateError naming the template (and line) and the problem.

        ``preheader`` is a template string like ``subject``; rendered, it reaches the templates
        as ``preheader``, which the layout shows as the hidden preview text of the HTML part.
        """
        self._keep_fresh()
        with self._budget():
            rendered_subject = self._part(f"subject of {template}", self._subject_template, subject, context)
            shown = ""
            if preheader:
                shown = " ".join(
                    self._part(f"preheader of {template}", self._subject_template, preheader, context).split()
                )
            context = {**context, "preheader": shown}
            html = self._part(f"{template}.html", self._env.get_template, f"{template}.html", context)
            text = self._part(f"{template}.txt", self._env.get_template, f"{template}.txt", context)
        return RenderedEmail(subject=" ".join(rendered_subject.split()), html=html, text=text, preheader=shown)

    def _part(self, where: str, load: Callable[[str], Template], source: str, context: Mapping[str, Any]) -> str:
        """One part of an email, its output capped at ``limits.text``; any failure is a TemplateError."""
        try:
            template = load(source)
            pieces: list[str] = []
            size, cap, append = 0, self.limits.text, pieces.append
            try:  # Template.generate() without its extra generator: this runs for every piece of every email
                for piece in template.root_render_func(template.new_context(dict(context))):
                    size += len(piece)
                    if size > cap:
                        raise Refused(f"the output is longer than {cap:,} characters")
                    append(piece)
            except Exception:
                template.environment.handle_exception()  # raises it again, its traceback on template lines
        except TemplateSyntaxError as exc:
            raise TemplateError(f"{exc.filename or where}:{exc.lineno}: {exc.message}") from exc
        except Exception as exc:  # a marketer's template can fail in any way; never send it
            raise TemplateError(f"{where}: {describe_error(exc, self.templates_dir)}{self._line(exc, where)}") from exc
        return "".join(pieces)

    def _line(self, exc: Exception, where: str) -> str:
        """Where in the template files ``exc`` was raised: `` (line 3)``, `` (line 9 of _layout.html)`` or ``""``."""
        found = self.raised_at(exc)
        if found is None:
            return ""  # not in a file: a subject, whose line the playbook gives
        name, line = found
        return f" (line {line})" if name == where else f" (line {line} of {name})"

    def raised_at(self, exc: BaseException) -> tuple[str, int] | None:
        """The template file (relative to the folder) and line ``exc`` was raised at, innermost; None: not in a file."""
        found = None
        tb = exc.__traceback__
        while tb is not None:
            if "__jinja_exception__" in tb.tb_frame.f_globals:  # a frame Jinja rewrote to a template line
                found = (Path(tb.tb_frame.f_code.co_filename), tb.tb_lineno)
            tb = tb.tb_next
        if found is None or not found[0].is_relative_to(self.templates_dir):
            return None
        return found[0].relative_to(self.templates_dir).as_posix(), found[1]

    def parse_file(self, name: str) -> nodes.Template:
        """One template file of the folder, parsed (for checks); raises as loading it would."""
        source = self._loader.get_source(self._env, name)[0]
        return self._env.parse(source, name, str(self.templates_dir / name))

    def parse_subject(self, subject: str) -> nodes.Template:
        return self._env.parse(subject)

    def render_file(self, name: str, context: Mapping[str, Any]) -> str:
        """One part (``welcome.html``) on its own budget; raises TemplateError from the original error."""
        self._keep_fresh()
        with self._budget():
            return self._part(name, self._env.get_template, name, context)

    def render_subject(self, where: str, subject: str, context: Mapping[str, Any]) -> str:
        with self._budget():
            return self._part(where, self._subject_template, subject, context)

    @property
    def global_names(self) -> frozenset[str]:
        """What every template may use besides its context (range, dict, cycler...)."""
        return frozenset(self._env.globals)

    def check(self, playbook: Playbook) -> list[str]:
        """Problems with the templates a playbook uses, each once where it is: refused files, syntax,
        missing footer, names no email has, and what fails for the full sample lead (what every run
        checks first; ``nurture validate`` also renders for a sparse lead)."""
        from nurture.template_checks import check_templates  # it builds on this module

        self._fresh_until = 0.0  # a check sees the files as they are now
        found = check_templates(self, playbook, shown_dir=str(self.templates_dir), sparse=False)
        return [str(problem) for problem in found]


SAMPLE_LEAD: Mapping[str, Any] = MappingProxyType(
    {
        "email": "jordan.lee@example.com",
        "first_name": "Jordan",
        "last_name": "Lee",
        "company": "Example Corp",
        "job_title": "Head of Growth",
        "company_size": 120,
        "country": "US",
        "timezone": "America/New_York",
        "attributes": MappingProxyType({"industry": "software", "plan": "trial"}),
        "stage": "warm",
        "score": 42.0,
    }
)


def sample_context(playbook: Playbook) -> dict[str, Any]:
    """A made-up lead with every field filled, to render templates with in checks and previews."""
    return _sample(playbook, dict(SAMPLE_LEAD) | {"attributes": dict(SAMPLE_LEAD["attributes"])})


def sparse_context(playbook: Playbook) -> dict[str, Any]:
    """A made-up lead with only what every lead has (an address, a time zone): what a template
    must also survive, since most leads lack a company, a name or an attribute."""
    lead = {**SAMPLE_LEAD, **dict.fromkeys(OPTIONAL_LEAD_FIELDS), "attributes": {}, "stage": "cold", "score": 0.0}
    return _sample(playbook, lead)


def _sample(playbook: Playbook, lead: Mapping[str, Any]) -> dict[str, Any]:
    return email_context(
        playbook,
        lead=lead,
        unsubscribe_url="https://nurture.example/unsubscribe/sample-token",
        postal_address="Example Inc., 1 Sample Street, Springfield",
        sequence="sample",
        step=0,
    )


class LeadFields(dict[str, Any]):
    """``lead`` in a template: an optional profile field a lead lacks reads as None (not a
    failure); a name that is no field stays an error, so a typo fails the email."""

    def __missing__(self, key: str) -> Any:
        if key in OPTIONAL_LEAD_FIELDS:
            return None
        raise KeyError(key)


class LeadAttributes(dict[str, Any]):
    """``lead.attributes``: free-form, so an attribute a lead was imported without reads as None."""

    def __missing__(self, key: str) -> None:
        return None


def email_context(
    playbook: Playbook,
    *,
    lead: Mapping[str, Any],
    unsubscribe_url: str,
    postal_address: str,
    sequence: str,
    step: int,
) -> dict[str, Any]:
    """Everything a template may use; the list is documented in docs/templates.md.

    The same for a real send and for a check, so ``nurture validate`` sees what a send sees."""
    fields = LeadFields(lead)
    fields["attributes"] = LeadAttributes(lead.get("attributes") or {})
    return {
        "lead": fields,
        "brand": playbook.brand.model_dump(),
        "links": dict(playbook.links),
        "unsubscribe_url": unsubscribe_url,
        "postal_address": postal_address,
        "sequence": sequence,
        "step": step,
        "preheader": "",  # EmailRenderer.render sets the step's
    }
