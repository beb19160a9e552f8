"""Erasure that really erases, ids that are never handed to someone else afterwards, and an erased
address that stays unmailable however it is written when it comes back.

An unsubscribe link carries a lead id and SendGrid's events carry a message id, so
an id that comes back after `nurture forget` would let the forgotten person's old
link unsubscribe a stranger, and a late event settle another person's message.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, func, select, text
from sqlmodel import col

from db.engine import MIGRATIONS_DIR, get_engine, head_revision, session_scope, upgrade_schema
from db.imports import import_file
from db.inbound import forget_lead
from db.models import Event, Lead, Message
from nurture.importing import normalise_email
from nurture.playbook import Playbook
from nurture.transports import InMemoryTransport
from nurture.unsubscribe import claimed_lead_id, make_unsubscribe_token
from tests.conftest import T0
from tests.db.world import World

NOW = T0 + timedelta(minutes=10)
SECRET = "test-secret"


def _ids(world: World, email: str) -> tuple[int, list[int]]:
    lead = world.row(email)
    assert lead.id is not None
    return lead.id, [m.id for m in world.messages(email) if m.id is not None]


def test_the_ids_of_a_forgotten_lead_and_its_messages_are_never_given_again(engine: Engine, playbook: Playbook) -> None:
    world = World(engine, playbook)
    (first,) = world.hot_leads(1, at=T0, advance_to=NOW)
    old_lead, old_messages = _ids(world, first)
    assert old_messages, "the hot lead has no message: nothing to prove"
    token = make_unsubscribe_token(old_lead, email=first, now=NOW, secret=SECRET)
    with session_scope(engine) as session:
        forget_lead(session=session, email=first, now=NOW)  # the newest lead and newest messages go

    world.lead("stranger@elsewhere.example", at=NOW, job_title="CTO", company_size=500)
    world.events("stranger@elsewhere.example", ("demo_request", NOW), ("webinar_attended", NOW), ("pricing_view", NOW))
    world.advance(NOW + timedelta(minutes=1))
    new_lead, new_messages = _ids(world, "stranger@elsewhere.example")

    assert new_lead > old_lead
    assert new_messages
    assert min(new_messages) > max(old_messages)
    # The forgotten person's link now names no one.
    assert claimed_lead_id(token) == old_lead
    with session_scope(engine) as session:
        assert session.get(Lead, old_lead) is None


@pytest.mark.parametrize(
    ("forgotten", "imported"),
    [
        pytest.param("josé@f.example", "jose\u0301@f.example", id="NFC-then-NFD"),
        pytest.param("jose\u0301@f.example", "josé@f.example", id="NFD-then-NFC"),
        pytest.param("ann@f.example", "ann@f.example.", id="trailing-dot"),
        pytest.param("josé@bücher.example", "JOSÉ@XN--BCHER-KVA.EXAMPLE", id="punycode"),
    ],
)
def test_a_forgotten_address_imported_again_in_another_spelling_is_never_mailed(
    engine: Engine, playbook: Playbook, tmp_path: Path, forgotten: str, imported: str
) -> None:
    transport = InMemoryTransport()
    world = World(engine, playbook, transport=transport)
    with session_scope(engine) as session:
        forget_lead(session=session, email=normalise_email(forgotten), now=T0)  # as `nurture forget` does
    leads, events = tmp_path / "leads.csv", tmp_path / "events.csv"
    leads.write_text(f"email,first_name,job_title,company_size\n{imported},José,CTO,500\n", encoding="utf-8")
    events.write_text(
        "email,kind,occurred_at\n"
        + "".join(f"{imported},{kind},{NOW.isoformat()}\n" for kind in ("demo_request", "webinar_attended"))
        + f"{imported},pricing_view,{NOW.isoformat()}\n",
        encoding="utf-8",
    )
    assert import_file(engine=engine, path=leads, kind="leads", now=NOW).problems == []
    assert import_file(engine=engine, path=events, kind="events", now=NOW).problems == []
    world.advance(NOW + timedelta(minutes=1))
    world.dispatch(NOW + timedelta(minutes=1))
    assert transport.sent == []
    (lead,) = world.all(Lead)
    assert lead.email == normalise_email(forgotten)
    assert lead.stage == "hot"  # it heated up: its sequence's first message fell due
    assert world.messages(lead.email)[0].status == "suppressed"
    for days in (3, 12, 30):
        world.advance(NOW + timedelta(days=days))
        world.dispatch(NOW + timedelta(days=days))
    assert transport.sent == []
    assert "sent" not in {m.status for m in world.messages(lead.email)}


def test_upgrading_an_existing_sqlite_database_keeps_every_row_and_child(tmp_path: Path, playbook: Playbook) -> None:
    """The AUTOINCREMENT rebuild (migration 0004) must not cascade-delete events, transitions or messages."""
    engine = get_engine(f"sqlite:///{tmp_path / 'old.db'}")
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0003")
    world = World(engine, playbook)
    for i in range(3):  # leads and events as imports write them; the rest as the 0003 schema had it
        email = f"lead{i}@northwind.example"
        world.lead(email, at=T0, job_title="CTO", company_size=500)
        world.events(email, ("demo_request", T0), ("pricing_view", T0))
    with engine.begin() as connection:
        for lead_id in (1, 2, 3):
            connection.execute(
                text(
                    "INSERT INTO stage_transition (lead_id, from_stage, to_stage, at, score, reason, playbook_version) "
                    "VALUES (:l, 'cold', 'hot', :at, 80, 'test', 'v0')"
                ),
                {"l": lead_id, "at": NOW.replace(tzinfo=None)},
            )
            connection.execute(
                text(
                    "INSERT INTO enrollment (key, lead_id, sequence, stage, transition_id, started_at, state) "
                    "VALUES (:k, :l, 'demo_offer', 'hot', :l, :at, 'active')"
                ),
                {"k": f"lead-{lead_id}/demo_offer/transition-{lead_id}", "l": lead_id, "at": NOW.replace(tzinfo=None)},
            )
            connection.execute(
                text(
                    "INSERT INTO message (lead_id, enrollment_id, sequence, step, template, subject_template, "
                    "idempotency_key, status, due_at, attempts, created_at, updated_at) VALUES "
                    "(:l, :l, 'demo_offer', 0, 'demo_offer', 'Hi', :k, 'queued', :at, 0, :at, :at)"
                ),
                {
                    "l": lead_id,
                    "k": f"lead-{lead_id}/demo_offer/transition-{lead_id}/step-0",
                    "at": NOW.replace(tzinfo=None),
                },
            )

    def counts() -> dict[str, int]:
        with session_scope(engine) as session:
            return {
                model.__name__: int(session.scalar(select(func.count()).select_from(model)) or 0)
                for model in (Lead, Event, Message)
            }

    before = counts()
    assert before["Message"] > 0
    assert upgrade_schema(engine) == ("0003", head_revision())
    assert counts() == before
    with engine.connect() as connection:
        tables = dict(connection.execute(text("SELECT name, sql FROM sqlite_master WHERE type = 'table'")).all())
        assert "AUTOINCREMENT" in tables["lead"]
        assert "AUTOINCREMENT" in tables["message"]
        assert connection.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1  # switched back on
    with session_scope(engine) as session:
        assert session.scalar(select(func.count()).where(col(Event.lead_id).is_(None))) == 0


def test_upgrading_moves_stored_addresses_to_the_one_spelling(database_url: str) -> None:
    """A lead stored decomposed (NFD) or with a punycode domain before 0005 would be missed by every event,
    unsubscribe and `nurture forget`, which now arrive in the canonical spelling."""
    from db.imports import _new_lead_row
    from db.models import Suppression
    from nurture.privacy import email_hash

    engine = get_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0004")
    stored = [
        "jose\u0301@f.example",
        "ann@xn--bcher-kva.example",
        "zoe\u0308@f.example",
        "zo\u00eb@f.example",
        "kim@f.example",
    ]
    with session_scope(engine) as session:
        session.execute(Lead.__table__.insert(), [_new_lead_row(email, T0) for email in stored])  # type: ignore[attr-defined]
        session.execute(
            Suppression.__table__.insert(),  # type: ignore[attr-defined]
            [
                {
                    "email": "bo\u0301b@f.example",
                    "email_hash": email_hash("bo\u0301b@f.example"),
                    "reason": "unsubscribe",
                    "at": T0,
                }
            ],
        )
    assert upgrade_schema(engine) == ("0004", head_revision())
    with session_scope(engine) as session:
        emails = set(session.scalars(select(col(Lead.email))))
        suppressions = session.execute(select(col(Suppression.email), col(Suppression.email_hash))).all()
    # Rewritten, except where another lead has the spelling already: two rows for one person wait for a person.
    assert emails == {
        "jos\u00e9@f.example",
        "ann@b\u00fccher.example",
        "zoe\u0308@f.example",
        "zo\u00eb@f.example",
        "kim@f.example",
    }
    assert suppressions == [("b\u00f3b@f.example", email_hash(normalise_email("bo\u0301b@f.example")))]
