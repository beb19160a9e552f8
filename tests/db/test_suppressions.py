"""An unsubscribe, spam report or bounce in an import file suppresses the address, as the webhook does."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import Engine, select
from sqlmodel import col

from db.engine import session_scope
from db.imports import import_file
from db.models import Suppression
from nurture.playbook import Playbook
from nurture.privacy import email_hash
from nurture.transports import InMemoryTransport
from tests.conftest import T0
from tests.db.world import World

ANN = "ann@northwind.example"
NOW = T0 + timedelta(minutes=10)


def _hot(world: World, email: str = ANN) -> None:
    """A hot lead: its demo offer sent, the sales hand-off decided and queued for two days later."""
    world.mailed_hot_lead(email, at=T0, now=NOW)


@pytest.mark.parametrize("kind", ["unsubscribe", "spamreport", "bounce"])
def test_an_imported_event_suppresses_the_address_and_stops_its_mail(
    engine: Engine, playbook: Playbook, tmp_path: Path, kind: str
) -> None:
    transport = InMemoryTransport()
    world = World(engine, playbook, transport=transport)
    _hot(world)
    assert [m.status for m in world.messages(ANN)] == ["sent", "queued"]
    path = tmp_path / "events.csv"
    path.write_text(
        "email,kind,occurred_at,external_id\n"
        f"Ann@Northwind.example,{kind},{(NOW + timedelta(minutes=5)).isoformat()},crm-1\n"
        f"gone@elsewhere.example,{kind},{(NOW + timedelta(minutes=5)).isoformat()},crm-2\n"
    )
    result = import_file(engine=engine, path=path, kind="events", now=NOW + timedelta(minutes=6))
    assert result.rows_kept == 2
    with session_scope(engine) as session:
        rows = {row.email_hash: (row.email, row.reason, row.source) for row in session.scalars(select(Suppression))}
    assert rows == {
        email_hash(ANN): (ANN, kind, "import"),
        email_hash("gone@elsewhere.example"): ("gone@elsewhere.example", kind, "import"),
    }
    assert [m.status for m in world.messages(ANN)] == ["sent", "cancelled"]
    assert [e.state for e in world.enrollments(ANN)] == ["exited"]
    assert result.suppressions_added == 2
    # The event's points may move the lead (an unsubscribe costs 30: hot → warm enrolls it in
    # a sequence, the win-back after it); every step it is enrolled in is suppressed, none sent.
    for days in (1, 3, 12, 30, 45):
        world.advance(NOW + timedelta(days=days))
        world.dispatch(NOW + timedelta(days=days))
    assert len(transport.sent) == 1
    last = NOW + timedelta(days=45)
    later = [m for m in world.messages(ANN)[1:] if not (m.status == "queued" and m.due_at > last)]
    assert {m.status for m in later} <= {"cancelled", "suppressed"}
    assert "suppressed" in {m.status for m in later} or kind == "spamreport"  # spamreport scores nothing
    # Importing the same file again adds nothing and fails nothing.
    again = import_file(engine=engine, path=path, kind="events", now=NOW + timedelta(days=46))
    assert (again.duplicates, again.suppressions_added) == (2, 0)


def test_an_address_keeps_its_first_suppression_reason(engine: Engine, playbook: Playbook, tmp_path: Path) -> None:
    world = World(engine, playbook)
    world.events(ANN, ("bounce", T0), ("unsubscribe", T0 + timedelta(minutes=1)))
    world.events(ANN, ("spamreport", T0 + timedelta(minutes=2)))
    with session_scope(engine) as session:
        assert list(session.execute(select(col(Suppression.email), col(Suppression.reason)))) == [(ANN, "bounce")]
