"""The playbook as a Graphviz diagram: the lifecycle, and the sequences each stage change starts.

:func:`playbook_dot` writes DOT text (pure, deterministic: the same playbook gives the same
text, byte for byte); :func:`render` hands it to Graphviz's ``dot`` program for SVG or PNG.

What is drawn:

- the stages (cold → warm → hot → customer) with their thresholds, and every transition the
  lifecycle chart allows (``lifecycle.transition_table``): forward one stage, skipping
  ahead, or back (dashed), each labelled with its event;
- each sequence as a box of its steps in order, with the delay before each (``after``),
  its split test's variants, its ``unless`` / ``only_if`` skips, its ``wait_for`` branch
  (``then`` and ``else`` edges) and its goal; an edge from the stage the sequence is bound
  to, labelled with the transitions that start it.

Node ids are ``stage:NAME`` and ``SEQUENCE/STEP_ID`` (``SEQUENCE/end`` when a branch ends
the sequence), so a test or a tool can read the diagram back.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from nurture.errors import NurtureError
from nurture.lifecycle import transition_table
from nurture.playbook import END, Playbook, Sequence, Stage, Step

FORMATS = ("svg", "png", "dot")
# Colours of the stages, coldest first (fill, border).
_STAGE_COLOURS = {
    Stage.cold: ("#dbeafe", "#2563eb"),
    Stage.warm: ("#fef3c7", "#d97706"),
    Stage.hot: ("#fee2e2", "#dc2626"),
    Stage.customer: ("#dcfce7", "#16a34a"),
}
_ORDER = list(Stage)
# Long enough for any real render; a playbook whose diagram takes longer is not one a person can read.
RENDER_TIMEOUT_SECONDS = 120


class DiagramError(NurtureError):
    """Graphviz is missing or failed to draw the diagram."""


def quoted(text: str) -> str:
    """A DOT string: in double quotes, with backslashes, quotes and line breaks escaped.

    Graphviz reads ``\\n``, ``\\l`` and ``\\r`` in a label as line breaks; text from the playbook
    (a description, a name) is escaped so that it shows as typed.
    """
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + " ".join(escaped.splitlines()) + '"'


def _label(*lines: str) -> str:
    """A multi-line label: each line escaped, joined by DOT's centred line break."""
    return '"' + "\\n".join(quoted(line)[1:-1] for line in lines if line) + '"'


def _attributes(**attrs: str) -> str:
    """``[key=value, ...]``; values are DOT text already (quoted or a bare word)."""
    return "[" + ", ".join(f"{key}={value}" for key, value in attrs.items()) + "]"


def duration_text(duration: timedelta) -> str:
    """``0h``, ``90m``, ``3d``, ``1d12h``: as the playbook writes durations (in days, not weeks)."""
    seconds = int(duration.total_seconds())
    if seconds == 0:
        return "0h"
    parts = []
    for unit, size in (("d", 86_400), ("h", 3_600), ("m", 60), ("s", 1)):
        count, seconds = divmod(seconds, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def stage_id(stage: Stage | str) -> str:
    return f"stage:{stage}"


def step_id(sequence: str, step: str) -> str:
    return f"{sequence}/{step}"


def _stage_lines(playbook: Playbook, stage: Stage) -> list[str]:
    stages = playbook.stages
    if stage == Stage.cold:
        return ["cold", "where leads start"]
    if stage == Stage.customer:
        return ["customer", f"on {', '.join(stages.customer.on_events)}", "(never left)"]
    threshold = stages.warm if stage == Stage.warm else stages.hot
    return [str(stage), f"enter at score ≥ {threshold.enter_at:g}", f"leave below {threshold.leave_below:g}"]


def _lifecycle(playbook: Playbook) -> Iterable[str]:
    yield "  subgraph cluster_lifecycle {"
    yield f'    label={quoted("Lifecycle")}; style=rounded; color="#94a3b8";'
    for stage in Stage:
        fill, border = _STAGE_COLOURS[stage]
        shape = "doubleoctagon" if stage == Stage.customer else "box"
        attrs = _attributes(
            label=_label(*_stage_lines(playbook, stage)),
            shape=shape,
            style='"rounded,filled"',
            fillcolor=quoted(fill),
            color=quoted(border),
            penwidth="2",
        )
        yield f"    {quoted(stage_id(stage))} {attrs};"
    for source, event, target in transition_table():
        step = _ORDER.index(Stage(target)) - _ORDER.index(Stage(source))
        kind = "forward" if step == 1 else "skip" if step > 1 else "back"
        style = {"forward": "solid", "skip": "bold", "back": "dashed"}[kind]
        colour = _STAGE_COLOURS[Stage(target)][1]
        attrs = _attributes(label=quoted(event), style=style, color=quoted(colour), fontcolor=quoted(colour))
        yield f"    {quoted(stage_id(source))} -> {quoted(stage_id(target))} {attrs};"
    yield "  }"


def _step_lines(step: Step) -> list[str]:
    lines = [step.id, f"after {duration_text(step.after)}"]
    if step.variants:
        total = sum(v.weight for v in step.variants) or 1
        lines.append("split test: " + ", ".join(f"{v.id} {v.weight * 100 / total:.0f}%" for v in step.variants))
        templates = list(dict.fromkeys(v.template for v in step.variants))
        if templates != [step.id]:
            lines.append("template " + ", ".join(templates))
    elif step.template != step.id:
        lines.append(f"template {step.template}")
    if step.unless is not None:
        lines.append(f"skipped if {step.unless.describe()}")
    if step.only_if is not None:
        lines.append(f"only if {step.only_if.describe()}")
    if step.wait_for is not None:
        lines.append(f"then waits {duration_text(step.wait_for.within)} for: {step.wait_for.describe()}")
    return lines


def _triggered_by(sequence: Sequence) -> list[str]:
    """The allowed transitions (``cold → warm``) that start the sequence, in the chart's order."""
    return [
        f"{source} → {target}"
        for source, _event, target in transition_table()
        if any(t.matches(Stage(source), Stage(target)) for t in sequence.triggers)
    ]


def _sequence(name: str, sequence: Sequence, index: int) -> Iterable[str]:
    about = [name]
    if sequence.description:
        about.append(sequence.description)
    about.append(f"reentry: {sequence.reentry.describe()}")
    if sequence.goal is not None:
        about.append(f"goal: {', '.join(sequence.goal.events)} (the rest is not sent)")
    yield f"  subgraph cluster_sequence_{index} {{"
    yield f'    label={_label(*about)}; style=rounded; color="#64748b"; fontsize=12;'
    ids = [s.id for s in sequence.steps]
    ends = False
    for step in sequence.steps:
        yield f"    {quoted(step_id(name, step.id))} {_attributes(label=_label(*_step_lines(step)), shape='box')};"
    for position, step in enumerate(sequence.steps):
        following = ids[position + 1] if position + 1 < len(ids) else None
        here = quoted(step_id(name, step.id))
        if step.wait_for is None:
            if following is not None:
                yield f"    {here} -> {quoted(step_id(name, following))};"
            continue
        for branch, target, colour in (("then", step.then, "#16a34a"), ("else", step.else_, "#b45309")):
            goes_to = target or following or END
            ends = ends or goes_to == END
            did = step.wait_for.describe() if branch == "then" else f"not within {duration_text(step.wait_for.within)}"
            attrs = _attributes(label=quoted(f"{branch}: {did}"), color=quoted(colour), fontcolor=quoted(colour))
            yield f"    {here} -> {quoted(step_id(name, goes_to))} {attrs};"
    if ends:
        yield f"    {quoted(step_id(name, END))} {_attributes(label=quoted('end'), shape='circle', fontsize='9')};"
    yield "  }"


def playbook_dot(playbook: Playbook) -> str:
    """The diagram of a playbook as DOT text: the lifecycle, then each sequence and the stage that starts it."""
    lines = [
        "digraph playbook {",
        f"  graph [label={quoted(f'{playbook.brand.name}: the nurture playbook')}, "
        "labelloc=t, fontsize=16, rankdir=LR, bgcolor=white, newrank=true, nodesep=0.3, ranksep=0.5, "
        'fontname="Helvetica"];',
        '  node [fontname="Helvetica", fontsize=10, style=rounded];',
        '  edge [fontname="Helvetica", fontsize=9];',
    ]
    lines.extend(_lifecycle(playbook))
    for index, (name, sequence) in enumerate(playbook.sequences.items()):
        lines.extend(_sequence(name, sequence, index))
        label = _label(*_triggered_by(sequence))
        first = quoted(step_id(name, sequence.steps[0].id))
        attrs = _attributes(label=label, style="dotted", color=quoted("#475569"), arrowhead="vee")
        lines.append(f"  {quoted(stage_id(sequence.stage))} -> {first} {attrs};")
    lines.append("}")
    return "\n".join(lines) + "\n"


def dot_program() -> str | None:
    """The path of Graphviz's ``dot``, or None when Graphviz is not installed."""
    return shutil.which("dot")


def render(dot_text: str, output_format: str, target: Path, *, program: str) -> None:
    """Draw DOT text as ``svg`` or ``png`` into ``target`` with Graphviz; DiagramError if it fails."""
    if output_format not in ("svg", "png"):
        raise DiagramError(f"cannot render {output_format!r}: choose svg or png")
    try:
        done = subprocess.run(  # noqa: S603 - the program is the dot found on PATH, the arguments are ours
            [program, f"-T{output_format}", *(["-Gdpi=120"] if output_format == "png" else []), f"-o{target}"],
            input=dot_text.encode("utf-8"),
            capture_output=True,
            timeout=RENDER_TIMEOUT_SECONDS,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise DiagramError(f"Graphviz ({program}) could not draw {target}: {exc}") from exc
    if done.returncode != 0:
        why = done.stderr.decode("utf-8", "replace").strip()[:500]
        raise DiagramError(f"Graphviz ({program}) could not draw {target}: {why}")


@dataclass(frozen=True, slots=True)
class WrittenDiagram:
    """The files written, and why the images are missing (Graphviz not installed), if they are."""

    written: list[Path]
    missing_graphviz: str | None = None


def write_diagram(playbook: Playbook, out: Path, formats: list[str], *, required: bool) -> WrittenDiagram:
    """Write ``playbook.FORMAT`` into ``out`` for each format (svg, png, dot).

    Without Graphviz, ``playbook.dot`` is written instead of the images, with how to get them;
    that is an error (DiagramError) when the images were ``required`` (asked for by name).
    """
    text = playbook_dot(playbook)
    images = [f for f in formats if f != "dot"]
    program = dot_program()
    missing = None
    if images and program is None:
        missing = (
            f"Graphviz's dot program is not installed: {out / 'playbook.dot'} was written, but no "
            f"{' or '.join(i.upper() for i in images)}. Install Graphviz (Debian/Ubuntu: sudo apt-get install "
            "graphviz; macOS: brew install graphviz) and run nurture diagram again, or open the .dot file in any "
            "Graphviz viewer."
        )
        images = []
    written = []
    try:
        out.mkdir(parents=True, exist_ok=True)
        if "dot" in formats or missing:
            written.append(out / "playbook.dot")
            written[-1].write_text(text, encoding="utf-8")
    except OSError as exc:
        raise DiagramError(f"cannot write the diagram to {out}: {exc.strerror}") from exc
    if missing and required:
        raise DiagramError(missing)
    for image in images:
        assert program is not None
        render(text, image, out / f"playbook.{image}", program=program)
        written.append(out / f"playbook.{image}")
    return WrittenDiagram(written=written, missing_graphviz=missing)
