"""What `nurture preview NAME` renders: NAME read as a template or a sequence's step, every valid name, "did you mean".

A NAME is one of:

- a template (``welcome``): its email with the subject of the first step that sends it
  (in playbook order), or the template's name as subject if no step sends it;
- a step (``welcome/welcome``, ``SEQUENCE/STEP_ID``): its template and subject; a step with a
  split test gives one preview per variant, unless the lead's own variant is asked for;
- a variant of a step (``welcome/welcome/a``).

A sequence name has no ``/`` but a step id may, so ``SEQUENCE/REST`` is read as a step id
first and as ``STEP_ID/VARIANT`` only when no step has that id. Where a name is both a
template and a step, the step wins.

Pure: no database, no clock; the templates on disk are listed by :func:`template_files`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from nurture.errors import UnknownNameError
from nurture.playbook import TEMPLATE_NAME, Playbook, Step, Variant

# The sequence name in an email's context when the template is previewed outside any sequence.
NO_SEQUENCE = "preview"
# The unsubscribe links of previews and test sends: links that unsubscribe no one (the API answers
# them with a page saying so). A preview for a real lead does not carry its real link either: a
# marketer clicking it (or a mail program offering one-click unsubscribe on the .eml) would
# unsubscribe a customer.
SAMPLE_LINK_PATH = "sample-lead"
PREVIEW_LINK_PATH = "preview"
TEST_LINK_PATH = "test-send"
INERT_LINK_PATHS = frozenset({SAMPLE_LINK_PATH, PREVIEW_LINK_PATH, TEST_LINK_PATH})

# How many valid names an unknown-name error lists before "... and N more".
MAX_NAMES_LISTED = 40


@dataclass(frozen=True, slots=True)
class PreviewTarget:
    """One email to preview: what it is called, its template and subject, and where it sits in the playbook.

    ``position`` is the step's index in its sequence (the ``step`` templates see); ``step_id``
    and ``variant`` are None for a template previewed outside any step.
    """

    name: str
    template: str
    subject: str
    sequence: str
    position: int
    step_id: str | None = None
    variant: str | None = None
    # For a template: which step lent it its subject ("welcome/welcome/a"), or None.
    subject_from: str | None = None
    preheader: str = ""


def template_files(templates_dir: Path) -> list[str]:
    """The email templates in a folder: names with both ``NAME.html`` and ``NAME.txt``, not starting with ``_``.

    Files whose name starts with ``_`` (the layout, partials) are not emails of their own.
    """
    if not templates_dir.is_dir():
        return []
    names = []
    for html in templates_dir.rglob("*.html"):
        relative = html.relative_to(templates_dir).with_suffix("").as_posix()
        if any(part.startswith("_") for part in relative.split("/")) or not TEMPLATE_NAME.match(relative):
            continue
        if html.with_suffix(".txt").is_file():
            names.append(relative)
    return sorted(names)


def _step_targets(playbook: Playbook) -> Iterable[tuple[str, int, Step, Variant | None]]:
    for sequence_name, sequence in playbook.sequences.items():
        for position, step in enumerate(sequence.steps):
            if step.variants:
                for variant in step.variants:
                    yield sequence_name, position, step, variant
            else:
                yield sequence_name, position, step, None


def _target(sequence: str, position: int, step: Step, variant: Variant | None) -> PreviewTarget:
    template, subject = step.content_of(variant)
    name = f"{sequence}/{step.id}" + (f"/{variant.id}" if variant is not None else "")
    variant_id = variant.id if variant is not None else None
    preheader = step.preheader_of(variant)
    return PreviewTarget(name, template, subject, sequence, position, step.id, variant_id, preheader=preheader)


def step_names(playbook: Playbook) -> list[str]:
    """Every ``SEQUENCE/STEP`` of the playbook, then every ``SEQUENCE/STEP/VARIANT`` of its split tests."""
    steps = [f"{name}/{step.id}" for name, seq in playbook.sequences.items() for step in seq.steps]
    variants = [t.name for t in (_target(*found) for found in _step_targets(playbook)) if t.variant is not None]
    return steps + variants


def template_target(playbook: Playbook, template: str) -> PreviewTarget:
    """A template's preview: the subject of the first step sending it, else the template's name."""
    for found in _step_targets(playbook):
        step_target = _target(*found)
        if step_target.template == template:
            return PreviewTarget(
                template,
                template,
                step_target.subject,
                step_target.sequence,
                step_target.position,
                subject_from=step_target.name,
                preheader=step_target.preheader,
            )
    return PreviewTarget(template, template, template, NO_SEQUENCE, 0)


def resolve(
    playbook: Playbook,
    name: str,
    *,
    templates: Iterable[str],
    variant_for: Callable[[str, Step], Variant | None] | None = None,
) -> list[PreviewTarget]:
    """The emails ``name`` stands for (one, or one per variant of a split test).

    ``templates``: the template names that exist (``template_files``) besides those the playbook
    uses. ``variant_for(sequence, step)``: the variant a real lead gets; given, a step with a split
    test previews that variant only. Raises ``UnknownNameError`` with the closest valid names.
    """
    wanted = name.strip().strip("/")
    sequence_name, _, rest = wanted.partition("/")
    sequence = playbook.sequences.get(sequence_name)
    if sequence is not None and rest:
        position = sequence.position(rest)
        if position is not None:
            step = sequence.steps[position]
            if not step.variants:
                return [_target(sequence_name, position, step, None)]
            if variant_for is not None:
                return [_target(sequence_name, position, step, variant_for(sequence_name, step))]
            return [_target(sequence_name, position, step, variant) for variant in step.variants]
        step_id, _, variant_id = rest.rpartition("/")
        position = sequence.position(step_id) if step_id else None
        if position is not None:
            variant = sequence.steps[position].variant(variant_id)
            if variant is not None:
                return [_target(sequence_name, position, sequence.steps[position], variant)]
    known_templates = sorted(set(templates) | playbook.template_names())
    if wanted in known_templates:
        return [template_target(playbook, wanted)]
    raise UnknownNameError(unknown_name_message(wanted, known_templates, step_names(playbook)))


def unknown_name_message(name: str, templates: list[str], steps: list[str]) -> str:
    """``no template or step named 'welcom'; did you mean welcome?`` and the names there are."""
    close = difflib.get_close_matches(name, [*templates, *steps], n=3, cutoff=0.6)
    suggestion = f"; did you mean {' or '.join(close)}?" if close else ""
    lines = [f"no template or step named {name!r}{suggestion}"]
    for title, names in (("templates", templates), ("steps (SEQUENCE/STEP, SEQUENCE/STEP/VARIANT)", steps)):
        shown = ", ".join(names[:MAX_NAMES_LISTED]) or "none"
        more = f" ... and {len(names) - MAX_NAMES_LISTED} more" if len(names) > MAX_NAMES_LISTED else ""
        lines.append(f"  {title}: {shown}{more}")
    return "\n".join(lines)
