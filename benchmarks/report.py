"""`nurture report` at scale: a million emails and five million events, against a bare read of them.

The run writes, for each engine, a realistic history into a database made for it (a SQLite
file; on PostgreSQL a schema created for the run and dropped after it):

- leads (about 240,000: as many as it takes to send M emails), each moving cold → warm at a
  time spread over the 90 days before ``NOW`` and enrolled in the shipped playbook's
  ``welcome`` (its first step a split test, variants a/b; a click within 3 days takes the
  lead to the case study, else the nudge first); 30 % then move up to hot (``demo_offer``),
  a few of those buy (``customer``, ``onboarding``) or cool down (``still_evaluating``);
  a quarter of the others go cold (``win_back``) and some of those come back hot;
- M emails (1,000,000; status sent, or failed for a bounce), 97 % delivered, numbered in the
  order they were sent (as an outbox numbers them: a period's emails sit together);
- E events (5,000,000): for each delivered email, opens by people (half the emails, about
  three opens each), opens by machines (about a quarter of all opens), clicks, and rare
  spam reports and SendGrid unsubscribes; bounces for 1.8 % of the emails; all with
  ``message_id`` and ``properties.nurture_message_id`` as the webhook stores them. The rest
  are events without an email (page and pricing views, forms, webinars), and the goal events
  of the converted enrollments (``demo_request``, ``purchase``);
- suppressions for the bounces, spam reports and unsubscribes, and unsubscribes made on
  nurture's own page (``link``, a few ``expired link``) after a lead's last email.

Loading is bulk (as ``benchmarks.generate``): secondary indexes dropped and built again after,
PostgreSQL ``COPY``, SQLite ``executemany`` with the journal off; then ``ANALYZE`` (and
``VACUUM`` on PostgreSQL: what autovacuum does on a production database by then).

Measured, each timed best of 3 on the same data, each next to a **baseline** measured in the
same run: the bare cost of reading the data once, ``SELECT count(*), max(occurred_at) FROM
event WHERE message_id IS NOT NULL AND occurred_at >= :since`` plus ``SELECT count(*),
max(sent_at) FROM message WHERE sent_at BETWEEN :since AND :until``:

- ``sequence_report`` (what ``nurture report`` runs) over 90 days (everything), 30 days, and
  30 days for ``--sequence welcome``; ``sequence_conversions`` over 90 days;
- the report over 1 day against 30 days on the same database: its cost should follow the
  period, not the database.

Peak RSS is this process's (VmHWM, reset before each step); the history is written by a child
process, so it is the report's memory plus the interpreter's and SQLAlchemy's (the RSS before
the first step is printed). PostgreSQL's memory is the server's. Usage:

    .venv/bin/python -m benchmarks.report [--quick] [--engine sqlite|postgresql|both] [--messages M]

``--quick`` runs at 1/10 (100,000 emails, 500,000 events). PostgreSQL is
NURTURE_BENCH_DATABASE_URL, else NURTURE_TEST_DATABASE_URL, else
postgresql+psycopg://postgres@127.0.0.1:5432/test.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import random
import sqlite3
import tempfile
import time
import uuid
from array import array
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError

from benchmarks.generate import DAYS, Clock, lead_rows
from benchmarks.scoring import Measured, measure
from db.analytics import Period, goals_of, sequence_conversions, sequence_report
from db.engine import get_engine, session_scope, upgrade_schema
from db.models import Event, Message
from nurture.playbook import Playbook, load_playbook
from nurture.reporting import COUNTS, Report

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
# The report is asked "as of" this moment (benchmarks.generate's NOW); nothing happens after it.
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
EVENTS_PER_MESSAGE = 5
LEAD_BATCH = 10_000
WINDOW = timedelta(days=14)
MINUTE, HOUR, DAY = 60, 3600, 86_400

# (step id, template) per sequence, in the playbook's order.
STEPS: dict[str, tuple[str, ...]] = {
    "welcome": ("welcome", "welcome_nudge", "case_study", "webinar_invite"),
    "still_evaluating": ("check_in",),
    "demo_offer": ("demo_offer", "sales_handoff"),
    "win_back": ("win_back", "win_back_last"),
    "onboarding": ("onboarding_welcome", "onboarding_tips"),
}
# Events without an email, by relative frequency.
OTHER_KINDS = {"page_view": 70.0, "pricing_view": 12.0, "form_submit": 5.0, "webinar_attended": 2.0}

LEAD_COLUMNS = (
    "id", "email", "first_name", "company", "job_title", "company_size", "country", "timezone", "attributes",
    "created_at", "updated_at", "stage", "fit_score", "engagement", "score", "needs_rescore",
)  # fmt: skip
TRANSITION_COLUMNS = ("id", "lead_id", "from_stage", "to_stage", "at", "score", "reason", "playbook_version")
ENROLLMENT_COLUMNS = (
    "id", "key", "lead_id", "sequence", "stage", "transition_id", "started_at", "state", "exit_reason", "ended_at",
    "steps_done", "last_step_at", "next_due_at", "converted_at", "converted_after_step", "branches",
)  # fmt: skip
MESSAGE_COLUMNS = (
    "id", "lead_id", "enrollment_id", "sequence", "step_id", "step", "template", "subject_template", "variant",
    "playbook_version", "idempotency_key", "status", "due_at", "attempts", "last_error", "provider_message_id",
    "subject", "created_at", "sent_at", "delivered_at", "updated_at",
)  # fmt: skip
EVENT_COLUMNS = (
    "id", "lead_id", "kind", "occurred_at", "source", "external_id", "properties", "applied", "received_at",
    "message_id",
)  # fmt: skip
SUPPRESSION_COLUMNS = ("id", "email", "email_hash", "reason", "at", "source")
TABLES = {
    "lead": LEAD_COLUMNS,
    "stage_transition": TRANSITION_COLUMNS,
    "enrollment": ENROLLMENT_COLUMNS,
    "message": MESSAGE_COLUMNS,
    "event": EVENT_COLUMNS,
    "suppression": SUPPRESSION_COLUMNS,
}


# ---------------------------------------------------------------------------- the history


@dataclass
class Batch:
    rows: dict[str, list[tuple[Any, ...]]] = field(default_factory=lambda: {name: [] for name in TABLES})


@dataclass(frozen=True, slots=True)
class Enrolled:
    id: int
    sequence: str
    stage: str
    transition_id: int
    started: int
    converted: int | None
    goal: str | None


@dataclass(frozen=True, slots=True)
class Written:
    leads: int
    messages: int
    events: int
    email_events: int
    seconds: float


class History:
    """Draws the leads' histories, as rows ready for a bulk write (times as the database's text)."""

    def __init__(
        self, *, seed: int, postgres: bool, messages: int, events: int, message_ids: Sequence[int] = ()
    ) -> None:
        self.rng = random.Random(seed)
        self.clock = Clock(postgres=postgres)
        self.end = self.clock.end
        self.target_messages, self.target_events = messages, events
        self.ids = dict.fromkeys(TABLES, 0)
        self.messages = self.email_events = self.events = 0
        self.version = "bench"
        # Emails are drawn lead by lead; nurture numbers them as it creates them, when each falls due.
        # ``message_ids`` maps the order drawn to that order (``in_sending_order``); ``sent_times`` feeds it.
        self.message_ids = message_ids
        self.sent_times = array("q")

    def _id(self, table: str) -> int:
        self.ids[table] += 1
        return self.ids[table]

    def t(self, epoch: int) -> str:
        return self.clock.text(min(epoch, self.end))

    # -- one lead

    def lead(self, batch: Batch, row: tuple[Any, ...]) -> None:
        rng = self.rng
        lead_id, email = row[0], row[1]
        self.lead_id, self.email, self.batch = lead_id, email, batch
        self.stopped: int | None = None  # suppressed from then on: nothing more is sent
        self.sent: list[tuple[int, int]] = []  # (sent epoch, message id)
        start = self.end - int(rng.random() * DAYS * DAY)
        stage = "warm"
        warm = self._move("cold", "warm", start)
        demo_at = start + int(rng.uniform(0.5, 12) * DAY) if rng.random() < 0.06 else None
        hot_at = start + int(rng.uniform(1, 20) * DAY) if rng.random() < 0.3 else None
        cold_at = None
        if hot_at is None and rng.random() < 0.25:
            cold_at = start + int(rng.uniform(10, 30) * DAY)
        left = min(x for x in (hot_at, cold_at, self.end + DAY) if x is not None)
        self._welcome(warm, start, demo_at, left)
        if cold_at is not None and cold_at <= self.end:
            stage = "cold"
            moved = self._move("warm", "cold", cold_at)
            back = cold_at + int(rng.uniform(3, 15) * DAY) if rng.random() < 0.1 else None
            self._straight("win_back", "cold", moved, cold_at, (2 * DAY, 8 * DAY), until=back)
            if back is not None and back <= self.end:
                hot_at, stage = back, "cold"
        if hot_at is not None and hot_at <= self.end:
            moved = self._move(stage, "hot", hot_at)
            stage = "hot"
            bought = hot_at + int(rng.uniform(0.2, 10) * DAY) if rng.random() < 0.15 else None
            cooled = hot_at + int(rng.uniform(5, 20) * DAY) if bought is None and rng.random() < 0.3 else None
            self._straight("demo_offer", "hot", moved, hot_at, (0, 2 * DAY), converted=bought, goal="purchase")
            if bought is not None and bought <= self.end:
                stage = "customer"
                moved = self._move("hot", "customer", bought)
                self._straight("onboarding", "customer", moved, bought, (MINUTE, 3 * DAY))
            elif cooled is not None and cooled <= self.end:
                stage = "warm"
                moved = self._move("hot", "warm", cooled)
                self._straight("still_evaluating", "warm", moved, cooled, (DAY,))
        if self.stopped is None and self.sent and rng.random() < 0.006:
            # An unsubscribe on nurture's own page, after the last email.
            at = min(max(self.sent)[0] + int(rng.uniform(1 * HOUR, 2 * DAY)), self.end)
            source = "expired link" if rng.random() < 0.1 else "link"
            self._suppress("unsubscribe", at, source)
        self._other_events(start, len(self.sent))
        batch.rows["lead"].append((*row, row[-1], stage, 0, 0, 0, True))

    def _move(self, from_stage: str, to_stage: str, at: int) -> int:
        transition_id = self._id("stage_transition")
        self.batch.rows["stage_transition"].append(
            (transition_id, self.lead_id, from_stage, to_stage, self.t(at), 50.0, "bench", self.version)
        )
        return transition_id

    def _enroll(
        self, sequence: str, stage: str, transition_id: int, at: int, converted: int | None, goal: str | None
    ) -> int:
        enrollment_id = self._id("enrollment")
        self.enrollment = Enrolled(enrollment_id, sequence, stage, transition_id, at, converted, goal)
        return enrollment_id

    def _stop(self, *times: int | None) -> int:
        """The earliest of ``times`` and the lead's suppression: no email of the enrollment leaves from then on."""
        return min(x for x in (*times, self.stopped, self.end + DAY) if x is not None)

    def _close(self, steps: list[str], last: int | None, planned: int, stop: int) -> None:
        e = self.enrollment
        enrollment_id, sequence, stage, transition_id, at, converted = (
            e.id,
            e.sequence,
            e.stage,
            e.transition_id,
            e.started,
            e.converted,
        )
        why: str | None = None
        ended: int | None = None
        if converted is not None and converted <= self.end:
            state, why, ended = "converted", f"goal reached: {e.goal}", converted
            self._event(e.goal or "demo_request", converted, None)
        else:
            converted = None
            if len(steps) == planned:
                state, ended = "completed", last
            elif stop <= self.end:
                state, why, ended = "exited", "moved on", stop
            else:
                state = "active"
        self.batch.rows["enrollment"].append(
            (
                enrollment_id, f"{self.lead_id}/{sequence}/{transition_id}", self.lead_id, sequence, stage,
                transition_id, self.t(at), state, why, None if ended is None else self.t(ended), json.dumps(steps),
                self.t(last if last is not None else at), None, None if converted is None else self.t(converted),
                steps[-1] if converted is not None and steps else None, "[]",
            )
        )  # fmt: skip

    def _welcome(self, transition_id: int, start: int, converted: int | None, left: int) -> None:
        """The welcome: the split first step, then the case study after a click within 3 days, else the nudge first."""
        rng = self.rng
        self._enroll("welcome", "warm", transition_id, start, converted, "demo_request")
        steps: list[str] = []
        at = start + int(rng.uniform(0, 2 * HOUR))
        last = None
        path: tuple[str, ...] = ()
        clicked = self._send("welcome", 0, at, self._stop(converted, left), variant=rng.choice("ab"), steps=steps)
        if clicked is not None:
            last = at
            path = ("case_study", "webinar_invite")
            if clicked > at + 3 * DAY:
                path = ("welcome_nudge", *path)
            for step_id in path:
                at = last + (4 * DAY if step_id == "webinar_invite" else 3 * DAY)
                if (
                    self._send(step_id, STEPS["welcome"].index(step_id), at, self._stop(converted, left), steps=steps)
                    is None
                ):
                    break
                last = at
        self._close(steps, last, 1 + len(path), self._stop(converted, left))

    def _straight(
        self,
        sequence: str,
        stage: str,
        transition_id: int,
        start: int,
        afters: Sequence[int],
        *,
        converted: int | None = None,
        goal: str | None = None,
        until: int | None = None,
    ) -> None:
        self._enroll(sequence, stage, transition_id, start, converted, goal)
        steps: list[str] = []
        at, last = start, None
        for position, (step_id, after) in enumerate(zip(STEPS[sequence], afters, strict=True)):
            at += after
            if self._send(step_id, position, at, self._stop(converted, until), steps=steps) is None:
                break
            last = at
        self._close(steps, last, len(afters), self._stop(converted, until))

    def _send(
        self, step_id: str, position: int, at: int, until: int, *, steps: list[str], variant: str | None = None
    ) -> int | None:
        """Send one email at ``at`` unless it is past ``until`` or now; its events. Returns when it was
        first clicked (or a time after the end when it was not), None when it was not sent."""
        if at > self.end or at >= until:
            return None
        rng = self.rng
        drawn = self._id("message")
        message_id = self.message_ids[drawn] if self.message_ids else drawn
        self.sent_times.append(at)
        sequence = self.enrollment.sequence
        steps.append(step_id)
        self.sent.append((at, message_id))
        self.messages += 1
        sent = self.t(at)
        delivered = None
        status, error = "sent", None
        first_click = self.end + DAY
        draw = rng.random()
        if draw < 0.97:
            got = at + int(rng.uniform(1, 60))
            delivered = self.t(got)
            if rng.random() < 0.55:  # Apple Mail's prefetch: right after delivery
                self._event("email_machine_open", got + int(rng.uniform(1, 10 * MINUTE)), message_id, machine=True)
            if rng.random() < 0.5:
                opened = got + int(rng.expovariate(1 / (6 * HOUR)))
                for _ in range(1 + int(rng.expovariate(1 / 2.4))):
                    self._event("email_open", opened, message_id)
                    opened += int(rng.expovariate(1 / DAY))
                if rng.random() < 0.35:
                    clicked = got + int(rng.expovariate(1 / (8 * HOUR)))
                    first_click = clicked
                    for _ in range(1 + int(rng.expovariate(1 / 1.2))):
                        self._event("email_click", clicked, message_id, url=f"https://acme-analytics.example/{step_id}")
                        clicked += int(rng.expovariate(1 / HOUR))
            if rng.random() < 0.001:
                spam = got + int(rng.uniform(MINUTE, 2 * DAY))
                self._event("spamreport", spam, message_id)
                self._suppress("spamreport", spam, "sendgrid")
            elif rng.random() < 0.002:
                gone = got + int(rng.uniform(MINUTE, 3 * DAY))
                self._event("unsubscribe", gone, message_id)
                self._suppress("unsubscribe", gone, "sendgrid")
        elif draw < 0.988:
            bounced = at + int(rng.uniform(10, 5 * MINUTE))
            status, error = "failed", "bounce: 550 5.1.1 user unknown"
            self._event("bounce", bounced, message_id)
            self._suppress("bounce", bounced, "sendgrid")
        self.batch.rows["message"].append(
            (
                message_id, self.lead_id, self.enrollment.id, sequence, step_id, position, step_id, "Hi", variant,
                self.version, f"bench-{message_id}", status, sent, 1, error, f"sg-{message_id}", "Hi", sent, sent,
                delivered, sent,
            )
        )  # fmt: skip
        return first_click

    def _event(self, kind: str, at: int, message_id: int | None, *, machine: bool = False, url: str = "") -> None:
        event_id = self._id("event")
        self.events += 1
        if message_id is None:
            properties = f'{{"path": "/p/{event_id % 40}"}}' if kind == "page_view" else "{}"
            source = "import"
        else:
            self.email_events += 1
            extra = ', "sg_machine_open": true' if machine else (f', "url": "{url}"' if url else "")
            properties = f'{{"nurture_message_id": "{message_id}"{extra}}}'
            source = "sendgrid"
        when = self.t(at)
        self.batch.rows["event"].append(
            (event_id, self.lead_id, kind, when, source, f"bench-{event_id}", properties, True, when, message_id)
        )

    def _suppress(self, reason: str, at: int, source: str) -> None:
        if self.stopped is not None:
            return
        self.stopped = at
        digest = hashlib.sha256(self.email.encode()).hexdigest()
        self.batch.rows["suppression"].append((self._id("suppression"), self.email, digest, reason, self.t(at), source))

    def _other_events(self, start: int, sent: int) -> None:
        """Events without an email, about in proportion to the lead's emails, so the total lands near E."""
        if not sent:
            return
        projected = self.email_events / self.messages * self.target_messages
        per_message = max(0.0, (self.target_events - projected) / self.target_messages) * 0.98
        expected = per_message * sent
        count = int(expected) + (1 if self.rng.random() < expected - int(expected) else 0)
        kinds = self.rng.choices(list(OTHER_KINDS), weights=list(OTHER_KINDS.values()), k=count)
        span = self.end - start + DAY
        for kind in kinds:
            self._event(kind, start - DAY + int(self.rng.random() * span), None)

    # -- all leads

    def batches(self) -> Iterator[Batch]:
        lead_id = 0
        while self.messages < self.target_messages:
            batch = Batch()
            for row in lead_rows(self.rng, lead_id + 1, LEAD_BATCH, self.clock):
                if self.messages >= self.target_messages:
                    break
                self.lead(batch, row)
                lead_id = row[0]
            self.leads = lead_id
            yield batch
        # The last few events without an email, on leads drawn at random.
        batch = Batch()
        self.batch = batch
        for _ in range(max(0, self.target_events - self.events)):
            self.lead_id = self.rng.randint(1, lead_id)
            self._event("page_view", self.end - int(self.rng.random() * DAYS * DAY), None)
        yield batch


# ---------------------------------------------------------------------------- loading


def _write_sqlite(path: str, history: History) -> None:
    connection = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "cache_size=-524288", "temp_store=MEMORY"):
            connection.execute(f"PRAGMA {pragma}")
        connection.execute("PRAGMA foreign_keys=OFF")
        names = ", ".join(f"'{t}'" for t in TABLES)
        indexes = connection.execute(
            f"SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name IN ({names}) AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        for batch in history.batches():
            connection.execute("BEGIN")
            for table, columns in TABLES.items():
                rows = batch.rows[table]
                if rows:
                    marks = ", ".join("?" for _ in columns)
                    connection.executemany(f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", rows)
            connection.execute("COMMIT")
        for _, sql in indexes:
            connection.execute(sql)
        connection.execute("ANALYZE")
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


def _copy_value(value: Any) -> str:
    if value is None:
        return "\\N"
    if value is True:
        return "t"
    if value is False:
        return "f"
    return str(value)


def _write_postgres(url: str, history: History) -> None:
    import psycopg

    parsed = make_url(url).set(drivername="postgresql")
    options = parsed.query.get("options")
    conninfo = parsed.set(query={}).render_as_string(hide_password=False)
    if isinstance(options, str):
        conninfo = psycopg.conninfo.make_conninfo(conninfo, options=options)
    with psycopg.connect(conninfo) as connection:
        with connection.cursor() as cursor:
            names = ", ".join(f"'{t}'" for t in TABLES)
            cursor.execute(
                "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = current_schema() "
                f"AND i.tablename IN ({names}) AND NOT EXISTS "
                "(SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
            )
            indexes = cursor.fetchall()
            for name, _ in indexes:
                cursor.execute(f'DROP INDEX "{name}"')
            cursor.execute("SET session_replication_role = replica")  # every key points at a row written before
            cursor.execute("SET synchronous_commit = off")
        connection.commit()
        for batch in history.batches():
            with connection.cursor() as cursor:
                for table, columns in TABLES.items():
                    rows = batch.rows[table]
                    if not rows:
                        continue
                    with cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                        copy.write("".join("\t".join(map(_copy_value, row)) + "\n" for row in rows))
            connection.commit()
        with connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = DEFAULT")
            cursor.execute("SET maintenance_work_mem = '512MB'")
            for _, sql in indexes:
                cursor.execute(sql)
            for table in TABLES:
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
                )
        connection.commit()
        connection.autocommit = True
        # What autovacuum would have done by the time someone asks for a report.
        for table in TABLES:
            connection.execute(f"VACUUM ANALYZE {table}")


def in_sending_order(seed: int, messages: int, events: int) -> array[int]:
    """Each drawn email's id in the order nurture would have created them: by time sent (a first
    pass of the same draw). Ids then follow time, as in a real outbox, and a period's emails sit
    together in the table and its id index."""
    draft = History(seed=seed, postgres=False, messages=messages, events=events)
    for _ in draft.batches():
        pass
    times = draft.sent_times
    order = sorted(range(len(times)), key=lambda n: (times[n], n))
    ids = array("q", bytes(8 * (len(times) + 1)))
    for rank, n in enumerate(order, start=1):
        ids[n + 1] = rank
    return ids


def write_history(url: str, *, messages: int, events: int, seed: int = 7) -> Written:
    """Create the schema and write the history described in the module docstring (the tables must be empty)."""
    engine = get_engine(url)
    upgrade_schema(engine)
    engine.dispose()
    postgres = engine.dialect.name == "postgresql"
    history = History(
        seed=seed,
        postgres=postgres,
        messages=messages,
        events=events,
        message_ids=in_sending_order(seed, messages, events),
    )
    started = time.perf_counter()
    if postgres:
        _write_postgres(url, history)
    else:
        database = engine.url.database
        if not database or database == ":memory:":
            raise SystemExit("the report benchmark needs a SQLite file, not an in-memory database")
        _write_sqlite(database, history)
    return Written(history.leads, history.messages, history.events, history.email_events, time.perf_counter() - started)


# ---------------------------------------------------------------------------- databases


def postgres_base() -> str:
    return (
        os.environ.get("NURTURE_BENCH_DATABASE_URL") or os.environ.get("NURTURE_TEST_DATABASE_URL") or DEFAULT_POSTGRES
    )


@contextmanager
def fresh_database(engine_name: str, workdir: Path) -> Iterator[str]:
    """A SQLite file, or a schema in the PostgreSQL database made for this run and dropped after it."""
    if engine_name == "sqlite":
        yield f"sqlite:///{workdir / 'report.db'}"
        return
    base = postgres_base()
    schema = f"nurture_bench_report_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f"CREATE SCHEMA {schema}"))
    url = f"{base}{'&' if '?' in base else '?'}options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        get_engine.cache_clear()
        with admin.begin() as connection:
            connection.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


def _postgres_version() -> str | None:
    try:
        with create_engine(postgres_base()).connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar())
    except OperationalError as exc:
        print(f"PostgreSQL at {make_url(postgres_base()).render_as_string()} is not reachable, skipped: {exc.orig}")
        return None


# ---------------------------------------------------------------------------- measuring


def baseline(url: str, period: Period) -> tuple[int, int]:
    """The bare read: every event about an email since the period's start, and the period's emails, counted."""
    event, message = Event.__table__, Message.__table__  # type: ignore[attr-defined]
    with session_scope(get_engine(url), commit=False) as session:
        events = session.execute(
            select(func.count(), func.max(event.c.occurred_at)).where(
                event.c.message_id.is_not(None), event.c.occurred_at >= period.since
            )
        ).one()
        emails = session.execute(
            select(func.count(), func.max(message.c.sent_at)).where(
                message.c.sent_at >= period.since, message.c.sent_at <= period.until
            )
        ).one()
    return int(events[0]), int(emails[0])


def report(url: str, playbook: Playbook, period: Period, sequence: str | None = None) -> Report:
    with session_scope(get_engine(url), commit=False) as session:
        return sequence_report(
            session=session, playbook=playbook, period=period, conversion_window=WINDOW, sequence=sequence
        )


def conversions(url: str, playbook: Playbook, period: Period) -> Any:
    with session_scope(get_engine(url), commit=False) as session:
        return sequence_conversions(session=session, period=period, window=WINDOW, goals=goals_of(playbook))


def totals(result: Report) -> dict[str, int]:
    """The report's counts summed over every sequence."""
    return {name: sum(getattr(s.total, name) for s in result.sequences) for name in COUNTS}


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines() if Path("/proc/self/status").exists() else []:
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def best_of(step: Callable[[], Any], runs: int = 3) -> tuple[Measured, Any]:
    """The fastest of ``runs`` (the first one reads from disk; the others find the pages cached, as a
    second report on a running database does), with the highest peak RSS of them."""
    timings = []
    value = None
    for _ in range(runs):
        measured, value = measure(step)
        timings.append(measured)
    return Measured(min(m.seconds for m in timings), max(m.peak_mb for m in timings)), value


def _line(label: str, m: Measured, extra: str = "") -> None:
    print(f"  {label:<40} {m.seconds:8.3f} s  peak RSS {m.peak_mb:5.0f} MB  {extra}")


def run_engine(engine_name: str, playbook: Playbook, *, messages: int, events: int, workdir: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    print(f"\n== {engine_name}: {messages:,} emails / {events:,} events ==")
    with fresh_database(engine_name, workdir) as url:
        # Written by a child process: what the generator allocated is not in this process's memory.
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
            written = pool.submit(write_history, url, messages=messages, events=events).result()
        print(
            f"  wrote {written.leads:,} leads, {written.messages:,} emails, {written.events:,} events "
            f"({written.email_events:,} about an email) in {written.seconds:.1f} s"
        )
        print(f"  this process before the first step: RSS {_rss_mb():.0f} MB")
        periods = {days: Period(NOW - timedelta(days=days), NOW) for days in (1, 30, 90)}
        for days in (90, 30):
            period = periods[days]
            base, (read_events, read_emails) = best_of(partial(baseline, url, period))
            _line(f"baseline, {days} days (bare read)", base, f"{read_emails:,} emails, {read_events:,} events")
            timed, result = best_of(partial(report, url, playbook, period))
            sums = totals(result)
            _line(
                f"report, {days} days",
                timed,
                f"{timed.seconds / base.seconds:5.1f}x baseline; sent {sums['sent']:,}, opened {sums['opened']:,}, "
                f"converted {sums['converted']:,}",
            )
            if sums["sent"] != read_emails:
                raise SystemExit(f"the report counts {sums['sent']:,} emails sent, the baseline {read_emails:,}")
            figures[f"base_{days}"], figures[f"report_{days}"] = base.seconds, timed.seconds
            figures[f"rss_{days}"] = timed.peak_mb
        thirty = periods[30]
        timed, result = best_of(lambda: report(url, playbook, thirty, sequence="welcome"))
        _line(
            "report, 30 days, --sequence welcome",
            timed,
            f"{timed.seconds / figures['base_30']:5.1f}x baseline; sent {totals(result)['sent']:,}",
        )
        figures["welcome_30"] = timed.seconds
        timed, rows = best_of(lambda: conversions(url, playbook, periods[90]))
        enrolled = sum(r.enrolled for r in rows)
        converted = sum(r.converted for r in rows)
        _line(
            "sequence_conversions, 90 days",
            timed,
            f"{timed.seconds / figures['base_90']:5.1f}x baseline; {enrolled:,} enrollments, {converted:,} converted",
        )
        figures["conversions_90"] = timed.seconds
        base_day, _ = best_of(lambda: baseline(url, periods[1]))
        day, result = best_of(lambda: report(url, playbook, periods[1]))
        _line("baseline, 1 day", base_day)
        _line(
            "report, 1 day",
            day,
            f"{day.seconds / base_day.seconds:5.1f}x baseline; sent {totals(result)['sent']:,}; "
            f"30 days / 1 day: {figures['report_30'] / day.seconds:.1f}x",
        )
        figures["report_1"] = day.seconds
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1/10 scale: 100,000 emails, 500,000 events")
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--messages", type=int, help="M (default 1,000,000; 100,000 with --quick); E = 5·M")
    args = parser.parse_args()
    messages = args.messages or (100_000 if args.quick else 1_000_000)
    events = messages * EVENTS_PER_MESSAGE
    playbook = load_playbook(ROOT / "nurture.yaml", templates_dir=ROOT / "templates")
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    print(f"report benchmark, playbook {playbook.version}, cpus: {os.cpu_count()}, now = {NOW.isoformat()}")
    started = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nurture-bench-report-") as workdir:
        for engine_name in engines:
            if engine_name == "postgresql":
                version = _postgres_version()
                if version is None:
                    continue
                print(f"PostgreSQL server {version}")
            results[engine_name] = run_engine(
                engine_name, playbook, messages=messages, events=events, workdir=Path(workdir)
            )
    print("\nsummary (seconds, best of 3; ratio to the bare read of the same period)")
    for name, f in results.items():
        print(
            f"  {name:<10} 90 days {f['report_90']:.2f} s ({f['report_90'] / f['base_90']:.1f}x), "
            f"30 days {f['report_30']:.2f} s ({f['report_30'] / f['base_30']:.1f}x), "
            f"welcome 30 days {f['welcome_30']:.2f} s, conversions 90 days {f['conversions_90']:.2f} s, "
            f"1 day {f['report_1']:.3f} s; peak RSS {max(f['rss_90'], f['rss_30']):.0f} MB"
        )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
