"""What must hold after any trial of the suites, however the processes were killed or overlapped.

Checked against the database and the fake SendGrid's own log (what it was asked and
what it accepted), or the API's answers as its clients recorded them — never against
what nurture says about itself afterwards.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session
from sqlmodel import col

from db.engine import session_scope
from db.inbound import ingest_provider_events
from db.models import Enrollment, Event, Lead, Message, ScoreChange, StageTransition, Suppression
from nurture.delivery import MessageStatus
from nurture.inbound import ProviderEvent
from nurture.playbook import Playbook, Stage
from nurture.privacy import email_hash


@dataclass
class Verdict:
    """Counts of one trial; ``violations`` lists every broken promise in words."""

    messages: Counter[str] = field(default_factory=Counter)
    accepted: int = 0
    in_doubt: int = 0
    in_doubt_never_requested: int = 0
    settled_by_events: int = 0
    violations: list[str] = field(default_factory=list)


def settle_with_provider_events(*, engine: Engine, accepted_ids: list[str], now: datetime) -> int:
    """Deliver SendGrid's ``processed`` event for every accepted message, through the webhook's own path."""
    ids = sorted({int(i) for i in accepted_ids if i.isdigit()})
    with session_scope(engine) as session:
        rows = session.execute(
            select(col(Message.id), col(Lead.email), col(Message.status))
            .join(Lead, col(Lead.id) == col(Message.lead_id))
            .where(col(Message.id).in_(ids))
        ).all()
        doubtful = sum(1 for row in rows if row.status == MessageStatus.in_doubt)
        events = [
            ProviderEvent(
                event_type="processed",
                email=row.email,
                occurred_at=now,
                external_id=f"processed-{row.id}",
                message_id=int(row.id),
                provider_message_id=f"sg-{row.id}",
                reason=None,
            )
            for row in rows
        ]
        ingest_provider_events(session=session, events=events, now=now)
    return doubtful


def check(
    *,
    engine: Engine,
    playbook: Playbook,
    requested: list[str],
    accepted: list[str],
    now: datetime,
    in_doubt_bound: int,
    bounced: Collection[str] = (),
) -> Verdict:
    """Every promise, after the trial finished (and after SendGrid's events were delivered).

    ``bounced`` names messages SendGrid reported bounced (or dropped): ``failed`` is their right end.
    """
    verdict = Verdict(accepted=len(accepted))
    times_accepted = Counter(accepted)
    twice = sorted(i for i, n in times_accepted.items() if n > 1)
    if twice:
        verdict.violations.append(f"accepted more than once by SendGrid: messages {twice[:10]}")
    with session_scope(engine) as session:
        messages = session.execute(
            select(col(Message.id), col(Message.status), col(Message.due_at), col(Message.enrollment_id))
        ).all()
        status_of = {str(m.id): m.status for m in messages}
        verdict.messages = Counter(m.status for m in messages)
        bounced_failed = {i for i in bounced if status_of.get(i) == MessageStatus.failed}
        not_sent = sorted(
            i for i in times_accepted if status_of.get(i) != MessageStatus.sent and i not in bounced_failed
        )
        if not_sent:
            verdict.violations.append(
                f"accepted by SendGrid but not recorded sent: {[(i, status_of.get(i)) for i in not_sent[:10]]}"
            )
        stuck = [m.id for m in messages if m.status in (MessageStatus.claimed, MessageStatus.sending)]
        if stuck:
            verdict.violations.append(f"still claimed or sending after the trial finished: {stuck[:10]}")
        overdue = [m.id for m in messages if m.status == MessageStatus.queued and m.due_at <= now]
        if overdue:
            verdict.violations.append(f"due, queued, never sent (lost): {overdue[:10]}")
        failed = [m.id for m in messages if m.status == MessageStatus.failed and str(m.id) not in bounced_failed]
        if failed:
            verdict.violations.append(f"failed although SendGrid only had transient faults: {failed[:10]}")
        doubtful = [str(m.id) for m in messages if m.status == MessageStatus.in_doubt]
        verdict.in_doubt = len(doubtful)
        verdict.in_doubt_never_requested = len(set(doubtful) - set(requested))
        if len(doubtful) > in_doubt_bound:
            verdict.violations.append(f"{len(doubtful)} messages in doubt, more than the {in_doubt_bound} in flight")

        _check_history(session, playbook, verdict)
    return verdict


def _check_history(session: Session, playbook: Playbook, verdict: Verdict) -> None:
    """Transitions have their enrollments and messages; stage = last transition; ledger = score."""
    transitions = session.execute(
        select(
            col(StageTransition.id),
            col(StageTransition.lead_id),
            col(StageTransition.from_stage),
            col(StageTransition.to_stage),
            col(StageTransition.at),
        ).order_by(col(StageTransition.at), col(StageTransition.id))
    ).all()
    same_moment = Counter((t.lead_id, t.at) for t in transitions)
    doubled = [key for key, n in same_moment.items() if n > 1]
    if doubled:
        verdict.violations.append(f"a lead transitioned twice at one moment: {doubled[:5]}")
    enrolled: dict[int, set[str]] = defaultdict(set)
    enrollment_rows = session.execute(
        select(
            col(Enrollment.id),
            col(Enrollment.transition_id),
            col(Enrollment.sequence),
            col(Enrollment.state),
            col(Enrollment.steps_done),
            col(Enrollment.next_due_at),
        )
    ).all()
    for row in enrollment_rows:
        enrolled[int(row.transition_id)].add(row.sequence)
    for t in transitions:
        expected = set(playbook.sequences_for(Stage(t.from_stage), Stage(t.to_stage)))
        if enrolled.get(int(t.id), set()) != expected:
            verdict.violations.append(f"transition {t.id} has enrollments {enrolled.get(int(t.id))}, not {expected}")
    step_messages = session.execute(select(col(Message.enrollment_id), col(Message.step_id), col(Message.status))).all()
    per_step = Counter((int(m.enrollment_id), m.step_id) for m in step_messages)
    twice = [key for key, n in per_step.items() if n > 1]
    if twice:
        verdict.violations.append(f"a step decided twice in one enrollment: {twice[:5]}")
    status_of_step = {(int(m.enrollment_id), m.step_id): m.status for m in step_messages}
    unsettled = (MessageStatus.queued, MessageStatus.claimed, MessageStatus.sending)
    for row in enrollment_rows:
        if row.state != "active":
            if row.next_due_at is not None:
                verdict.violations.append(f"enrollment {row.id} ended ({row.state}) but has a next step due")
            continue
        if row.next_due_at is None:
            # Waiting for its step in flight: that message must still be on its way.
            in_flight = status_of_step.get((int(row.id), (row.steps_done or [None])[-1]))
            if in_flight not in unsettled:
                verdict.violations.append(
                    f"enrollment {row.id} is stuck: it waits for a step whose message is {in_flight}"
                )
    last_stage: dict[int, str] = {}
    for t in transitions:
        last_stage[int(t.lead_id)] = t.to_stage
    last_score: dict[int, float] = {}
    for lead_id, new_score in session.execute(
        select(col(ScoreChange.lead_id), col(ScoreChange.new_score)).order_by(col(ScoreChange.at), col(ScoreChange.id))
    ):
        last_score[int(lead_id)] = float(new_score)
    for lead in session.execute(select(col(Lead.id), col(Lead.stage), col(Lead.score), col(Lead.scored_at))):
        if lead.stage != last_stage.get(int(lead.id), Stage.cold.value):
            verdict.violations.append(f"lead {lead.id} is {lead.stage}, its last transition says otherwise")
        if lead.scored_at is not None and abs(last_score.get(int(lead.id), float("nan")) - lead.score) > 1e-6:
            verdict.violations.append(
                f"lead {lead.id}: score {lead.score} but the ledger's last row says {last_score.get(int(lead.id))}"
            )


@dataclass(frozen=True)
class Acknowledged:
    """What the API's answers promised, as its clients recorded them."""

    events: Collection[tuple[str, str]]  # (source, external id) of every acknowledged event
    suppressed_at: Mapping[str, datetime]  # address → when a suppression of it was first acknowledged
    leads_created: int  # summed over the answers
    suppressions_added: int  # summed over the JSON answers (the unsubscribe page gives no count)
    answers_lost: bool  # a connection broke: something may be stored that was never acknowledged


@dataclass
class InboundVerdict:
    lost: int = 0
    duplicates: int = 0
    stored_unacknowledged: int = 0
    violations: list[str] = field(default_factory=list)


def check_inbound(*, engine: Engine, acknowledged: Acknowledged, leads_before: int) -> InboundVerdict:
    """Every acknowledged event stored once and scored, nothing else stored; the answers' counts are
    the rows stored; every suppressed address suppressed, and mailed by nothing that started after."""
    verdict = InboundVerdict()
    with session_scope(engine) as session:
        events = session.execute(
            select(col(Event.source), col(Event.external_id), col(Event.applied)).where(
                col(Event.source).in_(["api", "sendgrid"])
            )
        ).all()
        leads = int(session.scalar(select(func.count()).select_from(Lead)) or 0)
        sources = col(Suppression.source).in_(["api", "sendgrid"])
        suppressions = int(session.scalar(select(func.count()).where(sources)) or 0)
        hashes = set(session.scalars(select(col(Suppression.email_hash))))
        started = session.execute(
            select(col(Lead.email), col(Message.id), col(Message.send_started_at))
            .join(Lead, col(Lead.id) == col(Message.lead_id))
            .where(col(Message.send_started_at).is_not(None))
        ).all()
    copies = Counter((source, external_id) for source, external_id, _ in events)
    scored = {(source, external_id): applied for source, external_id, applied in events}
    lost = [key for key in acknowledged.events if key not in scored]
    unacknowledged = [key for key in scored if key not in acknowledged.events]
    verdict.lost, verdict.stored_unacknowledged = len(lost), len(unacknowledged)
    verdict.duplicates = sum(1 for n in copies.values() if n > 1)
    if lost:
        verdict.violations.append(f"acknowledged but not stored: {lost[:10]}")
    if unacknowledged and not acknowledged.answers_lost:
        # Without a lost answer, only a refusal or a 503 could have stored these.
        verdict.violations.append(f"stored, never acknowledged: {unacknowledged[:10]}")
    unscored = [key for key in acknowledged.events if key in scored and not scored[key]]
    if unscored:
        verdict.violations.append(f"{len(unscored)} acknowledged events not scored by the last cycle: {unscored[:5]}")
    if leads - leads_before != acknowledged.leads_created:
        verdict.violations.append(
            f"answers said {acknowledged.leads_created} leads created, the database has {leads - leads_before}"
        )
    if suppressions != acknowledged.suppressions_added:
        verdict.violations.append(
            f"answers said {acknowledged.suppressions_added} suppressions added, the database has {suppressions}"
        )
    missing = [email for email in acknowledged.suppressed_at if email_hash(email) not in hashes]
    if missing:
        verdict.violations.append(f"{len(missing)} addresses not suppressed: {missing[:5]}")
    late = [
        (email, message_id)
        for email, message_id, at in started
        if email in acknowledged.suppressed_at and at > acknowledged.suppressed_at[email]
    ]
    if late:
        verdict.violations.append(f"emails started after their address's suppression was acknowledged: {late[:5]}")
    return verdict
