"""`nurture report` for people: one table per sequence that fits 80 columns, then the split-test verdicts."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator

from rich import box
from rich.console import RenderableType
from rich.table import Table
from rich.text import Text

from nurture.reporting import Report, SequenceReport, StepCounts
from nurture.verdicts import Call

VERDICT_STYLE = {Call.winner: "green", Call.no_difference: "yellow", Call.too_small: "dim"}


def _with_rate(counts: StepCounts, name: str) -> str:
    rate = counts.rate(name)
    value = getattr(counts, name)
    return f"{value:,}" if rate is None else f"{value:,} {rate * 100:.0f}%"


def _cells(label: str, counts: StepCounts) -> list[str]:
    return [
        label,
        f"{counts.sent:,}",
        f"{counts.delivered:,}",
        _with_rate(counts, "opened"),
        _with_rate(counts, "clicked"),
        _with_rate(counts, "converted"),
        f"{counts.bounced:,}",
        f"{counts.unsubscribed:,}",
        f"{counts.spam:,}",
        f"{counts.machine_opened:,}",
    ]


def sequence_table(sequence: SequenceReport) -> Table:
    title = sequence.sequence + ("" if sequence.in_playbook else " (no longer in the playbook)")
    table = Table(
        title=title, title_justify="left", box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False, collapse_padding=True
    )
    table.add_column("step", overflow="ellipsis", no_wrap=True, min_width=12, max_width=24)
    for name in ("sent", "deliv", "opened", "clicked", "conv", "bnc", "unsub", "spam", "mach"):
        table.add_column(name, justify="right", no_wrap=True)
    for step in sequence.steps:
        label = step.step + ("" if step.in_playbook else " (removed)")
        table.add_row(*_cells(label, step.total))
        for variant in step.variants:
            table.add_row(*_cells(f"· {variant.variant}", variant), style="dim")
    if len(sequence.steps) > 1:
        table.add_section()
        table.add_row(*_cells("all steps", sequence.total), style="bold")
    return table


def verdict_lines(report: Report) -> Iterator[Text]:
    for sequence in report.sequences:
        for step in sequence.steps:
            if step.verdict is None:
                continue
            line = Text(f"{sequence.sequence}/{step.step}: ", style="bold")
            line.append(step.verdict.summary, style=VERDICT_STYLE[step.verdict.call])
            yield line


def render(report: Report) -> Iterator[RenderableType]:
    """What the terminal shows: the period, a table per sequence, the verdicts, how to read them."""
    period = report.period
    yield Text(
        f"Emails sent {period.get('since', '?')} → {period.get('until', '?')}; conversions within "
        f"{period.get('conversion_window', '?')} of an email; rates per delivered email.",
    )
    if not report.sequences:
        yield Text("No email was sent in this period.", style="yellow")
        return
    for sequence in report.sequences:
        yield sequence_table(sequence)
    verdicts = list(verdict_lines(report))
    if verdicts:
        yield Text("Split tests (machine opens never count as opens):", style="bold")
        yield from verdicts
    yield Text(
        "opened, clicked: emails opened or clicked by a person (twice is once); conv: converted within the window; "
        "bnc: bounced; mach: opened by a machine (Apple Mail Privacy Protection), not counted as opened.",
        style="dim",
    )


def report_csv(report: Report) -> str:
    """One row per step and per variant, rates as fractions: for a spreadsheet."""
    rows = report.rows()
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()
