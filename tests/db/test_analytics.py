"""The report's counts on real databases: each email's fate, credited to its step and variant.

The SendGrid events go through the webhook's own parsing and ingestion, so what is counted
is what production stores (the message id column, the delivery time)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import Engine

from db.analytics import Period, sequence_conversions, sequence_report, step_counts
from db.engine import session_scope
from db.inbound import ingest_provider_events, unsubscribe_lead
from db.models import Enrollment, Event, Lead, Message, StageTransition
from nurture.inbound import parse_sendgrid_batch
from nurture.playbook import Playbook
from nurture.reporting import StepCounts
from tests.conftest import T0

DAY = timedelta(days=1)
PERIOD = Period(T0 - DAY, T0 + 30 * DAY)
WINDOW = timedelta(days=14)
GOALS = {"demo_offer": ("purchase",)}


class History:
    """Leads, their enrollments and emails, written as the cycle writes them."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.ids: dict[str, int] = {}
        self.leads: dict[str, int] = {}
        self.enrollments: dict[tuple[str, str], int] = {}

    def _add(self, row: Any) -> int:
        with session_scope(self.engine) as session:
            session.add(row)
            session.flush()
            return int(row.id)

    def move(self, lead: str, from_stage: str, to_stage: str, at: datetime) -> int:
        if lead not in self.leads:
            self.leads[lead] = self._add(
                Lead(email=f"{lead}@x.example", stage=to_stage, created_at=T0 - 9 * DAY, updated_at=T0 - 9 * DAY)
            )
        transition = StageTransition(
            lead_id=self.leads[lead], from_stage=from_stage, to_stage=to_stage, at=at, score=50, reason="test",
            playbook_version="v1",
        )  # fmt: skip
        return self._add(transition)

    def enroll(self, lead: str, sequence: str, stage: str, at: datetime) -> None:
        transition = self.move(lead, "cold" if stage == "warm" else "warm", stage, at)
        self.enrollments[(lead, sequence)] = self._add(
            Enrollment(
                key=f"{lead}/{sequence}",
                lead_id=self.leads[lead],
                sequence=sequence,
                stage=stage,
                transition_id=transition,
                started_at=at,
                state="completed",
            )
        )

    def send(self, name: str, lead: str, sequence: str, step: str, at: datetime, variant: str | None = None) -> None:
        self.ids[name] = self._add(
            Message(
                lead_id=self.leads[lead],
                enrollment_id=self.enrollments[(lead, sequence)],
                sequence=sequence,
                step_id=step,
                step=0,
                template=step,
                subject_template="Hi",
                variant=variant,
                idempotency_key=name,
                status="sent",
                due_at=at,
                sent_at=at,
                created_at=at,
                updated_at=at,
            )
        )

    def did(self, lead: str, kind: str, at: datetime) -> None:
        self._add(
            Event(lead_id=self.leads[lead], kind=kind, occurred_at=at, received_at=at, external_id=f"{lead}-{kind}")
        )

    def sendgrid(self, *events: tuple[str, str, str, datetime], **extra: Any) -> None:
        """(event, message name, lead, at) as SendGrid's webhook posts them."""
        body = [
            {
                "event": event,
                "email": f"{lead}@x.example",
                "timestamp": int(at.timestamp()),
                "sg_event_id": f"{event}-{name}-{n}",
                "nurture_message_id": str(self.ids[name]),
                **extra,
            }
            for n, (event, name, lead, at) in enumerate(events)
        ]
        with session_scope(self.engine) as session:
            ingest_provider_events(session=session, events=parse_sendgrid_batch(body).events, now=T0 + 30 * DAY)


@pytest.fixture
def history(engine: Engine) -> History:
    h = History(engine)
    hour = timedelta(hours=1)
    for lead in ("ann", "bob", "cy", "dee", "eve"):
        h.enroll(lead, "welcome", "warm", T0 - hour)
    # fay's offer completed its steps before she bought: buying is still its goal reached.
    h.enroll("fay", "demo_offer", "hot", T0 - hour)
    h.send("ann-old", "ann", "welcome", "welcome", T0 - 40 * DAY, "a")  # before the period
    h.send("ann", "ann", "welcome", "welcome", T0, "a")
    h.send("bob", "bob", "welcome", "welcome", T0, "b")
    h.send("cy", "cy", "welcome", "welcome", T0, "b")
    h.send("dee", "dee", "welcome", "welcome", T0, "a")
    h.send("eve", "eve", "welcome", "welcome", T0, "a")
    h.send("eve-nudge", "eve", "welcome", "welcome_nudge", T0 + DAY)
    h.send("fay", "fay", "demo_offer", "demo_offer", T0)
    h.send("fay-handoff", "fay", "demo_offer", "sales_handoff", T0 + 10 * DAY)
    minute = timedelta(minutes=1)
    h.sendgrid(
        *[("delivered", name, name.split("-")[0], T0 + minute) for name in ("ann", "bob", "dee", "eve", "fay")],
        ("delivered", "ann", "ann", T0 + 2 * minute),  # reported twice: the first counts
        ("open", "ann", "ann", T0 + hour),
        ("open", "ann", "ann", T0 + 2 * hour),  # a second open of the same email is not a second email opened
        ("click", "ann", "ann", T0 + 2 * hour),
        ("open", "ann-old", "ann", T0 + hour),  # about an email sent before the period
        ("bounce", "cy", "cy", T0 + minute),
        ("spamreport", "dee", "dee", T0 + DAY),
        ("unsubscribe", "dee", "dee", T0 + DAY),
    )
    # Apple Mail loads the images of ann's and bob's emails: not a person opening them.
    h.sendgrid(("open", "ann", "ann", T0 + minute), ("open", "bob", "bob", T0 + minute), sg_machine_open=True)
    h.move("ann", "warm", "hot", T0 + 3 * DAY)  # within the window: a conversion of the welcome
    h.move("bob", "warm", "hot", T0 + 20 * DAY)  # too late to credit the welcome
    h.move("fay", "hot", "customer", T0 + 3 * DAY)  # demo_offer has a goal: only the goal counts
    h.did("fay", "purchase", T0 + 5 * DAY)  # its goal: after the offer, before the hand-off
    with session_scope(engine) as session:  # eve unsubscribes on nurture's page after her second email
        unsubscribe_lead(session=session, lead_id=h.leads["eve"], now=T0 + 2 * DAY)
    return h


def _counts(engine: Engine, **kwargs: Any) -> dict[tuple[str, str, str | None], StepCounts]:
    with session_scope(engine, commit=False) as session:
        rows = step_counts(session=session, period=PERIOD, conversion_window=WINDOW, goals=GOALS, **kwargs)
    return {(r.sequence, r.step, r.variant): r for r in rows}


def test_each_email_is_counted_once_for_its_step_and_variant(engine: Engine, history: History) -> None:
    counts = _counts(engine)
    assert set(counts) == {
        ("welcome", "welcome", "a"),
        ("welcome", "welcome", "b"),
        ("welcome", "welcome_nudge", None),
        ("demo_offer", "demo_offer", None),
        ("demo_offer", "sales_handoff", None),
    }
    expected = {
        # sent, delivered, opened, machine, clicked, bounced, unsubscribed, spam, converted
        ("welcome", "welcome", "a"): (3, 3, 1, 1, 1, 0, 1, 1, 1),
        ("welcome", "welcome", "b"): (2, 1, 0, 1, 0, 1, 0, 0, 0),
        ("welcome", "welcome_nudge", None): (1, 0, 0, 0, 0, 0, 1, 0, 0),
        ("demo_offer", "demo_offer", None): (1, 1, 0, 0, 0, 0, 0, 0, 1),
        ("demo_offer", "sales_handoff", None): (1, 0, 0, 0, 0, 0, 0, 0, 0),
    }
    for key, numbers in expected.items():
        c = counts[key]
        got = (c.sent, c.delivered, c.opened, c.machine_opened, c.clicked, c.bounced, c.unsubscribed, c.spam)
        assert (*got, c.converted) == numbers, key


def test_a_longer_window_credits_a_later_move_up(engine: Engine, history: History) -> None:
    with session_scope(engine, commit=False) as session:
        rows = step_counts(
            session=session, period=PERIOD, conversion_window=30 * DAY, goals=GOALS
        )  # fmt: skip
    converted = {(r.step, r.variant): r.converted for r in rows if r.sequence == "welcome"}
    assert converted == {("welcome", "a"): 1, ("welcome", "b"): 1, ("welcome_nudge", None): 0}


def test_one_sequence_and_its_unsubscribes(engine: Engine, history: History) -> None:
    counts = _counts(engine, sequence="demo_offer")
    assert set(counts) == {("demo_offer", "demo_offer", None), ("demo_offer", "sales_handoff", None)}
    # eve's unsubscribe belongs to the welcome; asked for the welcome alone it is still there.
    assert _counts(engine, sequence="welcome")[("welcome", "welcome_nudge", None)].unsubscribed == 1


def test_sequence_conversions_count_enrollments(engine: Engine, history: History) -> None:
    with session_scope(engine, commit=False) as session:
        rows = sequence_conversions(session=session, period=PERIOD, window=WINDOW, goals=GOALS)
    assert {(r.sequence, r.enrolled, r.converted) for r in rows} == {("welcome", 5, 1), ("demo_offer", 1, 1)}


def test_the_report_follows_the_playbook_and_judges_the_split_test(
    engine: Engine, history: History, playbook: Playbook
) -> None:
    with session_scope(engine, commit=False) as session:
        report = sequence_report(session=session, playbook=playbook, period=PERIOD, conversion_window=WINDOW)
    assert [s.sequence for s in report.sequences] == [n for n in playbook.sequences if n in {"welcome", "demo_offer"}]
    welcome = report.sequences[[s.sequence for s in report.sequences].index("welcome")]
    assert [s.step for s in welcome.steps] == ["welcome", "welcome_nudge"]
    first = welcome.steps[0]
    assert [v.variant for v in first.variants] == ["a", "b"]
    assert first.total.sent == 5
    assert first.verdict is not None
    assert first.verdict.summary.startswith("too small to call")
    assert welcome.total.sent == 6
