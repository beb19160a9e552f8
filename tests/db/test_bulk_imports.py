"""Imports of thousands of rows on each engine's bulk path store what row-by-row semantics would.

The expected state is worked out here, row by row, from the rules the import promises:
a lead row updates its lead field by field (a blank field keeps the stored value,
attributes merge, the later row wins), an event is stored once (by its ``external_id``,
else by its content), an event for an unknown address creates its lead, an unsubscribe
suppresses its address, and every lead touched waits for the next cycle. Then the files
are imported again: nothing changes.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, text

from db.engine import session_scope
from db.imports import import_file
from nurture.privacy import email_hash
from tests.conftest import T0

LEADS, EVENTS = 1_500, 4_000
BATCH = 700  # several batches, and repeats of an address in another batch than its first row
PROFILE = ("first_name", "company", "company_size", "country", "timezone")
KINDS = ("page_view", "email_open", "pricing_view", "demo_request")
START = datetime(2026, 2, 1, tzinfo=UTC)


def _address(n: int) -> str:
    return f"person{n}@bulk.example"


def write_lead_files(directory: Path, draw: random.Random) -> tuple[list[Path], dict[str, dict[str, Any]], int]:
    """Two lead files (a first load, then updates), and the leads they leave, worked out row by row."""
    expected: dict[str, dict[str, Any]] = {}
    bad = 0
    files = []
    for name, count in (("leads.csv", LEADS), ("updates.csv", LEADS // 3)):
        lines = ["email,first_name,company,company_size,country,timezone,industry,plan"]
        for n in range(count):
            number = n if name == "leads.csv" else draw.randrange(LEADS + 200)  # some updates create leads
            if n % 97 == 13:
                lines.append(f"not-an-address-{n},X,,,,,,")
                bad += 1
                continue
            if n % 89 == 7:
                lines.append(f"{_address(number)},X,,a few,,,,")
                bad += 1
                continue
            row = {
                "first_name": draw.choice(["", f"Name{n}"]),
                "company": draw.choice(["", "Acme", "Globex"]),
                "company_size": draw.choice(["", "12", "1,200", "80"]),
                "country": draw.choice(["", "US", "DE"]),
                "timezone": draw.choice(["", "Europe/Berlin", "Asia/Tokyo"]),
                "industry": draw.choice(["", "software", "retail"]),
                "plan": draw.choice(["", "", "trial"]),
            }
            spelled = _address(number).upper() if n % 5 == 0 else _address(number)  # normalised on the way in
            lines.append(",".join([spelled, *(f'"{v}"' if "," in v else v for v in row.values())]))
            lead = expected.setdefault(_address(number), dict.fromkeys(PROFILE) | {"timezone": "UTC", "attributes": {}})
            for field in PROFILE:
                if row[field]:
                    lead[field] = int(row[field].replace(",", "")) if field == "company_size" else row[field]
            lead["attributes"] |= {k: row[k] for k in ("industry", "plan") if row[k]}
            if n % 250 == 0:  # the same address again, later in the file: it wins field by field
                lines.append(f"{_address(number)},Again{n},,,,,,")
                lead["first_name"] = f"Again{n}"
        path = directory / name
        path.write_text("\n".join(lines) + "\n")
        files.append(path)
    return files, expected, bad


def write_event_file(directory: Path, draw: random.Random) -> tuple[Path, set[tuple[Any, ...]], set[str], int]:
    """An event file, the events it stores (email, kind, time, external id or None, properties), the
    addresses it suppresses, and its bad rows."""
    lines = ["email,kind,occurred_at,properties,external_id"]
    stored: set[tuple[Any, ...]] = set()
    bad = 0
    previous = ""
    with_ids: list[str] = []
    for n in range(EVENTS):
        if n % 131 == 17:
            lines.append(f"{_address(n % LEADS)},page_view,last tuesday,,")
            bad += 1
            continue
        number = draw.randrange(LEADS + 300)  # some addresses no lead file has: their leads are created
        at = START + timedelta(seconds=draw.randrange(30 * 86_400))
        kind = draw.choice(KINDS)
        page = draw.randrange(5) if n % 3 == 0 else None
        properties = f'"{{""path"": ""/p/{page}""}}"' if page is not None else ""
        ident = f"crm-{n}" if n % 7 == 0 else ""
        line = f"{_address(number)},{kind},{at.isoformat()},{properties},{ident}"
        lines.append(line)
        stored.add((_address(number), kind, at, ident or None, "" if page is None else f"/p/{page}"))
        if n % 150 == 0 and previous:  # an exported row repeated: stored once
            lines.append(previous)
        previous = line
        if ident:
            with_ids.append(line)
    lines.extend(with_ids)  # the rows with an id sent again, batches later: each is one event
    lines.append(f"{_address(3)},unsubscribe,{START.isoformat()},,")
    stored.add((_address(3), "unsubscribe", START, None, ""))
    path = directory / "events.csv"
    path.write_text("\n".join(lines) + "\n")
    return path, stored, {_address(3)}, bad


def stored_state(engine: Engine) -> dict[str, Any]:
    with session_scope(engine) as session:
        leads = session.execute(
            text(
                "SELECT id, email, first_name, company, company_size, country, timezone, attributes, "
                "needs_rescore, stage, created_at, updated_at FROM lead ORDER BY email"
            )
        ).all()
        events = session.execute(
            text(
                "SELECT e.id, l.email, e.kind, e.occurred_at, e.external_id, e.properties, e.applied, e.source "
                "FROM event e JOIN lead l ON l.id = e.lead_id ORDER BY e.id"
            )
        ).all()
        suppressions = session.execute(text("SELECT email_hash, reason FROM suppression ORDER BY 1")).all()
    return {"leads": [tuple(r) for r in leads], "events": [tuple(r) for r in events], "suppressed": suppressions}


def _json(value: Any) -> Any:
    import json

    return json.loads(value) if isinstance(value, str) else value


def _utc(value: Any) -> datetime:
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def test_a_large_import_stores_what_row_by_row_semantics_store_and_again_changes_nothing(
    engine: Engine, tmp_path: Path
) -> None:
    draw = random.Random(5)
    lead_files, leads_expected, lead_bad = write_lead_files(tmp_path, draw)
    event_file, events_expected, suppressed, event_bad = write_event_file(tmp_path, draw)

    results = [import_file(engine=engine, path=p, kind="leads", now=T0, batch_size=BATCH) for p in lead_files]
    events = import_file(engine=engine, path=event_file, kind="events", now=T0, batch_size=BATCH)

    assert sum(len(r.problems) for r in results) == lead_bad
    assert all(p.reason for r in results for p in r.problems)
    assert len(events.problems) == event_bad
    assert all(p.reason.startswith("occurred_at 'last tuesday' is not an ISO 8601 time") for p in events.problems)
    assert results[0].created + results[1].created == len(leads_expected)
    state = stored_state(engine)

    # Leads: the profile as the rows left it, field by field; waiting for the next cycle.
    by_email = {row[1]: row for row in state["leads"]}
    for email, lead in leads_expected.items():
        row = by_email[email]
        assert row[2:7] == tuple(lead[f] for f in ("first_name", "company", "company_size", "country", "timezone"))
        assert _json(row[7]) == lead["attributes"], email
    event_emails = {e[0] for e in events_expected}
    assert set(by_email) == set(leads_expected) | event_emails  # events created the leads they named
    assert events.leads_created == len(event_emails - set(leads_expected))
    assert all(row[8] for row in state["leads"])  # every lead waits for the next cycle
    assert {row[9] for row in state["leads"]} == {"cold"}

    # Events: each once, not yet counted in a score (the cycle's pending events).
    got = {
        (e[1], e[2], _utc(e[3]), None if e[4].startswith("content:") else e[4], _json(e[5]).get("path", ""))
        for e in state["events"]
    }
    assert got == events_expected
    assert len(state["events"]) == len(events_expected) == events.rows_kept
    assert {(e[6], e[7]) for e in state["events"]} == {(False, "import")}
    assert [h for h, _ in state["suppressed"]] == sorted(email_hash(a) for a in suppressed)
    assert events.suppressions_added == len(suppressed)

    # Again: the same files change nothing, and say so.
    again = [import_file(engine=engine, path=p, kind="leads", now=T0, batch_size=BATCH) for p in lead_files]
    events_again = import_file(engine=engine, path=event_file, kind="events", now=T0, batch_size=BATCH * 3)
    assert [r.created for r in again] == [0, 0]
    assert (events_again.rows_kept, events_again.leads_created, events_again.suppressions_added) == (0, 0, 0)
    assert events_again.duplicates == events.rows_kept + events.duplicates
    assert stored_state(engine) == state


def test_a_batch_the_database_refuses_is_stored_without_its_bad_row_on_both_engines(
    engine: Engine, tmp_path: Path, monkeypatch: Any
) -> None:
    """A value the parser lets through but the column cannot hold fails its bulk batch (a COPY on
    PostgreSQL); the batch is then written row by row, so only that row is lost, and nothing of the
    failed attempt remains."""
    monkeypatch.setattr("nurture.importing.MAX_COMPANY_SIZE", 10**30)  # a parser that misses it
    rows = [f"p{n}@refused.example,{n}" for n in range(240)]
    rows[125] = f"p125@refused.example,{2**40}"  # beyond PostgreSQL's INTEGER column; SQLite's holds it
    rows[131] = f"p131@refused.example,{2**70}"  # beyond 64 bits: refused on both
    path = tmp_path / "leads.csv"
    path.write_text("email,company_size\n" + "\n".join(rows) + "\n")
    result = import_file(engine=engine, path=path, kind="leads", now=T0, batch_size=120)
    refused = {p.line for p in result.problems}
    assert refused == ({127, 133} if engine.dialect.name == "postgresql" else {133})
    assert all(p.reason.startswith("the database refused it: ") for p in result.problems)
    with session_scope(engine) as session:
        stored = dict(session.execute(text("SELECT email, company_size FROM lead")).tuples().all())
    assert len(stored) == 240 - len(refused) == result.rows_kept
    assert all(stored[f"p{n}@refused.example"] == n for n in range(240) if n not in (125, 131))
