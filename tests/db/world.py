"""A small test world: leads and events in a real database, advanced and dispatched like a cycle does."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, select
from sqlmodel import col

from db.cycle import ChunkResult, next_lead_ids
from db.engine import session_scope
from db.imports import add_events, upsert_leads
from db.models import Enrollment, Lead, Message, ScoreChange, StageTransition
from flows.advancing import WalkResult, advance_leads, walk_sequences
from flows.sending import DispatchResult, Sender, dispatch_due
from nurture.delivery import RetryPolicy
from nurture.importing import EventRecord, LeadRecord
from nurture.playbook import Playbook
from nurture.rendering import EmailRenderer
from nurture.transports import InMemoryTransport
from nurture.transports.base import EmailTransport
from tests.conftest import TEMPLATES_DIR

# Backoff in milliseconds, so retry tests stay quick; the policy's shape is the production one.
FAST_RETRIES = RetryPolicy(base_seconds=0.005, cap_seconds=0.05)

SENDER = Sender(
    from_email="Acme <hello@acme.example>",
    postal_address="Acme Inc., 1 Test Street, Testville",
    public_url="https://nurture.acme.example",
    secret_key="test-secret",
)


@dataclass
class World:
    engine: Engine
    playbook: Playbook
    transport: EmailTransport = field(default_factory=InMemoryTransport)
    templates: Path = TEMPLATES_DIR
    walked: WalkResult = field(default_factory=WalkResult)

    def lead(self, email: str, *, at: datetime, **profile: Any) -> None:
        attributes = profile.pop("attributes", {})
        with session_scope(self.engine) as session:
            upsert_leads(session=session, records=[LeadRecord(1, email, profile, attributes)], now=at)

    def events(self, email: str, *events: tuple[str, datetime], received: datetime | None = None) -> None:
        records = [EventRecord(1, email, kind, when) for kind, when in events]
        with session_scope(self.engine) as session:
            add_events(session=session, records=records, now=received or events[0][1])

    def advance(self, now: datetime, *, batch_size: int = 1000) -> ChunkResult:
        """What a cycle does before it dispatches: advance the leads that changed, then take due steps."""
        total, after = ChunkResult(), 0
        while True:
            with session_scope(self.engine) as session:
                ids = next_lead_ids(session=session, now=now, after_id=after, limit=batch_size)
                chunk = advance_leads(session=session, lead_ids=ids, playbook=self.playbook, now=now)
            total.add(chunk)
            if len(ids) < batch_size:
                break
            after = chunk.last_lead_id
        self.walked = self.walk(now, batch_size=batch_size)
        return total

    def walk(self, now: datetime, *, batch_size: int = 1000) -> WalkResult:
        """Decide the next step of every enrollment due by ``now`` (once each, as a cycle does)."""
        total = WalkResult()
        while True:
            with session_scope(self.engine) as session:
                walked = walk_sequences(session=session, playbook=self.playbook, now=now, limit=batch_size)
            total.add(walked)
            if walked.enrollments < batch_size:
                return total

    def cycle(self, now: datetime) -> DispatchResult:
        """One whole cycle at ``now``: advance, take due steps, dispatch."""
        self.advance(now)
        return self.dispatch(now)

    def dispatch(
        self, now: datetime, *, batch_size: int = 500, concurrency: int = 1, policy: RetryPolicy = FAST_RETRIES
    ) -> DispatchResult:
        return dispatch_due(
            engine=self.engine,
            playbook=self.playbook,
            renderer=EmailRenderer(self.templates),
            transport=self.transport,
            sender=SENDER,
            now=now,
            batch_size=batch_size,
            concurrency=concurrency,
            policy=policy,
            clock=lambda: datetime.now(UTC),
        )

    def hot_leads(self, count: int, *, at: datetime, advance_to: datetime) -> list[str]:
        """``count`` leads who ask for a demo at ``at`` and are hot after a cycle at ``advance_to``."""
        emails = [f"lead{i}@northwind.example" for i in range(count)]
        for email in emails:
            self.lead(email, at=at, first_name="Ann", job_title="CTO", company_size=500)
            self.events(email, ("demo_request", at), ("webinar_attended", at), ("pricing_view", at))
        self.advance(advance_to)
        return emails

    def mailed_hot_lead(self, email: str, *, at: datetime, now: datetime) -> int:
        """A lead who asks for a demo at ``at``: hot after a cycle at ``now``, its first email sent and the next
        one (the sales hand-off, two days later) decided and queued; returns its id."""
        self.lead(email, at=at, first_name="Ann", job_title="CTO", company_size=500)
        self.events(email, ("demo_request", at), ("webinar_attended", at), ("pricing_view", at))
        self.advance(now)
        self.dispatch(now)
        self.walk(now + timedelta(days=2))
        lead_id = self.row(email).id
        assert lead_id is not None
        return lead_id

    def engage(self, email: str, step_id: str, kind: str, at: datetime, *, machine: bool = False) -> None:
        """The lead opens or clicks (``kind``: open, click) its email of ``step_id``: a SendGrid event
        through the webhook's own parsing and ingestion, as in production. ``machine``: an open by
        Apple Mail Privacy Protection (``sg_machine_open``)."""
        from db.inbound import ingest_provider_events
        from nurture.inbound import parse_sendgrid_batch

        message = next(m for m in self.messages(email) if m.step_id == step_id)
        event: dict[str, Any] = {
            "email": email,
            "event": kind,
            "timestamp": int(at.timestamp()),
            "sg_event_id": f"{kind}-{message.id}-{int(at.timestamp())}-{machine}",
            "nurture_message_id": str(message.id),
        }
        if kind == "click":
            event["url"] = "https://acme-analytics.example/docs"
        if machine:
            event["sg_machine_open"] = True
        with session_scope(self.engine) as session:
            ingest_provider_events(session=session, events=parse_sendgrid_batch([event]).events, now=at)

    def row(self, email: str) -> Lead:
        with session_scope(self.engine) as session:
            lead = session.scalars(select(Lead).where(col(Lead.email) == email)).one()
            session.expunge(lead)
            return lead

    def all(self, model: Any, email: str | None = None) -> list[Any]:
        with session_scope(self.engine) as session:
            query = select(model).order_by(model.id)
            if email is not None:
                query = query.join(Lead, Lead.id == model.lead_id).where(col(Lead.email) == email)
            rows = list(session.scalars(query))
            for row in rows:
                session.expunge(row)
            return rows

    def transitions(self, email: str) -> list[tuple[str, str]]:
        return [(t.from_stage, t.to_stage) for t in self.all(StageTransition, email)]

    def messages(self, email: str) -> list[Message]:
        return self.all(Message, email)

    def enrollments(self, email: str) -> list[Enrollment]:
        return self.all(Enrollment, email)

    def ledger(self, email: str) -> list[ScoreChange]:
        return self.all(ScoreChange, email)
