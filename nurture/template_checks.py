"""What ``nurture validate`` finds in the templates a playbook uses, each once at its source.

Three passes. Each file (and every layout, include or import it reaches) is read and
parsed once: a refused file, a syntax error or a missing compliance footer is reported
at that file. Each parsed file and subject is read for names a template cannot have
(``lead.compnay``, ``links.casestudy``, ``leed``), at their line, with a "did you mean".
Then every email a step can send is rendered for a full sample lead and for a sparse one
(every optional field empty, no attributes): what fails only for the sparse lead names
the field to guard. A broken ``_layout.html`` is one problem at ``_layout.html:LINE``,
however many emails extend it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateSyntaxError, meta, nodes
from jinja2.exceptions import TemplateNotFound

from nurture.diagnostics import Problem, closest, did_you_mean
from nurture.errors import TemplateError
from nurture.playbook import Brand, Playbook
from nurture.render_budget import Refused
from nurture.rendering import (
    FOOTER_MARKERS,
    LEAD_FIELDS,
    OPTIONAL_LEAD_FIELDS,
    EmailRenderer,
    describe_error,
    sample_context,
    sparse_context,
)

# Renders one part of an email (subject, HTML or text) for a context; raises TemplateError.
_Render = Callable[[Mapping[str, Any]], None]
# The names every email's context holds (rendering.email_context).
CONTEXT_NAMES = frozenset(
    {"lead", "brand", "links", "unsubscribe_url", "postal_address", "sequence", "step", "preheader"}
)


@dataclass(frozen=True, slots=True)
class _Content:
    """One email a step can send: its template and subject, and where the subject is in the playbook.

    ``whole`` False: a preheader, checked like a subject on its own (``subject`` holds its text)."""

    sequence: str
    loc: tuple[str, ...]
    template: str
    subject: str
    whole: bool = True


def check_templates(
    renderer: EmailRenderer,
    playbook: Playbook,
    *,
    shown_dir: str,
    skip: frozenset[str] = frozenset(),
    sparse: bool = True,
) -> list[Problem]:
    """Every problem of the templates (and subjects) the playbook uses; files named under ``shown_dir``.

    ``skip``: templates already reported as missing (their subjects are still checked).
    ``sparse``: also render for a lead with every optional field empty."""
    return _Checker(renderer, playbook, shown_dir).run(skip, sparse=sparse)


class _Checker:
    def __init__(self, renderer: EmailRenderer, playbook: Playbook, shown_dir: str) -> None:
        self.renderer = renderer
        self.playbook = playbook
        self.shown_dir = shown_dir.rstrip("/") or "."
        self.problems: list[Problem] = []
        # Lines a render already failed at: another email failing there is the same problem again.
        self.failed_at: set[tuple[str, int | None]] = set()
        self.known_names = CONTEXT_NAMES | renderer.global_names
        self.link_names = tuple(playbook.links)
        self._analysed: set[str] = set()
        self._trees: dict[str, nodes.Template] = {}
        # Names already reported as unknown (owner "" for a top-level name): the renders give them a
        # stand-in value, so a typo early in a layout does not hide a problem further on.
        self._unknown: dict[str, set[str]] = {"": set(), "lead": set(), "brand": set(), "links": set()}

    def file(self, name: str) -> str:
        return f"{self.shown_dir}/{name}"

    def add(self, problem: Problem) -> None:
        self.problems.append(problem)

    def run(self, skip: frozenset[str], *, sparse: bool) -> list[Problem]:
        contents = [
            _Content(name, ("sequences", name, "steps", str(i), *variant_loc, "subject"), template, subject)
            for name, seq in self.playbook.sequences.items()
            for i, step in enumerate(seq.steps)
            for v, (variant, template, subject) in enumerate(step.contents())
            for variant_loc in [("variants", str(v)) if variant is not None else ()]
        ]
        preheaders = [
            _Content(name, ("sequences", name, "steps", str(i), *own, "preheader"), template, text, whole=False)
            for name, seq in self.playbook.sequences.items()
            for i, step in enumerate(seq.steps)
            for v, (variant_id, template, _subject) in enumerate(step.contents())
            for variant in [step.variant(variant_id)]
            for text in [step.preheader_of(variant)]
            if text
            for own in [("variants", str(v)) if variant is not None and variant.preheader else ()]
        ]
        templates = sorted({c.template for c in contents} - skip)
        broken = skip | {template for template in templates if not self._read_email(template)}
        for content in (*contents, *preheaders):
            self._read_subject(content)
        full = self._stand_ins(sample_context(self.playbook))
        empty = self._stand_ins(sparse_context(self.playbook)) if sparse else None
        for content in (*contents, *preheaders):
            if content.template not in broken or not content.whole:
                self._render(content, full, empty)
        return list(dict.fromkeys(self.problems))

    # -- reading files --------------------------------------------------------------------------

    def _read_email(self, template: str) -> bool:
        """Read both parts of an email and all they reach; False if one cannot be read or parsed."""
        readable = True
        for suffix in (".html", ".txt"):
            top = f"{template}{suffix}"
            texts: list[str] = []
            layouts: list[str] = []  # what ``top`` extends, nearest first
            pending: list[tuple[str, str, int | None, bool]] = [(top, top, None, False)]
            seen: set[str] = set()
            ok = True
            while pending:
                name, asked_by, line, included = pending.pop()
                if name in seen:
                    continue
                seen.add(name)
                try:
                    tree = self.renderer.parse_file(name)
                except TemplateNotFound:
                    ok = False
                    if name == top:
                        self.add(Problem(self.file(name), None, "the file does not exist"))
                    else:
                        self.add(Problem(self.file(asked_by), line, f"template {name!r} does not exist"))
                    continue
                except Refused as exc:
                    ok = False
                    self.add(Problem(self.file(asked_by), line, str(exc)))
                    continue
                except TemplateSyntaxError as exc:
                    ok = False
                    self.add(Problem(self.file(name), exc.lineno, exc.message or "not a valid template"))
                    continue
                texts.append(_source_text(tree))
                self._trees[name] = tree
                if name not in self._analysed:
                    self._analysed.add(name)
                    self._names(tree, self.file(name), None, undeclared=not included)
                for ref, ref_line, by_include in _referenced(tree):
                    pending.append((ref, name, ref_line, by_include or included))
                    if not by_include and not included and (name == top or name in layouts):
                        layouts.append(ref)
            if ok and not all(marker in " ".join(texts) for marker in FOOTER_MARKERS):
                self.add(self._no_footer(top, layouts))
            readable = readable and ok
        return readable

    def _no_footer(self, top: str, layouts: list[str]) -> Problem:
        """At the layout an email extends (once for all its emails), else at the email itself."""
        shown = " and ".join(FOOTER_MARKERS)
        if layouts:
            return Problem(
                self.file(layouts[-1]),
                None,
                f"the compliance footer is missing from this layout (the emails that extend it lack it): show {shown}",
            )
        return Problem(self.file(top), None, f"the compliance footer is missing: extend the layout (or show {shown})")

    def _read_subject(self, content: _Content) -> None:
        file, line = self._subject_at(content)
        try:
            tree = self.renderer.parse_subject(content.subject)
        except TemplateSyntaxError as exc:
            self.add(Problem(file, line, exc.message or "not a valid template", key=".".join(content.loc)))
            self.failed_at.add((file, line))  # not rendered: it would fail the same way
            return
        self._names(tree, file, line, key=".".join(content.loc))

    def _subject_at(self, content: _Content) -> tuple[str, int | None]:
        source = self.playbook.source
        loc = content.loc
        line = next((source.lines[loc[:end]] for end in range(len(loc), -1, -1) if loc[:end] in source.lines), None)
        return source.path or "nurture.yaml", line

    # -- names ----------------------------------------------------------------------------------

    def _names(
        self, tree: nodes.Template, file: str, line: int | None, *, key: str | None = None, undeclared: bool = True
    ) -> None:
        """Names no email has: an unknown variable, a lead field, brand key or link that does not exist."""

        def at(node: nodes.Node) -> int | None:
            return line if line is not None else node.lineno

        if undeclared:
            for name in sorted(meta.find_undeclared_variables(tree) - self.known_names):
                first = next(n for n in tree.find_all(nodes.Name) if n.name == name)
                self._unknown[""].add(name)
                suggestion = closest(name, self.known_names)
                self.add(
                    Problem(
                        file, at(first), f"there is no {name!r} in an email{did_you_mean(suggestion)}", key, suggestion
                    )
                )
        for owner, attr, node in _attributes(tree):
            names = {"lead": LEAD_FIELDS, "brand": tuple(Brand.model_fields), "links": self.link_names}[owner]
            if attr not in names:
                self._unknown[owner].add(attr)
            if owner == "lead" and attr not in LEAD_FIELDS:
                suggestion = closest(attr, LEAD_FIELDS)
                hint = did_you_mean(suggestion) or f"; an imported column is lead.attributes.{attr}"
                self.add(Problem(file, at(node), f"lead has no field {attr!r}{hint}", key, suggestion))
            elif owner == "brand" and attr not in Brand.model_fields:
                suggestion = closest(attr, Brand.model_fields)
                self.add(Problem(file, at(node), f"brand has no {attr!r}{did_you_mean(suggestion)}", key, suggestion))
            elif owner == "links" and attr not in self.link_names:
                suggestion = closest(attr, self.link_names)
                listed = ", ".join(self.link_names) or "none"
                hint = did_you_mean(suggestion) or f"; the playbook's links are: {listed}"
                self.add(Problem(file, at(node), f"links has no {attr!r}{hint}", key, suggestion))

    # -- rendering ------------------------------------------------------------------------------

    def _stand_ins(self, context: dict[str, Any]) -> dict[str, Any]:
        """The context with a stand-in for each name already reported unknown."""
        lead = type(context["lead"])(context["lead"])
        lead.update(dict.fromkeys(self._unknown["lead"], "sample"))
        return {
            **dict.fromkeys(self._unknown[""], "sample"),
            **context,
            "lead": lead,
            "brand": {**context["brand"], **dict.fromkeys(self._unknown["brand"], "sample")},
            "links": {**context["links"], **dict.fromkeys(self._unknown["links"], "https://example.com")},
        }

    def _render(self, content: _Content, full: Mapping[str, Any], sparse: Mapping[str, Any] | None) -> None:
        subject_file, subject_line = self._subject_at(content)
        key = ".".join(content.loc)
        parts: list[tuple[str | None, str]] = [(None, content.subject)]
        if content.whole:
            parts += [(f"{content.template}.html", ""), (f"{content.template}.txt", "")]
        for filename, subject in parts:

            def render(context: Mapping[str, Any], filename: str | None = filename, subject: str = subject) -> None:
                if filename is None:
                    self.renderer.render_subject(key, subject, context)
                else:
                    self.renderer.render_file(filename, context)

            failed_full = self._attempt(render, full, subject_file, subject_line, key, filename, sparse=False)
            if not failed_full and sparse is not None:
                self._attempt(render, sparse, subject_file, subject_line, key, filename, sparse=True, full=full)

    def _attempt(
        self,
        render: _Render,
        context: Mapping[str, Any],
        subject_file: str,
        subject_line: int | None,
        key: str,
        filename: str | None,
        *,
        sparse: bool,
        full: Mapping[str, Any] | None = None,
    ) -> bool:
        """Render one part; on failure report it once where it was raised. True if it failed."""
        try:
            render(context)
        except TemplateError as exc:
            cause = exc.__cause__ or exc
            raised = self.renderer.raised_at(cause)
            file, line, problem_key = (
                (self.file(raised[0]), raised[1], None) if raised else (subject_file, subject_line, key)
            )
            if (file, line) in self.failed_at:
                return True
            self.failed_at.add((file, line))
            what = describe_error(cause, self.renderer.templates_dir)
            if not sparse or full is None:
                self.add(Problem(file, line, f"{what} (for a sample lead)", problem_key))
                return True
            empty = self._culprits(render, full, raised)
            tree = self._trees.get(raised[0]) if raised else None
            attributes = sorted(_attributes_at(tree, raised[1])) if tree is not None and raised else []
            self.add(self._guard(file, line, problem_key, what, empty, attributes))
            return True
        return False

    def _culprits(self, render: _Render, full: Mapping[str, Any], raised: tuple[str, int] | None) -> list[str]:
        """Which empty fields make the part fail where the sparse lead's render failed."""
        found = []
        for field in (*OPTIONAL_LEAD_FIELDS, "attributes"):
            lead = dict(full["lead"])
            lead[field] = type(full["lead"]["attributes"])() if field == "attributes" else None
            context = dict(full) | {"lead": type(full["lead"])(lead)}
            try:
                render(context)
            except TemplateError as exc:
                if self.renderer.raised_at(exc.__cause__ or exc) == raised:
                    found.append(field)
        return found

    def _guard(
        self, file: str, line: int | None, key: str | None, what: str, empty: list[str], attributes: list[str]
    ) -> Problem:
        if not empty:
            return Problem(file, line, f"fails for a lead with no optional field filled in: {what}", key)
        shown_attributes = [f"lead.attributes.{a}" for a in attributes] or ["lead.attributes.NAME"]
        names = [f"lead.{f}" for f in empty if f != "attributes"] + (shown_attributes if "attributes" in empty else [])
        first = names[0]
        suggestion = f"{{{{ {first} or '' }}}}"
        return Problem(
            file,
            line,
            f"{' or '.join(names)} can be empty, and then this line fails ({what}); guard it: {suggestion} "
            f"or {{% if {first} %}}…{{% endif %}}",
            key,
            suggestion,
        )


def _source_text(tree: nodes.Template) -> str:
    """The names a parsed template uses, as text: enough to see whether it shows the footer's values."""
    return " ".join(n.name for n in tree.find_all(nodes.Name))


def _referenced(tree: nodes.Template) -> Iterator[tuple[str, int, bool]]:
    """Templates a parsed template names (literal names), their line, and whether it includes or imports them."""
    for ref in tree.find_all((nodes.Extends, nodes.Include, nodes.Import, nodes.FromImport)):
        named = getattr(ref, "template", None)
        names = named.items if isinstance(named, nodes.Tuple | nodes.List) else [named]
        for name in names:
            if isinstance(name, nodes.Const):
                yield name.value, ref.lineno, not isinstance(ref, nodes.Extends)


# What a template may call on any mapping of its context (``lead.get("company")``, ``links.items()``).
MAPPING_METHODS = frozenset({"get", "items", "keys", "values"})


def _attributes(tree: nodes.Template) -> Iterator[tuple[str, str, nodes.Node]]:
    """``lead.x``, ``lead['x']``, ``brand.x``, ``links.x``: the owner, the name and the node.

    Not a mapping method called (``lead.get(...)``), and nothing of a name the file binds itself
    (``{% for lead in ... %}``, ``{% set links = ... %}``, a macro's argument): that is not the context's."""
    bound = {n.name for n in tree.find_all(nodes.Name) if n.ctx in ("store", "param")}
    called = {
        id(call.node)
        for call in tree.find_all(nodes.Call)
        if isinstance(call.node, nodes.Getattr) and call.node.attr in MAPPING_METHODS
    }
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        owner = getattr(node, "node", None)
        if not isinstance(owner, nodes.Name) or owner.name not in ("lead", "brand", "links") or owner.name in bound:
            continue
        if id(node) in called:
            continue
        if isinstance(node, nodes.Getattr):
            yield owner.name, node.attr, node
        elif isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            yield owner.name, node.arg.value, node


def _attributes_at(tree: nodes.Template, line: int) -> set[str]:
    """The ``lead.attributes.NAME`` a template reads on one line."""
    found = set()
    for node in tree.find_all(nodes.Getattr):
        inner = node.node
        if (
            node.lineno == line
            and isinstance(inner, nodes.Getattr)
            and inner.attr == "attributes"
            and isinstance(inner.node, nodes.Name)
            and inner.node.name == "lead"
        ):
            found.add(node.attr)
    return found
