"""The tables: every score change, transition, enrollment and message is kept.

Timestamps are UTC-aware in Python on every engine (``UTCDateTime``). Each table
is indexed for the query that reads it on a hot path; the comment on an index
names that query.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, Index, Integer, String, UniqueConstraint, text
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.visitors import InternalTraversal
from sqlalchemy.types import NullType, TypeDecorator
from sqlmodel import Field, SQLModel


class Flag(ColumnElement[bool]):
    """A boolean column tested as the partial indexes state it: ``applied`` / ``NOT applied``.

    SQLAlchemy writes ``applied = 0`` on SQLite and ``applied IS false`` for ``is_(False)``; neither
    matches an index's ``WHERE NOT applied``, so both engines would scan the whole table instead.
    """

    inherit_cache = True
    _traverse_internals = [  # noqa: RUF012 (SQLAlchemy reads it from the class)
        ("column", InternalTraversal.dp_clauseelement),
        ("value", InternalTraversal.dp_boolean),
    ]
    # Untyped: a Boolean would make SQLAlchemy append "= 1" on SQLite, the form the index does not state.
    type = NullType()  # type: ignore[assignment]

    def __init__(self, column: Any, value: bool) -> None:
        self.column = column
        self.value = value


@compiles(Flag)
def _compile_flag(element: Flag, compiler: Any, **kw: Any) -> str:
    column = compiler.process(element.column, **kw)
    return column if element.value else f"NOT {column}"


def is_pending(applied: Any) -> Flag:
    """An event not yet counted in its lead's score, as ``ix_event_pending`` states it."""
    return Flag(applied, value=False)


def needs_rescore(column: Any) -> Flag:
    """A lead whose profile changed since its score, as ``ix_lead_needs_rescore`` states it."""
    return Flag(column, value=True)


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes in Python; ``timestamptz`` on PostgreSQL, naive UTC text on SQLite."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: nurture stores only timezone-aware times")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _utc(**kwargs: Any) -> Any:
    return Field(sa_type=UTCDateTime, **kwargs)


# Ids are BIGINT on PostgreSQL (events and messages outgrow 2^31), INTEGER on SQLite (rowid).
_BigId = BigInteger().with_variant(Integer(), "sqlite")


def _pk() -> Any:
    return Field(default=None, sa_type=_BigId, primary_key=True)


def _fk(target: str, *, index: bool = True, nullable: bool = False) -> Any:
    return Field(foreign_key=target, sa_type=_BigId, index=index, nullable=nullable, ondelete="CASCADE")


class Lead(SQLModel, table=True):
    __tablename__ = "lead"
    __table_args__ = (
        # Cycle: leads whose profile changed since they were last scored.
        Index(
            "ix_lead_needs_rescore",
            "needs_rescore",
            postgresql_where=text("needs_rescore"),
            sqlite_where=text("needs_rescore"),
        ),
        # Ids are never reused (unsubscribe links and SendGrid events carry them): migration 0004.
        {"sqlite_autoincrement": True},
    )

    id: int | None = _pk()
    email: str = Field(sa_type=String(320), unique=True, index=True)
    first_name: str | None = Field(default=None, sa_type=String(200))
    last_name: str | None = Field(default=None, sa_type=String(200))
    company: str | None = Field(default=None, sa_type=String(300))
    job_title: str | None = Field(default=None, sa_type=String(300))
    company_size: int | None = None
    country: str | None = Field(default=None, sa_type=String(100))
    timezone: str = Field(default="UTC", sa_type=String(64))
    attributes: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    stage: str = Field(default="cold", sa_type=String(16), index=True)
    fit_score: float = 0.0
    engagement: float = 0.0
    score: float = 0.0
    scored_at: datetime | None = _utc(default=None)
    # Cycle: leads whose decay alone crosses a threshold by now.
    next_review_at: datetime | None = _utc(default=None, index=True)
    needs_rescore: bool = True
    suppressed: str | None = Field(default=None, sa_type=String(32))
    created_at: datetime = _utc()
    updated_at: datetime = _utc()


class Event(SQLModel, table=True):
    __tablename__ = "event"
    __table_args__ = (
        # Replays and the webhook's duplicates are absorbed here.
        UniqueConstraint("source", "external_id", name="uq_event_source_external_id"),
        # Cycle: events not yet counted in a score, oldest first.
        Index(
            "ix_event_pending", "occurred_at", postgresql_where=text("NOT applied"), sqlite_where=text("NOT applied")
        ),
        # Explain, caps: one lead's events by kind and time.
        Index("ix_event_lead_kind_time", "lead_id", "kind", "occurred_at"),
        # Reports: an email's opens, clicks, bounces and spam reports. Kind and time are in the index
        # so the report reads the index alone (docs/benchmarks.md, Reports).
        Index(
            "ix_event_message",
            "message_id",
            "kind",
            "occurred_at",
            postgresql_where=text("message_id IS NOT NULL"),
            sqlite_where=text("message_id IS NOT NULL"),
        ),
    )

    id: int | None = _pk()
    lead_id: int = _fk("lead.id", index=False)
    kind: str = Field(sa_type=String(64))
    occurred_at: datetime = _utc()
    source: str = Field(default="import", sa_type=String(32))
    external_id: str | None = Field(default=None, sa_type=String(200))
    properties: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    applied: bool = False
    received_at: datetime = _utc()
    # The email this event is about (SendGrid's ``nurture_message_id``): no foreign key, an event
    # may name an email of a lead since forgotten or one from another database.
    message_id: int | None = Field(default=None, sa_type=_BigId)


class ScoreChange(SQLModel, table=True):
    """Append-only ledger: every score move with the rules that moved it."""

    __tablename__ = "score_change"
    __table_args__ = (Index("ix_score_change_lead_at", "lead_id", "at"),)

    id: int | None = _pk()
    lead_id: int = _fk("lead.id", index=False)
    at: datetime = _utc()
    old_score: float
    new_score: float
    contributions: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    playbook_version: str = Field(sa_type=String(32))
    flow_run_id: str | None = Field(default=None, sa_type=String(64))


class StageTransition(SQLModel, table=True):
    __tablename__ = "stage_transition"
    __table_args__ = (Index("ix_stage_transition_lead_at", "lead_id", "at"),)

    id: int | None = _pk()
    lead_id: int = _fk("lead.id", index=False)
    from_stage: str = Field(sa_type=String(16))
    to_stage: str = Field(sa_type=String(16))
    at: datetime = _utc()
    score: float
    reason: str = Field(sa_type=String(500))
    playbook_version: str = Field(sa_type=String(32))
    flow_run_id: str | None = Field(default=None, sa_type=String(64), index=True)


class Enrollment(SQLModel, table=True):
    """A lead walking a sequence: the steps it took, and when its next step is due.

    ``next_due_at`` is None while a step is in flight (its message not yet settled)
    and once the enrollment has ended.
    """

    __tablename__ = "enrollment"
    __table_args__ = (
        # Exits on transition: a lead's active enrollments. Reentry: a lead's past enrollments.
        Index("ix_enrollment_lead_state", "lead_id", "state"),
        # Cycle: enrollments whose next step is due.
        Index(
            "ix_enrollment_next_due",
            "next_due_at",
            postgresql_where=text("next_due_at IS NOT NULL"),
            sqlite_where=text("next_due_at IS NOT NULL"),
        ),
    )

    id: int | None = _pk()
    key: str = Field(sa_type=String(300), unique=True)
    lead_id: int = _fk("lead.id", index=False)
    sequence: str = Field(sa_type=String(100))
    stage: str = Field(sa_type=String(16))
    transition_id: int = _fk("stage_transition.id")
    started_at: datetime = _utc()
    state: str = Field(default="active", sa_type=String(16))
    exit_reason: str | None = Field(default=None, sa_type=String(300))
    ended_at: datetime | None = _utc(default=None)
    # Ids of the steps taken, in order (the last one may be in flight).
    steps_done: list[str] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # When the last step settled (sent, skipped, failed or in doubt); started_at before the first.
    last_step_at: datetime | None = _utc(default=None)
    next_due_at: datetime | None = _utc(default=None)
    # A converted enrollment: when the lead reached the goal, and the last step settled before it.
    converted_at: datetime | None = _utc(default=None)
    converted_after_step: str | None = Field(default=None, sa_type=String(100))
    # The wait_for branches decided, in order: {"step", "took": then|else, "to": step id|end|null, "at"}.
    branches: list[dict[str, str | None]] = Field(default_factory=list, sa_column=Column(JSON, nullable=False))
    # While it waits on a wait_for: the deadline (a new event of the lead wakes it before).
    waiting_until: datetime | None = _utc(default=None)


class ScoringState(SQLModel, table=True):
    """Which scoring rules the stored scores follow (one row): the playbook's ``scoring_version`` the
    last rescore-all (or the first cycle) applied, so a cycle can tell when the rules changed since."""

    __tablename__ = "scoring_state"

    id: int = Field(default=1, primary_key=True)
    scoring_version: str = Field(sa_type=String(32))
    since: datetime = _utc()
    # What set it: "rescore-all", or "first cycle" (a database whose scores were all computed under it).
    set_by: str = Field(sa_type=String(32))


class SequencePause(SQLModel, table=True):
    """A sequence an operator paused: nothing new is decided or sent for it until resumed."""

    __tablename__ = "sequence_pause"

    sequence: str = Field(sa_type=String(100), primary_key=True)
    paused_at: datetime = _utc()
    reason: str | None = Field(default=None, sa_type=String(300))


class Message(SQLModel, table=True):
    """The outbox: one row per email nurture promised to send."""

    __tablename__ = "message"
    __table_args__ = (
        # Dispatch: queued messages that are due, oldest first.
        Index("ix_message_status_due", "status", "due_at"),
        # Dispatch start: claims and sends whose lease ran out.
        Index("ix_message_status_lease", "status", "lease_until"),
        Index("ix_message_lead", "lead_id"),
        # Reports: the emails sent in a period.
        Index("ix_message_sent_at", "sent_at"),
        {"sqlite_autoincrement": True},  # ids are never reused: migration 0004
    )

    id: int | None = _pk()
    lead_id: int = _fk("lead.id", index=False)
    enrollment_id: int = _fk("enrollment.id")
    sequence: str = Field(sa_type=String(100))
    # The step's id, and its position in the sequence when it was decided (for display).
    step_id: str = Field(sa_type=String(100))
    step: int
    # What the message sends: the step's template and subject under ``playbook_version``
    # (decided when the step was due, taken again from the playbook when it is sent).
    template: str = Field(sa_type=String(200))
    subject_template: str = Field(sa_type=String(500))
    # The split test's variant the lead gets at this step (None: the step has no variants).
    variant: str | None = Field(default=None, sa_type=String(32))
    playbook_version: str = Field(default="", sa_type=String(32))
    idempotency_key: str = Field(sa_type=String(320), unique=True)
    status: str = Field(default="queued", sa_type=String(16))
    due_at: datetime = _utc()
    # Claimed and sending rows belong to one dispatcher (``claimed_by``) until ``lease_until``
    # (wall-clock time): then a claim goes back to queued and a send becomes in_doubt.
    lease_until: datetime | None = _utc(default=None)
    claimed_by: str | None = Field(default=None, sa_type=String(64))
    # When the request was about to leave (marked just before it did): an in-doubt message has one.
    send_started_at: datetime | None = _utc(default=None)
    attempts: int = 0
    last_error: str | None = Field(default=None, sa_type=String(2000))
    provider_message_id: str | None = Field(default=None, sa_type=String(200))
    subject: str | None = Field(default=None, sa_type=String(500))
    created_at: datetime = _utc()
    sent_at: datetime | None = _utc(default=None)
    # SendGrid's ``delivered`` event: the receiving server accepted the email.
    delivered_at: datetime | None = _utc(default=None)
    updated_at: datetime = _utc()


class Suppression(SQLModel, table=True):
    """Addresses nurture must never mail: unsubscribed, bounced, reported, manual, forgotten.

    Looked up by ``email_hash``; ``email`` is empty once the person asked to be forgotten.
    """

    __tablename__ = "suppression"

    id: int | None = _pk()
    email: str | None = Field(default=None, sa_type=String(320), index=True)
    email_hash: str = Field(sa_type=String(64), unique=True, index=True)
    reason: str = Field(sa_type=String(32))
    at: datetime = _utc()
    source: str = Field(default="manual", sa_type=String(32))


class WebhookDelivery(SQLModel, table=True):
    """The webhook outbox: one row per fact and webhook, written in the fact's transaction (docs/webhooks.md)."""

    __tablename__ = "webhook_delivery"
    __table_args__ = (
        # Delivery: queued and failed deliveries that are due, oldest first.
        Index("ix_webhook_delivery_status_due", "status", "due_at"),
        # Delivery start: claims and sends whose lease ran out.
        Index("ix_webhook_delivery_status_lease", "status", "lease_until"),
        # `nurture forget`, explain: a lead's deliveries.
        Index("ix_webhook_delivery_lead", "lead_id"),
        {"sqlite_autoincrement": True},
    )

    id: int | None = _pk()
    lead_id: int = _fk("lead.id", index=False)
    # The playbook's name of the webhook (``webhook-N`` when unnamed), its URL then, and the event.
    webhook: str = Field(sa_type=String(100))
    url: str = Field(sa_type=String(2000))
    event: str = Field(sa_type=String(32))
    # Sent as Nurture-Delivery-Id on every attempt; derived from the key.
    delivery_id: str = Field(sa_type=String(36), unique=True)
    # event/fact/URL hash: a replayed cycle or a retried transaction never enqueues twice.
    idempotency_key: str = Field(sa_type=String(300), unique=True)
    # The body, built when the fact happened.
    payload: dict[str, Any] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    status: str = Field(default="queued", sa_type=String(16))
    attempts: int = 0
    due_at: datetime = _utc()
    lease_until: datetime | None = _utc(default=None)
    claimed_by: str | None = Field(default=None, sa_type=String(64))
    send_started_at: datetime | None = _utc(default=None)
    last_error: str | None = Field(default=None, sa_type=String(2000))
    response_status: int | None = None
    created_at: datetime = _utc()
    updated_at: datetime = _utc()
    delivered_at: datetime | None = _utc(default=None)
