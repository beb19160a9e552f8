"""One lead's story as a timeline a marketer reads at 80 columns (`nurture explain`).

Turns the report of ``db.reports.explain_lead`` into lines: who the lead is and why it
has its score; then, oldest first, its activity (one line per day), score changes with
their rule-by-rule contributions, stage changes, enrollments, each email with its
status, step, variant and why, the branches and goals of its sequences, what webhooks
told other systems about it, and its suppression; last, *what happens next*: the next
step and when, or why nothing will, and when decay alone would move the lead to another
stage.

Pure: no clock, no database; ``now`` is a parameter.
"""

from __future__ import annotations

import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nurture.lifecycle import review_thresholds, target_stage
from nurture.playbook import Playbook, Stage
from nurture.scoring import engagement_at, next_review_at

WIDTH = 80
_STAMP = 16  # "2026-10-15 18:00"
_GAP = "  "

# Order of entries that share a timestamp: what happened first reads first.
_ORDER = (
    "activity",
    "score",
    "transition",
    "enrollment",
    "email",
    "branch",
    "goal",
    "ended",
    "webhook",
    "suppression",
)


@dataclass(frozen=True)
class Entry:
    at: datetime
    kind: str
    text: str
    detail: tuple[str, ...] = ()


def _at(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


def _stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%d %H:%M")


def _short(at: datetime | None) -> str:
    return at.strftime("%m-%d %H:%M") if at else "?"


def _points(value: float) -> str:
    return f"{value:+.1f}".replace("-", "−")


def _score_text(change: Mapping[str, Any]) -> str:
    parts = []
    for key, value in sorted(change["contributions"].items(), key=lambda kv: -abs(kv[1])):
        label = key.removeprefix("event: ")
        parts.append(f"{label} {_points(value)}")
    why = f": {', '.join(parts)}" if parts else ""
    return f"score {change['old']:g} → {change['new']:g}{why}"


def _activity(report: Mapping[str, Any]) -> Iterable[Entry]:
    """One entry per UTC day: the kinds of event the lead produced, with counts."""
    days: dict[str, list[Mapping[str, Any]]] = {}
    for row in report.get("activity", []):
        days.setdefault(row["day"], []).append(row)
    for rows in days.values():
        first = min(_time(r["first_at"]) for r in rows)
        kinds = ", ".join(r["kind"] if r["count"] == 1 else f"{r['kind']} ×{r['count']}" for r in rows)
        unscored = sum(r["unscored"] for r in rows)
        tail = f" ({unscored} not scored yet)" if unscored else ""
        yield Entry(first, "activity", f"· {kinds}{tail}")


def _email(message: Mapping[str, Any], enrollment: Mapping[str, Any], transition: Mapping[str, Any]) -> Entry:
    at = _time(message["sent_at"] or message["due_at"])  # a message is always due at some time
    step = message["step_id"] + (f" (variant {message['variant']})" if message["variant"] else "")
    detail = [f'"{message["subject"]}"'] if message["subject"] else []
    why = f"{message['sequence']}, step {message['step'] + 1}"
    if transition:
        moved = _at(transition["at"])
        why += f", started by {transition['from']} → {transition['to']} on {moved:%Y-%m-%d}" if moved else ""
    detail.append(f"why: {why}")
    engaged = [
        f"{what} {_short(_at(message[key]))}"
        for what, key in (("opened", "opened_at"), ("clicked", "clicked_at"))
        if message[key]
    ]
    if engaged:
        detail.append(", ".join(engaged))
    if message["last_error"]:
        detail.append(f"{message['status']}: {message['last_error']}")
    elif message["status"] in ("queued", "claimed") and message["due_at"]:
        detail.append(f"due {message['due_at'][:16].replace('T', ' ')}")
    template = f" (template {message['template']})" if message["template"] != message["step_id"] else ""
    text = f"✉ {message['status']}: {message['sequence']}/{step}{template}"
    return Entry(at, "email", text, tuple(detail))


def _enrollment_entries(enrollment: Mapping[str, Any]) -> Iterable[Entry]:
    name = enrollment["sequence"]
    started = _at(enrollment["started_at"])
    if started is None:
        return
    if enrollment["state"] == "skipped":
        yield Entry(started, "enrollment", f"not entered {name}: {enrollment['exit_reason']}")
        return
    yield Entry(started, "enrollment", f"→ enrolled in {name}")
    for branch in enrollment["branches"]:
        at = _at(branch.get("at"))
        if at is not None:
            to = branch.get("to") or "the next step"
            took = "yes" if branch.get("took") == "then" else "no"
            yield Entry(at, "branch", f"{name}: after {branch['step']}, condition met? {took} → {to}")
    if enrollment["state"] == "converted":
        at = _at(enrollment["converted_at"]) or started
        after = enrollment["converted_after_step"]
        where = f"after step {after}" if after else "before its first step"
        yield Entry(at, "goal", f"★ {name} reached its goal {where}: {enrollment['exit_reason']}")
    elif enrollment["state"] != "active":
        at = _at(enrollment.get("ended_at")) or started
        reason = f": {enrollment['exit_reason']}" if enrollment["exit_reason"] else ""
        yield Entry(at, "ended", f"{name} {enrollment['state']}{reason}")


def entries(report: Mapping[str, Any]) -> list[Entry]:
    """Everything that happened to the lead, oldest first."""
    found: list[Entry] = list(_activity(report))
    for change in report["score_changes"]:
        found.append(Entry(_time(change["at"]), "score", _score_text(change)))
    transitions = {t["id"]: t for t in report["transitions"]}
    for t in report["transitions"]:
        found.append(Entry(_time(t["at"]), "transition", f"▶ {t['from']} → {t['to']}: {t['reason']}"))
    enrollments = {e["id"]: e for e in report["enrollments"]}
    for e in report["enrollments"]:
        found.extend(_enrollment_entries(e))
    for m in report["messages"]:
        enrollment = enrollments.get(m["enrollment_id"], {})
        found.append(_email(m, enrollment, transitions.get(enrollment.get("transition_id"), {})))
    for d in report.get("webhooks", ()):
        why = f" ({d['last_error']})" if d["status"] in ("dead", "in_doubt", "failed") and d.get("last_error") else ""
        text = f"↗ webhook {d['webhook']} told {d['event']}: {d['status']}{why}"
        found.append(Entry(_time(d["at"]), "webhook", text))
    suppression = report["suppression"]
    if suppression and suppression.get("at"):
        source = f" ({suppression['source']})" if suppression.get("source") else ""
        text = f"⛔ suppressed: {suppression['reason']}{source}"
        found.append(Entry(_time(suppression["at"]), "suppression", text))
    return sorted(found, key=lambda e: (e.at, _ORDER.index(e.kind)))


def what_next(report: Mapping[str, Any], playbook: Playbook, now: datetime) -> list[str]:
    """The next email and when, or why none will go out; and when decay alone would change the stage."""
    lead = report["lead"]
    lines: list[str] = []
    suppression = report["suppression"]
    paused = set(report.get("paused_sequences", ()))
    active = [e for e in report["enrollments"] if e["state"] == "active"]
    if suppression:
        lines.append(f"No email will go out: the address is suppressed ({suppression['reason']}).")
    for e in active:
        name = e["sequence"]
        if name not in playbook.sequences:
            lines.append(f"{name}: no longer in the playbook; its enrollment ends at the next cycle.")
        elif e["waiting_for"]:
            lines.append(f"{name}: waiting until {_when(e['waiting_until'])} for {e['waiting_for']}.")
        elif e["next_step"]:
            due = f"due {_when(e['next_due_at'])}" if e["next_due_at"] else "being sent"
            hold = " (the contact policy may hold it: quiet hours, send window, frequency cap)"
            lines.append(f"{name}: next step {e['next_step']}, {due}{hold}.")
        else:
            lines.append(f"{name}: no step left; the enrollment ends at the next cycle.")
        if name in paused:
            lines.append(f"  {name} is paused: nothing of it goes out until `nurture sequences resume {name}`.")
    if not active and not suppression:
        if lead["stage"] == Stage.customer:
            lines.append("No sequence is running, and a customer stays one: nurture sends it nothing more.")
        else:
            lines.append("No sequence is running: the next email comes with the lead's next stage change.")
    lines.extend(_outlook(lead, playbook, now))
    return lines


def _when(value: str | None) -> str:
    return value[:16].replace("T", " ") if value else "?"


def _outlook(lead: Mapping[str, Any], playbook: Playbook, now: datetime) -> list[str]:
    """When decay alone would carry the lead to another stage, and the sequences that move starts."""
    stage = Stage(lead["stage"])
    if stage == Stage.customer:
        return []
    scored_at = _at(lead["scored_at"])
    half_life = playbook.scoring.half_life
    engagement = engagement_at(lead["engagement"], scored_at, now, half_life)
    fit = lead["fit_score"]
    # Each threshold decay crosses, soonest first: the first that changes the target stage is the move.
    crossings = sorted(
        at
        for threshold in review_thresholds(playbook.stages)
        if (at := next_review_at(fit=fit, engagement=engagement, now=now, half_life=half_life, thresholds=[threshold]))
    )
    for at in crossings:
        later = fit + engagement_at(engagement, now, at, half_life)
        target = target_stage(later, stage, playbook.stages)
        if target != stage:
            starts = playbook.sequences_for(stage, target)
            then = f", which starts {', '.join(starts)}" if starts else ", which starts no sequence"
            return [f"Without new activity, on {at:%Y-%m-%d} the score falls to {later:.1f}: {stage} → {target}{then}."]
    return [f"Without new activity the score settles towards its fit, {fit:g}, and the stage stays {stage}."]


def _wrapped(first: str, text: str, width: int) -> list[str]:
    indent = " " * (_STAMP + len(_GAP))
    return textwrap.wrap(
        text, width=width, initial_indent=first, subsequent_indent=indent + "  ", break_on_hyphens=False
    ) or [first.rstrip()]


def render(report: Mapping[str, Any], playbook: Playbook, now: datetime, *, width: int = WIDTH) -> list[str]:
    """The whole story as lines of at most ``width`` characters (a word longer than that is kept whole)."""
    lead = report["lead"]
    b = report["score_breakdown"]
    name = " ".join(p for p in (lead["first_name"], lead["last_name"]) if p)
    lines = textwrap.wrap(f"{name} <{lead['email']}>" if name else lead["email"], width)
    about = ", ".join(p for p in (lead["job_title"], lead["company"], lead["country"], lead["timezone"]) if p)
    lines += textwrap.wrap(about, width) if about else []
    lines += textwrap.wrap(
        f"Stage {lead['stage']}, score {b['score_now']:g} now = fit {lead['fit_score']:g} + engagement "
        f"{b['engagement_now']:g} (half-life {b['half_life_days']:g} days)",
        width,
    )
    fit = ", ".join(f"{k} {_points(v)}" for k, v in b["fit"].items()) or "no rule matches"
    lines += textwrap.wrap(f"fit: {fit}", width, initial_indent="  ", subsequent_indent="    ")
    engaged = ", ".join(f"{k} {_points(v)}" for k, v in b["engagement_by_kind"].items()) or "no events"
    lines += textwrap.wrap(f"engagement now: {engaged}", width, initial_indent="  ", subsequent_indent="    ")
    lines += ["", "Timeline (UTC)"]
    if len(report["score_changes"]) < report.get("score_changes_total", 0):
        lines.append(f"  (the last {len(report['score_changes'])} score changes; all of them: --json)")
    indent = " " * (_STAMP + len(_GAP))
    previous = ""
    for entry in entries(report):
        stamp = _stamp(entry.at)
        shown = stamp if stamp != previous else " " * _STAMP
        previous = stamp
        lines += _wrapped(shown + _GAP, entry.text, width)
        for detail in entry.detail:
            lines += textwrap.wrap(
                detail, width, initial_indent=indent + "  ", subsequent_indent=indent + "    ", break_on_hyphens=False
            )
    lines += ["", "What happens next"]
    for line in what_next(report, playbook, now):
        lines += textwrap.wrap(line, width, initial_indent="  ", subsequent_indent="    ")
    return lines
