"""``nurture simulate``'s report for a terminal: the impact of a playbook change as a few tables.

Pure: builds rich renderables from an :class:`nurture.impact.Impact`; prints nothing itself.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from rich.table import Table

from nurture.history import Outcome
from nurture.impact import Impact
from nurture.playbook import Stage


def _signed(n: int) -> str:
    return f"+{n}" if n > 0 else str(n)


def _pair(before: int, after: int) -> str:
    return f"{before} → {after}" if before != after else str(before)


def stage_matrix(impact: Impact) -> Table:
    """Rows: the stage under the current playbook; columns: under the new one; cells: leads that differ."""
    table = Table(title="Leads in another stage now (rows: current playbook, columns: new)", title_justify="left")
    table.add_column("current ↓ / new →")
    for stage in Stage:
        table.add_column(stage.value, justify="right")
    for source in Stage:
        cells = [str(impact.matrix[(source, target)] or "·") if source != target else "" for target in Stage]
        table.add_row(source.value, *cells)
    return table


def email_table(impact: Impact) -> Table:
    table = Table(title="Emails per sequence and step over the window (current → new)", title_justify="left")
    rows = impact.email_rows()
    # Outcomes no step had under either playbook are left out, so the table fits a terminal.
    shown = [o for o in Outcome if o == Outcome.sent or any(r[o.value]["current"] or r[o.value]["new"] for r in rows)]
    for name in ("sequence", "step"):
        table.add_column(name)
    for outcome in shown:
        table.add_column(outcome.value, justify="right")
    table.add_column("sent Δ", justify="right")
    for row in rows:
        cells = [_pair(row[o.value]["current"], row[o.value]["new"]) for o in shown]
        table.add_row(row["sequence"], row["step"], *cells, _signed(row["sent"]["difference"]))
    return table


def most_affected_table(impact: Impact) -> Table:
    table = Table(title=f"Leads most affected (top {impact.top})", title_justify="left")
    for name in ("email", "stage", "score", "emails sent"):
        table.add_column(name, justify="left" if name in ("email", "stage") else "right")
    for lead in impact.most_affected:
        stage = lead.stage[0].value if lead.stage[0] == lead.stage[1] else f"{lead.stage[0]} → {lead.stage[1]}"
        score = f"{lead.score[0]:.1f} → {lead.score[1]:.1f}"
        table.add_row(lead.email, stage, score, _pair(*lead.sent))
    return table


def report(impact: Impact, *, current_path: str, new_path: str) -> Iterator[Any]:
    """The report, renderable by renderable."""
    yield (
        f"Simulated {impact.leads} leads from their first event to {impact.now:%Y-%m-%d %H:%M} UTC under "
        f"{current_path} (version {impact.current_version}, current) and {new_path} (version "
        f"{impact.new_version}, new); emails and transitions counted since {impact.since:%Y-%m-%d %H:%M} UTC."
    )
    if not impact.changed:
        yield (
            "No difference: every lead ends in the same stage with the same emails, and no in-flight "
            "enrollment is affected."
        )
        return
    yield (
        f"{impact.stage_differs} leads would be in another stage now, {impact.emails_differ} would get other emails "
        "in the window."
    )
    if impact.matrix:
        yield stage_matrix(impact)
    transitions = Table(title="Stage changes in the window", title_justify="left")
    for name in ("from", "to", "current", "new", "Δ"):
        transitions.add_column(name, justify="right" if name in ("current", "new", "Δ") else "left")
    moves = sorted(set(impact.transitions["current"]) | set(impact.transitions["new"]))
    for move in moves:
        before, after = impact.transitions["current"][move], impact.transitions["new"][move]
        transitions.add_row(move[0].value, move[1].value, str(before), str(after), _signed(after - before))
    if moves:
        yield transitions
    if impact.emails:
        yield email_table(impact)
    if impact.go_live:
        changes = ", ".join(f"{a} → {b}: {n}" for (a, b), n in sorted(impact.go_live.items()))
        yield (
            "When it goes live, the first cycle rescores every lead from its stage today; it would put "
            f"{sum(impact.go_live.values())} leads elsewhere than the current playbook does (current → new: {changes})."
        )
    if impact.inflight:
        inflight = Table(title=f"In-flight enrollments affected: {sum(impact.inflight.values())}", title_justify="left")
        for name in ("sequence", "change", "enrollments"):
            inflight.add_column(name, justify="right" if name == "enrollments" else "left")
        for (sequence, change), n in sorted(impact.inflight.items()):
            inflight.add_row(sequence, change, str(n))
        yield inflight
    if impact.most_affected:
        yield most_affected_table(impact)
