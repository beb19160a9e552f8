"""Bulk loads: upsert leads by email, append events by lead email.

One query to read what exists and one bulk statement to write, per batch of rows (on
PostgreSQL the rows reach it by ``COPY``: db/bulk.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sqlalchemy import Engine, func, select
from sqlalchemy.exc import DataError
from sqlalchemy.orm import Session
from sqlmodel import col

from db.bulk import insert_many, one_of, widen_cache
from db.engine import dialect_insert as dialect_insert  # re-exported: older callers import it from here
from db.engine import session_scope
from db.models import Event, Lead
from db.suppressions import apply_suppressions
from nurture.importing import (
    LEAD_COLUMNS,
    EventRecord,
    LeadRecord,
    RowProblem,
    event_key,
    event_record,
    lead_record,
    read_rows,
)
from nurture.suppression import plan_suppressions

PROFILE_FIELDS = LEAD_COLUMNS[1:]


def _new_lead_row(email: str, now: datetime) -> dict[str, Any]:
    """A lead as it is first stored: cold, unscored, waiting for the next cycle."""
    return {
        "email": email,
        "timezone": "UTC",
        "attributes": {},
        "stage": "cold",
        "fit_score": 0.0,
        "engagement": 0.0,
        "score": 0.0,
        "needs_rescore": True,
        "created_at": now,
        "updated_at": now,
    }


@dataclass
class LeadUpsertResult:
    created: int = 0
    updated: int = 0


def upsert_leads(*, session: Session, records: Sequence[LeadRecord], now: datetime) -> LeadUpsertResult:
    """Create new leads and update known ones (by normalised email); blank fields keep their value."""
    merged: dict[str, LeadRecord] = {}
    for record in records:  # the same address twice in a batch: later rows win field by field
        earlier = merged.get(record.email)
        if earlier is not None:
            record = LeadRecord(
                record.line,
                record.email,
                {**earlier.profile, **record.profile},
                {**earlier.attributes, **record.attributes},
            )
        merged[record.email] = record
    existing = {
        row.email: row
        for row in session.execute(
            select(col(Lead.email), col(Lead.attributes), col(Lead.timezone)).where(
                one_of(session, col(Lead.email), list(merged))
            )
        )
    }
    rows = []
    for email, record in merged.items():
        known = existing.get(email)
        rows.append(
            _new_lead_row(email, now)
            | {f: record.profile.get(f) for f in PROFILE_FIELDS}
            | {
                "attributes": {**(known.attributes if known else {}), **record.attributes},
                "timezone": record.profile.get("timezone") or (known.timezone if known else "UTC"),
            }
        )
    if rows:
        statement = dialect_insert(session, Lead)
        excluded = statement.excluded
        keep = {f: _coalesce(excluded, f) for f in PROFILE_FIELDS}
        statement = statement.on_conflict_do_update(
            index_elements=["email"],
            set_={**keep, "attributes": excluded.attributes, "needs_rescore": True, "updated_at": excluded.updated_at},
        )
        insert_many(session=session, statement=statement, rows=rows)
    return LeadUpsertResult(created=len(merged) - len(existing), updated=len(existing))


def _coalesce(excluded: Any, field: str) -> Any:
    column = getattr(Lead, field)
    if field == "timezone":
        return excluded.timezone  # always given: the imported zone, else the stored one
    return func.coalesce(getattr(excluded, field), column)


@dataclass(frozen=True)
class LeadIds:
    """Lead ids by email, and how many of the leads this transaction created."""

    by_email: dict[str, int]
    created: int = 0


def lead_ids_for(*, session: Session, emails: Sequence[str], now: datetime, create: bool) -> LeadIds:
    """Lead ids by email; with ``create``, unknown addresses become new cold leads.

    ``created`` counts only the rows this insert wrote: a lead another transaction
    created at the same moment (our insert waited for it, then skipped) is not ours.
    """
    wanted = sorted(set(emails))
    found = _ids_by_email(session, wanted)
    missing = [e for e in wanted if e not in found]
    if not (missing and create):
        return LeadIds(found)
    statement = dialect_insert(session, Lead).on_conflict_do_nothing(index_elements=["email"])
    created = insert_many(session=session, statement=statement, rows=[_new_lead_row(e, now) for e in missing])
    found.update(_ids_by_email(session, missing))
    return LeadIds(found, created=created)


def _ids_by_email(session: Session, emails: Sequence[str]) -> dict[str, int]:
    query = select(col(Lead.email), col(Lead.id)).where(one_of(session, col(Lead.email), emails))
    return {row.email: int(row.id) for row in session.execute(query)}


@dataclass
class EventInsertResult:
    stored: int = 0
    duplicates: int = 0
    leads_created: int = 0
    suppressions_added: int = 0


def add_events(
    *,
    session: Session,
    records: Sequence[EventRecord],
    now: datetime,
    source: str = "import",
    key_by_content: bool = False,
) -> EventInsertResult:
    """Append events; an ``external_id`` already stored for this source is a duplicate, skipped.

    With ``key_by_content`` (files), an event without ``external_id`` is known by its content
    (:func:`event_key`), so a file imported again, whole or after a crash, stores each event
    once. Not for the events API: an event there may leave its time to the server, and two
    page views in the same second are two events; API clients send ``id`` to make retries safe.

    An ``unsubscribe``, ``spamreport`` or ``bounce`` event also suppresses its address and
    stops its lead's mail, in the same transaction, whatever the source.
    """
    if not records:
        return EventInsertResult()
    leads = lead_ids_for(session=session, emails=[r.email for r in records], now=now, create=True)
    ids = leads.by_email
    rows = [
        {
            "lead_id": ids[r.email],
            "kind": r.kind,
            "occurred_at": r.occurred_at,
            "source": source,
            "external_id": r.external_id or (event_key(r) if key_by_content else None),
            "properties": r.properties,
            "applied": False,
            "received_at": now,
        }
        for r in records
    ]
    # In lead order, the order the cycle locks leads in: the foreign-key checks of this
    # insert then queue behind a cycle instead of deadlocking with it.
    rows.sort(key=lambda row: (row["lead_id"], row["external_id"] or ""))
    statement = dialect_insert(session, Event).on_conflict_do_nothing(index_elements=["source", "external_id"])
    stored = insert_many(session=session, statement=statement, rows=rows)
    suppressions = plan_suppressions((r.email, r.kind) for r in records)
    added = apply_suppressions(session=session, suppressions=suppressions, lead_ids=ids, now=now, source=source)
    return EventInsertResult(
        stored=stored, duplicates=len(rows) - stored, leads_created=leads.created, suppressions_added=added
    )


# What a database answers when a value does not fit its column: PostgreSQL's DataError (a
# number out of range, over-long text, a NUL), SQLite's driver refusing an integer beyond 64 bits.
REFUSED = (DataError, OverflowError)


def _refusal(exc: BaseException) -> str:
    """The database's reason, without the statement and the values it quotes."""
    reason = str(exc.orig) if isinstance(exc, DataError) else str(exc)
    return reason.strip().splitlines()[0][:200] if reason.strip() else type(exc).__name__


@dataclass
class FileImportResult:
    """The summary a user sees after an import."""

    rows_read: int = 0
    rows_kept: int = 0
    created: int = 0
    updated: int = 0
    duplicates: int = 0
    leads_created: int = 0
    suppressions_added: int = 0
    problems: list[RowProblem] = field(default_factory=list)
    # Leads: rows whose address an earlier row of the file already had (merged, later values win).
    repeated_addresses: int = 0
    first_repeat: tuple[int, int] | None = None  # (line of the first row, line of its repeat)
    # Events: rows whose time had no zone and was read as UTC.
    zone_assumed: int = 0
    first_zone_assumed: int | None = None

    def notices(self) -> list[str]:
        """What the import did that the file may not have meant: said, not silently done."""
        said = []
        if self.first_repeat is not None:
            first, repeat = self.first_repeat
            said.append(
                f"{self.repeated_addresses} row(s) repeat an address of an earlier row (first: line {repeat} "
                f"repeats line {first}); each lead was updated field by field, the later row winning"
            )
        if self.first_zone_assumed is not None:
            said.append(
                f"{self.zone_assumed} time(s) have no time zone (first on line {self.first_zone_assumed}) and were "
                "read as UTC; write 2026-11-02T14:30:00Z or +02:00 to say which"
            )
        return said


def import_file(
    *,
    engine: Engine,
    path: Path,
    kind: Literal["leads", "events"],
    now: datetime,
    batch_size: int = 5000,
    on_progress: Callable[[int], None] | None = None,
) -> FileImportResult:
    """Import a CSV/JSONL file in batches; each batch commits on its own, bad rows are reported."""
    result = FileImportResult()
    batch: list[Any] = []
    parse = lead_record if kind == "leads" else event_record
    # The first line of each address in the file (by its hash: a few dozen bytes per lead).
    first_lines: dict[int, int] = {}

    def note(record: LeadRecord | EventRecord) -> None:
        if isinstance(record, LeadRecord):
            first = first_lines.setdefault(hash(record.email), record.line)
            if first != record.line:
                result.repeated_addresses += 1
                result.first_repeat = result.first_repeat or (first, record.line)
        elif record.zone_assumed:
            result.zone_assumed += 1
            result.first_zone_assumed = result.first_zone_assumed or record.line

    def store(records: Sequence[Any]) -> None:
        with session_scope(engine) as session:
            widen_cache(session)
            if kind == "leads":
                upserted = upsert_leads(session=session, records=records, now=now)
                result.created += upserted.created
                result.updated += upserted.updated
            else:
                added = add_events(session=session, records=records, now=now, key_by_content=True)
                result.rows_kept -= added.duplicates
                result.duplicates += added.duplicates
                result.leads_created += added.leads_created
                result.suppressions_added += added.suppressions_added

    def flush() -> None:
        if not batch:
            return
        try:
            store(batch)
        except REFUSED:
            # The parser checks what the columns hold; should the database still refuse a
            # value, find its row (one transaction each, in file order) and keep the others.
            for record in batch:
                try:
                    store([record])
                except REFUSED as exc:
                    result.rows_kept -= 1
                    result.problems.append(RowProblem(record.line, f"the database refused it: {_refusal(exc)}"))
            result.problems.sort(key=lambda problem: problem.line)
        batch.clear()

    for line, row in read_rows(path):
        result.rows_read += 1
        if isinstance(row, RowProblem):
            result.problems.append(row)
            continue
        try:
            record = parse(line, row)
        except ValueError as exc:
            result.problems.append(RowProblem(line, str(exc)))
            continue
        note(record)
        batch.append(record)
        result.rows_kept += 1
        if len(batch) >= batch_size:
            flush()
            if on_progress is not None:
                on_progress(result.rows_read)
    flush()
    if on_progress is not None:
        on_progress(result.rows_read)
    return result
