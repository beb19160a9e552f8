"""Read models for people: the funnel, and everything about one lead ("why this email?")."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import String, func, select
from sqlalchemy.orm import Session
from sqlmodel import col

from db.cycle import CLICK, OPEN, PROFILE_COLUMNS, paused_sequences
from db.models import Enrollment, Event, Lead, Message, ScoreChange, StageTransition, Suppression, WebhookDelivery
from nurture.delivery import MessageStatus
from nurture.importing import normalise_email
from nurture.playbook import Playbook, Stage
from nurture.population import SentEmail
from nurture.privacy import email_hash
from nurture.scoring import ActivityEvent, engagement_at, event_points, fit_breakdown
from nurture.sequences import Branch, next_step, pending_wait

STAGE_ORDER = [s.value for s in Stage]
MESSAGE_STATUSES = [s.value for s in MessageStatus]


# The latest score changes a report carries (a lead is rescored at most once a cycle).
SCORE_CHANGES_SHOWN = 200


def funnel(*, session: Session) -> dict[str, Any]:
    """Leads per stage, messages per status, the number of transitions, webhook deliveries per status."""
    by_stage = dict.fromkeys(STAGE_ORDER, 0)
    by_stage.update(
        {
            row[0]: int(row[1])
            for row in session.execute(select(col(Lead.stage), func.count()).group_by(col(Lead.stage)))
        }
    )
    by_status = dict.fromkeys(MESSAGE_STATUSES, 0)
    by_status.update(
        {
            row[0]: int(row[1])
            for row in session.execute(select(col(Message.status), func.count()).group_by(col(Message.status)))
        }
    )
    transitions = int(session.scalar(select(func.count()).select_from(StageTransition)) or 0)
    by_path = {
        f"{row[0]}→{row[1]}": int(row[2])
        for row in session.execute(
            select(col(StageTransition.from_stage), col(StageTransition.to_stage), func.count())
            .group_by(col(StageTransition.from_stage), col(StageTransition.to_stage))
            .order_by(col(StageTransition.from_stage), col(StageTransition.to_stage))
        )
    }
    # Outbound webhook deliveries, by status: only those that exist (most installations have none).
    webhooks = {
        str(row[0]): int(row[1])
        for row in session.execute(
            select(col(WebhookDelivery.status), func.count())
            .group_by(col(WebhookDelivery.status))
            .order_by(col(WebhookDelivery.status))
        )
    }
    return {
        "leads_by_stage": by_stage,
        "messages_by_status": by_status,
        "transitions": transitions,
        "transitions_by_path": by_path,
        "webhooks_by_status": webhooks,
    }


def emails_sent_twice(*, session: Session) -> dict[str, int]:
    """Per sequence, how many leads were sent one of its steps more than once (the demo's promise:
    none, unless the sequence's reentry rule allows a lead back in)."""
    sent = (
        select(col(Message.sequence), col(Message.lead_id), col(Message.step_id))
        .where(col(Message.status) == MessageStatus.sent)
        .group_by(col(Message.sequence), col(Message.lead_id), col(Message.step_id))
        .having(func.count() > 1)
        .subquery()
    )
    rows = session.execute(select(sent.c.sequence, func.count()).group_by(sent.c.sequence))
    return {str(sequence): int(n) for sequence, n in rows}


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def explain_lead(*, session: Session, email: str, playbook: Playbook, now: datetime) -> dict[str, Any] | None:
    """Everything about one lead: profile, score breakdown, history, enrollments, messages."""
    lead = session.scalars(select(Lead).where(col(Lead.email) == normalise_email(email))).first()
    if lead is None or lead.id is None:
        return None
    events = list(session.scalars(select(Event).where(col(Event.lead_id) == lead.id).order_by(col(Event.occurred_at))))
    scoring = playbook.scoring
    profile = {c: getattr(lead, c) for c in PROFILE_COLUMNS}
    counted = event_points([ActivityEvent(e.kind, e.occurred_at) for e in events if e.applied], scoring, now)
    breakdown = {
        "fit": fit_breakdown(profile, scoring.fit),
        "engagement_by_kind": {k: round(v, 2) for k, v in sorted(counted.by_kind.items(), key=lambda kv: -kv[1])},
        "engagement_now": round(engagement_at(lead.engagement, lead.scored_at, now, scoring.half_life), 2),
        "score_now": round(lead.fit_score + engagement_at(lead.engagement, lead.scored_at, now, scoring.half_life), 2),
        "half_life_days": scoring.half_life.total_seconds() / 86400,
        "events_not_yet_scored": sum(1 for e in events if not e.applied),
    }
    suppression = session.scalars(
        select(Suppression).where(col(Suppression.email_hash) == email_hash(lead.email))
    ).first()
    changes = session.scalars(
        select(ScoreChange)
        .where(col(ScoreChange.lead_id) == lead.id)
        .order_by(col(ScoreChange.at).desc(), col(ScoreChange.id).desc())
        .limit(SCORE_CHANGES_SHOWN)
    )
    transitions = session.scalars(
        select(StageTransition)
        .where(col(StageTransition.lead_id) == lead.id)
        .order_by(col(StageTransition.at), col(StageTransition.id))
    )
    enrollments = session.scalars(
        select(Enrollment)
        .where(col(Enrollment.lead_id) == lead.id)
        .order_by(col(Enrollment.started_at), col(Enrollment.id))
    )
    messages = session.scalars(
        select(Message).where(col(Message.lead_id) == lead.id).order_by(col(Message.due_at), col(Message.id))
    )
    engaged = _engagement_by_message(events)
    deliveries = session.scalars(
        select(WebhookDelivery)
        .where(col(WebhookDelivery.lead_id) == lead.id)
        .order_by(col(WebhookDelivery.created_at), col(WebhookDelivery.id))
    )
    return {
        "lead": {
            "id": lead.id,
            **profile,
            "stage": lead.stage,
            "score": round(lead.score, 2),
            "fit_score": round(lead.fit_score, 2),
            "engagement": round(lead.engagement, 2),
            "scored_at": _iso(lead.scored_at),
            "next_review_at": _iso(lead.next_review_at),
        },
        "score_breakdown": breakdown,
        # What other systems were told about the lead (outbound webhooks), and whether they heard it.
        "webhooks": [
            {
                "id": d.id,
                "webhook": d.webhook,
                "event": d.event,
                "status": d.status,
                "at": _iso(d.created_at),
                "delivered_at": _iso(d.delivered_at),
                "attempts": d.attempts,
                "last_error": d.last_error,
            }
            for d in deliveries
        ],
        "suppression": (
            {"reason": suppression.reason, "at": _iso(suppression.at), "source": suppression.source}
            if suppression
            else ({"reason": lead.suppressed} if lead.suppressed else None)
        ),
        "events": [
            {
                "kind": e.kind,
                "occurred_at": _iso(e.occurred_at),
                "source": e.source,
                "scored": e.applied,
                "properties": e.properties,
            }
            for e in events[-50:]
        ],
        "events_total": len(events),
        "activity": _activity_by_day(events),
        "score_changes_total": session.scalar(
            select(func.count()).select_from(ScoreChange).where(col(ScoreChange.lead_id) == lead.id)
        ),
        "paused_sequences": sorted(paused_sequences(session=session)),
        "score_changes": [
            {
                "at": _iso(c.at),
                "old": round(c.old_score, 2),
                "new": round(c.new_score, 2),
                "contributions": c.contributions,
                "playbook_version": c.playbook_version,
            }
            for c in changes
        ],
        "transitions": [
            {
                "id": t.id,
                "from": t.from_stage,
                "to": t.to_stage,
                "at": _iso(t.at),
                "score": round(t.score, 2),
                "reason": t.reason,
                "playbook_version": t.playbook_version,
                "flow_run_id": t.flow_run_id,
            }
            for t in transitions
        ],
        "enrollments": [
            {
                "id": e.id,
                "sequence": e.sequence,
                "stage": e.stage,
                "transition_id": e.transition_id,
                "started_at": _iso(e.started_at),
                "state": e.state,
                "exit_reason": e.exit_reason,
                "ended_at": _iso(e.ended_at),
                "steps_done": list(e.steps_done),
                "branches": list(e.branches),
                "waiting_for": wait[0] if (wait := _wait(playbook, e) if e.state == "active" else None) else None,
                "waiting_until": _iso(wait[1]) if wait else None,
                "next_step": _next_step_id(playbook, e) if e.state == "active" else None,
                "next_due_at": _iso(e.next_due_at),
                "converted_at": _iso(e.converted_at),
                "converted_after_step": e.converted_after_step,
            }
            for e in enrollments
        ],
        "messages": [
            {
                "id": m.id,
                "sequence": m.sequence,
                "step": m.step,
                "step_id": m.step_id,
                "template": m.template,
                "variant": m.variant,
                "opened_at": _iso(engaged.get((m.id, OPEN))),
                "clicked_at": _iso(engaged.get((m.id, CLICK))),
                "playbook_version": m.playbook_version,
                "status": m.status,
                "subject": m.subject,
                "due_at": _iso(m.due_at),
                "sent_at": _iso(m.sent_at),
                "attempts": m.attempts,
                "enrollment_id": m.enrollment_id,
                "last_error": m.last_error,
                "idempotency_key": m.idempotency_key,
            }
            for m in messages
        ],
    }


def _activity_by_day(events: list[Event]) -> list[dict[str, Any]]:
    """Every event of the lead, counted per UTC day and kind (a timeline line per day, however many events)."""
    days: dict[tuple[str, str], dict[str, Any]] = {}
    for event in events:  # oldest first
        key = (event.occurred_at.date().isoformat(), event.kind)
        row = days.setdefault(key, {"day": key[0], "kind": event.kind, "count": 0, "unscored": 0, "first_at": None})
        row["count"] += 1
        row["unscored"] += 0 if event.applied else 1
        row["first_at"] = row["first_at"] or _iso(event.occurred_at)
    return list(days.values())


def _engagement_by_message(events: list[Event]) -> dict[tuple[int | None, str], datetime]:
    """When the lead first opened and clicked each of its emails (SendGrid's events carry the message id)."""
    first: dict[tuple[int | None, str], datetime] = {}
    for event in events:  # oldest first
        if event.kind in (OPEN, CLICK):
            message_id = str((event.properties or {}).get("nurture_message_id"))
            if message_id.isdigit():
                first.setdefault((int(message_id), event.kind), event.occurred_at)
    return first


def _next_step_id(playbook: Playbook, enrollment: Enrollment) -> str | None:
    """The step an active enrollment takes next under the playbook as it is now (None: none left or
    a wait decides it)."""
    found = playbook.sequences.get(enrollment.sequence)
    if found is None:
        return None
    branches = [Branch.from_json(b) for b in enrollment.branches]
    if pending_wait(found, enrollment.steps_done, branches) is not None:
        return None
    step = next_step(found, enrollment.steps_done, branches)
    return None if step is None else step[1].id


def _wait(playbook: Playbook, enrollment: Enrollment) -> tuple[str, datetime] | None:
    """What an active enrollment's wait is for, with where each answer leads ("clicked welcome: then
    case_study, else welcome_nudge"), and its deadline; None when it is not waiting (or its step is in flight).

    The deadline is counted from when the step settled under the playbook as it is now, as the walk
    counts it (``waiting_until`` is what the walk last wrote, and empty before it first looked)."""
    found = playbook.sequences.get(enrollment.sequence)
    branches = [Branch.from_json(b) for b in enrollment.branches]
    step = None if found is None else pending_wait(found, enrollment.steps_done, branches)
    if step is None or step.wait_for is None or enrollment.next_due_at is None:  # None: its step is in flight
        return None
    settled = enrollment.last_step_at or enrollment.started_at
    what = f"{step.wait_for.describe()}: then {step.then or 'the next step'}, else {step.else_ or 'the next step'}"
    return what, settled + step.wait_for.within


def emails_sent_between(*, session: Session, start: datetime, end: datetime) -> list[SentEmail]:
    """The emails sent in ``(start, end]``, with their addresses and variants (for the demo's readers)."""
    query = (
        select(col(Message.id), col(Lead.email), col(Message.sent_at), col(Message.variant))
        .join(Lead, col(Lead.id) == col(Message.lead_id))
        .where(col(Message.status) == MessageStatus.sent, col(Message.sent_at) > start, col(Message.sent_at) <= end)
        .order_by(col(Message.id))
    )
    return [SentEmail(int(mid), email, sent_at, variant) for mid, email, sent_at, variant in session.execute(query)]


def reacting_lead(*, session: Session) -> str | None:
    """A lead whose sequence reacted to it: converted after a branch, else any branch or conversion
    (the demo's `nurture explain` example of goals and branches), preferring one who opened or clicked
    an email, so the example shows what the sequence reacted to."""
    branched = func.coalesce(func.length(func.cast(col(Enrollment.branches), String())), 0) > 2
    converted = col(Enrollment.state) == "converted"
    engaged = (
        select(col(Event.id)).where(col(Event.lead_id) == col(Lead.id), col(Event.kind).in_([OPEN, CLICK])).exists()
    )
    reactions = (branched & converted, converted, branched)
    for condition in [r & engaged for r in reactions] + list(reactions):
        email = session.scalar(
            select(col(Lead.email))
            .join(Enrollment, col(Enrollment.lead_id) == col(Lead.id))
            .where(condition)
            .order_by(col(Enrollment.id))
            .limit(1)
        )
        if email:
            return email
    return None


def story_lead(*, session: Session) -> str | None:
    """A customer who went through the most stages: the best `nurture explain` example."""
    query = (
        select(col(Lead.email))
        .join(StageTransition, col(StageTransition.lead_id) == col(Lead.id))
        .where(col(Lead.stage) == Stage.customer.value)
        .group_by(col(Lead.email))
        .order_by(func.count().desc(), col(Lead.email))
        .limit(1)
    )
    return session.scalar(query) or session.scalar(select(col(Lead.email)).order_by(col(Lead.id)).limit(1))


def stored_event_kinds(*, session: Session) -> set[str]:
    """Every event kind the database holds (``nurture validate --database`` accepts them as known)."""
    return {str(kind) for kind in session.scalars(select(col(Event.kind)).distinct())}
