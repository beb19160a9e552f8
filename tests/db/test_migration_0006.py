"""Migration 0006 on a database the demo filled before it (SQLite and PostgreSQL).

Nothing is sent twice and no due step is dropped.

The database is the one `make demo` left at schema 0005 (tests/db/fixtures/README.md):
every step of a sequence was queued at enrollment. After the upgrade the new
engine runs three simulated weeks of cycles on it.
"""

from __future__ import annotations

import gzip
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, MetaData, create_engine, text

from db.engine import MIGRATIONS_DIR, get_engine, head_revision, upgrade_schema
from db.models import Enrollment, Message
from nurture.playbook import Playbook
from tests.db.world import World

FIXTURE = Path(__file__).parent / "fixtures" / "demo-at-0005.db.gz"
# Parents before children, so foreign keys hold while rows are copied.
TABLES = ("lead", "event", "score_change", "stage_transition", "enrollment", "message", "suppression")


def _sqlite_copy(tmp_path: Path) -> Path:
    path = tmp_path / "demo-at-0005.db"
    with gzip.open(FIXTURE) as source, path.open("wb") as target:
        shutil.copyfileobj(source, target)
    return path


@pytest.fixture
def old_demo(database_url: str, tmp_path: Path) -> Iterator[Engine]:
    """The demo's database at schema 0005, on the engine under test."""
    source_path = _sqlite_copy(tmp_path)
    if database_url.startswith("sqlite"):
        get_engine.cache_clear()
        engine = get_engine(f"sqlite:///{source_path}")
        yield engine
        engine.dispose()
        return
    engine = get_engine(database_url)
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "0005")
    source = create_engine(f"sqlite:///{source_path}")
    meta = MetaData()
    meta.reflect(bind=engine, only=list(TABLES))
    with source.connect() as reading, engine.begin() as writing:
        for name in TABLES:
            rows = [dict(r._mapping) for r in reading.execute(text(f"SELECT * FROM {name}"))]
            if rows:
                writing.execute(meta.tables[name].insert(), _typed(rows, meta.tables[name]))
                writing.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{name}', 'id'), (SELECT max(id) FROM {name}))")
                )
    source.dispose()
    yield engine


def _typed(rows: list[dict[str, Any]], table: Any) -> list[dict[str, Any]]:
    """SQLite hands back timestamps as text, booleans as ints and JSON as text: as PostgreSQL wants them."""
    import json

    typed = []
    for row in rows:
        out = {}
        for key, value in row.items():
            kind = type(table.c[key].type).__name__
            if value is not None and kind in ("DateTime", "TIMESTAMP") and isinstance(value, str):
                value = datetime.fromisoformat(value).replace(tzinfo=UTC)
            elif value is not None and kind == "BOOLEAN":
                value = bool(value)
            elif value is not None and kind == "JSON" and isinstance(value, str):
                value = json.loads(value)
            out[key] = value
        typed.append(out)
    return typed


def _messages(engine: Engine) -> list[Any]:
    with engine.connect() as connection:
        return list(
            connection.execute(
                text("SELECT id, enrollment_id, lead_id, step, template, status, due_at FROM message ORDER BY id")
            )
        )


def test_upgrading_a_demo_database_sends_nothing_twice_and_drops_no_due_step(
    old_demo: Engine, playbook: Playbook
) -> None:
    before = _messages(old_demo)
    with old_demo.connect() as connection:
        active = {r[0] for r in connection.execute(text("SELECT id FROM enrollment WHERE state = 'active'"))}
        end = connection.execute(text("SELECT max(at) FROM stage_transition")).scalar()
    end = datetime.fromisoformat(end).replace(tzinfo=UTC) if isinstance(end, str) else end.astimezone(UTC)
    unsettled = [m for m in before if m.status in ("queued", "claimed", "sending")]
    assert unsettled, "the fixture must have queued messages"
    assert {m.enrollment_id for m in unsettled} <= active
    # The step in flight of each active enrollment: its first unsettled message.
    in_flight = {}
    for m in sorted(unsettled, key=lambda m: (m.enrollment_id, m.step)):
        in_flight.setdefault(m.enrollment_id, m)

    assert upgrade_schema(old_demo) == ("0005", head_revision())

    after = {m.id: m for m in (World(old_demo, playbook).all(Message))}
    for old in before:
        new = after[old.id]
        assert new.step_id == old.template
        if old.status not in ("queued", "claimed", "sending"):
            assert new.status == old.status  # history is untouched
        elif in_flight[old.enrollment_id].id == old.id:
            assert new.status == old.status  # the step in flight stays, due when it was
        else:
            assert (new.status, new.last_error.split(":")[0]) == ("cancelled", "not queued ahead any more")
    world = World(old_demo, playbook)
    enrollments = {e.id: e for e in world.all(Enrollment)}
    for ident in active:
        enrollment = enrollments[ident]
        assert enrollment.next_due_at is None  # waiting for the message in flight
        assert enrollment.steps_done[-1] == in_flight[ident].template
    # What every active enrollment still had to send, by template.
    owed = {(m.enrollment_id, m.template) for m in before if m.status == "queued" and m.enrollment_id in active}

    # Three weeks of cycles under the new engine.
    at = end + timedelta(hours=12)
    while at < end + timedelta(days=21):
        world.cycle(at)
        at += timedelta(hours=6)

    messages = world.all(Message)
    sent = Counter((m.enrollment_id, m.template) for m in messages if m.status in ("sent", "in_doubt", "sending"))
    assert max(sent.values()) == 1, "a step was sent twice in one enrollment"
    final = {e.id: e for e in world.all(Enrollment)}
    for enrollment_id, template in owed:
        if final[enrollment_id].state == "exited":
            continue  # the lead left the stage: its steps were cancelled, as before
        assert sent[(enrollment_id, template)] == 1, f"enrollment {enrollment_id} never sent {template}"
