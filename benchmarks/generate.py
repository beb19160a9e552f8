"""Write N leads and M events into a nurture database, fast, for the scoring benchmarks.

The data looks like a fresh import: every lead unscored (``needs_rescore``, stage
cold) and no event applied yet. The skew is that of real traffic:

- events per lead are heavy-tailed (Pareto): many leads have none or a handful, a
  few have thousands, so the per-kind daily caps bite;
- kinds are weighted: page views most, purchases rare, and one kind the playbook
  does not score (``email_machine_open``);
- times spread over the 90 days before ``NOW``, more of them recent;
- profiles vary so that every fit rule of the shipped ``nurture.yaml`` matches some
  leads and not others (titles that look like a match but are not, free-mail
  addresses, company sizes either side of the threshold, missing fields).

The same seed writes the same rows. Loading is bulk: PostgreSQL gets ``COPY``
(psycopg 3), SQLite ``executemany`` in large transactions with the journal and
sync turned down for the load; on both the secondary indexes are dropped first
and built again at the end, which is faster than maintaining them row by row.
Usage:

    .venv/bin/python -m benchmarks.generate --leads 100000 --events 1000000 [--seed 7]
        [--database URL]   (default: NURTURE_BENCH_DATABASE_URL, else ./bench.db)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.engine import make_url

from db.engine import get_engine, upgrade_schema

# The benchmarks score "as of" this moment; every generated event is at or before it.
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
DAYS = 90

# Kind → relative frequency. The last one is not in the playbook: it is stored and worth nothing.
KINDS: dict[str, float] = {
    "page_view": 46.0,
    "email_open": 20.0,
    "email_click": 7.0,
    "pricing_view": 6.0,
    "form_submit": 2.5,
    "webinar_attended": 1.2,
    "demo_request": 0.8,
    "purchase": 0.2,
    "unsubscribe": 0.3,
    "bounce": 0.5,
    "email_machine_open": 15.5,
}

# Titles on both sides of the decision-maker regex, including near misses
# ("Headhunter", "Vice-Chair") and case variants.
JOB_TITLES = (
    "Marketing Manager",
    "Software Engineer",
    "Data Analyst",
    "Account Executive",
    "Product Manager",
    "Student",
    "Consultant",
    "VP Marketing",
    "vp of sales",
    "Vice President, Engineering",
    "Head of Growth",
    "Director of Operations",
    "Chief Revenue Officer",
    "CTO",
    "ceo & co-founder",
    "Founder",
    "Headhunter",
    "Vice-Chair",
    "Directory Services Admin",
    "",
)
COMPANY_SIZES = (None, 1, 5, 12, 25, 49, 50, 80, 200, 500, 1200, 5000, 20000)
COUNTRIES = (None, "US", "US", "US", "GB", "DE", "FR", "NL", "CA", "AU", "IN", "BR", "JP", "ES", "us", "")
INDUSTRIES = (None, "software", "SaaS", "fintech", "retail", "healthcare", "education", "Software", "")
DOMAINS = ("gmail.com", "yahoo.com", "hotmail.com", "outlook.com", "acme.example", "corp.example", "gmail.example")
FIRST_NAMES = ("Sam", "Alex", "Maria", "Wei", "Priya", "Jonas", "Fatima", "Liam", "Yuki", "Olga")
TIMEZONES = ("UTC", "America/New_York", "Europe/Berlin", "Asia/Tokyo", "America/Los_Angeles")

# Leads per batch written (events of these leads go with them).
LEAD_BATCH = 20_000


@dataclass(frozen=True, slots=True)
class Generated:
    leads: int
    events: int
    seconds: float


def events_per_lead(rng: random.Random, leads: int, events: int) -> list[int]:
    """Heavy-tailed counts summing to exactly ``events``: Lomax (Pareto shifted to start at 0) weights,
    capped, stochastic rounding: many leads with none or a few, a few with hundreds."""
    if leads == 0:
        return []
    weights = [min(rng.paretovariate(1.1) - 1.0, 300.0) for _ in range(leads)]
    scale = events / sum(weights)
    counts = []
    for w in weights:
        expected = w * scale
        whole = int(expected)
        counts.append(whole + (1 if rng.random() < expected - whole else 0))
    difference = events - sum(counts)
    while difference != 0:
        i = rng.randrange(leads)
        if difference > 0:
            counts[i] += 1
            difference -= 1
        elif counts[i] > 0:
            counts[i] -= 1
            difference += 1
    return counts


class Clock:
    """Timestamps as the database's text, from (day, second of day) lookups: formatting millions
    of datetimes one by one would take longer than writing them."""

    def __init__(self, *, postgres: bool) -> None:
        start = (NOW - timedelta(days=DAYS + 1)).date()
        self.days = [(start + timedelta(days=d)).isoformat() + " " for d in range(DAYS + 2)]
        suffix = "+00" if postgres else ".000000"
        self.seconds = [f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}{suffix}" for s in range(86_400)]
        self.base = int((datetime.combine(start, datetime.min.time(), tzinfo=UTC)).timestamp())
        self.end = int(NOW.timestamp())

    def text(self, epoch: int) -> str:
        offset = epoch - self.base
        return self.days[offset // 86_400] + self.seconds[offset % 86_400]

    def before_now(self, age_days: float) -> str:
        return self.text(self.end - int(age_days * 86_400))


def lead_rows(rng: random.Random, first_id: int, count: int, clock: Clock) -> list[tuple[Any, ...]]:
    """(id, email, first_name, company, job_title, company_size, country, timezone, attributes, created_at)."""
    rows = []
    for lead_id in range(first_id, first_id + count):
        domain = rng.choice(DOMAINS)
        industry = rng.choice(INDUSTRIES)
        attributes = {} if industry is None else {"industry": industry}
        if rng.random() < 0.1:
            attributes["plan"] = rng.choice(("trial", "free", "none"))
        rows.append(
            (
                lead_id,
                f"lead{lead_id}@{domain}",
                rng.choice(FIRST_NAMES),
                None if domain.startswith(("gmail", "yahoo", "hotmail", "outlook")) else domain.split(".")[0].title(),
                rng.choice(JOB_TITLES),
                rng.choice(COMPANY_SIZES),
                rng.choice(COUNTRIES),
                rng.choice(TIMEZONES),
                json.dumps(attributes),
                clock.before_now(DAYS + rng.random()),
            )
        )
    return rows


def event_rows(
    rng: random.Random, lead_ids: Sequence[int], counts: Sequence[int], clock: Clock
) -> list[tuple[int, str, str]]:
    """(lead_id, kind, occurred_at) for a batch of leads; ages skewed towards now (90·u²)."""
    kinds = list(KINDS)
    cumulative = []
    total = 0.0
    for weight in KINDS.values():
        total += weight
        cumulative.append(total)
    n = sum(counts)
    drawn = rng.choices(kinds, cum_weights=cumulative, k=n)
    rows: list[tuple[int, str, str]] = []
    at = 0
    rand = rng.random
    end, text, span = clock.end, clock.text, DAYS * 86_400
    for lead_id, count in zip(lead_ids, counts, strict=True):
        for kind in drawn[at : at + count]:
            u = rand()
            rows.append((lead_id, kind, text(end - int(u * u * span))))
        at += count
    return rows


def batches(rng: random.Random, leads: int, events: int, clock: Clock) -> Iterator[tuple[list[Any], list[Any]]]:
    counts = events_per_lead(rng, leads, events)
    for start in range(0, leads, LEAD_BATCH):
        size = min(LEAD_BATCH, leads - start)
        ids = range(start + 1, start + 1 + size)
        yield lead_rows(rng, start + 1, size, clock), event_rows(rng, ids, counts[start : start + size], clock)


# ---------------------------------------------------------------------------- SQLite


def _sqlite_path(engine: Engine) -> str:
    database = engine.url.database
    if not database or database == ":memory:":
        raise SystemExit("the generator needs a SQLite file, not an in-memory database")
    return database


def _write_sqlite(engine: Engine, leads: int, events: int, seed: int, scored: bool) -> None:
    connection = sqlite3.connect(_sqlite_path(engine), isolation_level=None)
    try:
        # A bulk load into a database nobody else uses: no sync, no rollback journal, a big cache.
        connection.execute("PRAGMA journal_mode=OFF")
        connection.execute("PRAGMA synchronous=OFF")
        connection.execute("PRAGMA cache_size=-524288")
        connection.execute("PRAGMA temp_store=MEMORY")
        connection.execute("PRAGMA foreign_keys=OFF")
        indexes = connection.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'index' AND tbl_name IN ('lead', 'event') "
            "AND sql IS NOT NULL"
        ).fetchall()
        for name, _ in indexes:
            connection.execute(f'DROP INDEX "{name}"')
        rng = random.Random(seed)
        clock = Clock(postgres=False)
        created = clock.text(clock.end)
        for lead_batch, event_batch in batches(rng, leads, events, clock):
            connection.execute("BEGIN")
            connection.executemany(
                "INSERT INTO lead (id, email, first_name, company, job_title, company_size, country, timezone, "
                "attributes, stage, fit_score, engagement, score, needs_rescore, created_at, updated_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'cold', 0, 0, 0, 1, ?, ?)",
                [(*row, row[-1]) for row in lead_batch],
            )
            connection.executemany(
                "INSERT INTO event (lead_id, kind, occurred_at, source, properties, applied, received_at) "
                f"VALUES (?, ?, ?, 'import', '{{}}', {int(scored)}, '{created}')",
                event_batch,
            )
            connection.execute("COMMIT")
        for _, sql in indexes:
            connection.execute(sql)
        connection.execute("ANALYZE")
        connection.execute("PRAGMA journal_mode=WAL")
    finally:
        connection.close()


# ---------------------------------------------------------------------------- PostgreSQL


def _copy_text(rows: Sequence[Sequence[Any]]) -> str:
    """COPY's text format. The generated values hold no tab, newline or backslash."""
    return "".join("\t".join("\\N" if v is None else str(v) for v in row) + "\n" for row in rows)


def _write_postgres(engine: Engine, leads: int, events: int, seed: int, scored: bool) -> None:
    import psycopg

    url = engine.url.set(drivername="postgresql")
    options = url.query.get("options")
    conninfo = url.set(query={}).render_as_string(hide_password=False)
    if isinstance(options, str):  # a search_path given in the URL, as the other benchmarks do
        conninfo = psycopg.conninfo.make_conninfo(conninfo, options=options)
    with psycopg.connect(conninfo) as connection:
        with connection.cursor() as cursor:
            # Indexes not backing a constraint are built again after the load.
            cursor.execute(
                "SELECT i.indexname, i.indexdef FROM pg_indexes i WHERE i.schemaname = current_schema() "
                "AND i.tablename IN ('lead', 'event') AND NOT EXISTS "
                "(SELECT 1 FROM pg_constraint c WHERE c.conname = i.indexname)"
            )
            indexes = cursor.fetchall()
            for name, _ in indexes:
                cursor.execute(f'DROP INDEX "{name}"')
            # Every lead_id is one of the leads written just before: skip the per-row foreign key checks.
            cursor.execute("SET session_replication_role = replica")
            cursor.execute("SET synchronous_commit = off")
        connection.commit()
        rng = random.Random(seed)
        clock = Clock(postgres=True)
        created = clock.text(clock.end)
        for lead_batch, event_batch in batches(rng, leads, events, clock):
            with connection.cursor() as cursor:
                with cursor.copy(
                    "COPY lead (id, email, first_name, company, job_title, company_size, country, timezone, "
                    "attributes, created_at, updated_at, stage, fit_score, engagement, score, needs_rescore) "
                    "FROM STDIN"
                ) as copy:
                    copy.write(_copy_text([(*row, row[-1], "cold", 0, 0, 0, "t") for row in lead_batch]))
                with cursor.copy(
                    "COPY event (lead_id, kind, occurred_at, source, properties, applied, received_at) FROM STDIN"
                ) as copy:
                    tail = f"\timport\t{{}}\t{'t' if scored else 'f'}\t{created}\n"
                    copy.write("".join(f"{lead_id}\t{kind}\t{at}{tail}" for lead_id, kind, at in event_batch))
            connection.commit()
        with connection.cursor() as cursor:
            cursor.execute("SET session_replication_role = DEFAULT")
            cursor.execute("SET maintenance_work_mem = '512MB'")
            for _, sql in indexes:
                cursor.execute(sql)
            for table in ("lead", "event"):
                cursor.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"(SELECT coalesce(max(id), 0) + 1 FROM {table}), false)"
                )
            cursor.execute("ANALYZE lead")
            cursor.execute("ANALYZE event")
        connection.commit()


def generate(url: str, *, leads: int, events: int, seed: int = 7, scored: bool = False) -> Generated:
    """Create the schema if needed and write ``leads`` leads and ``events`` events (the tables must be empty).

    With ``scored`` the events are marked as counted in a score already, as cycles leave them: the state a
    rescore-all (nightly, or after a scoring change) meets.
    """
    engine = get_engine(url)
    upgrade_schema(engine)
    engine.dispose()
    started = time.perf_counter()
    if engine.dialect.name == "sqlite":
        _write_sqlite(engine, leads, events, seed, scored)
    else:
        _write_postgres(engine, leads, events, seed, scored)
    return Generated(leads, events, time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leads", type=int, required=True)
    parser.add_argument("--events", type=int, required=True)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--database",
        default=os.environ.get("NURTURE_BENCH_DATABASE_URL") or "sqlite:///./bench.db",
        help="database URL (default: NURTURE_BENCH_DATABASE_URL, else sqlite:///./bench.db)",
    )
    args = parser.parse_args()
    done = generate(args.database, leads=args.leads, events=args.events, seed=args.seed)
    where = make_url(args.database).render_as_string(hide_password=True)
    print(
        f"wrote {done.leads} leads and {done.events} events to {where} in {done.seconds:.1f} s "
        f"({done.events / max(done.seconds, 1e-9):,.0f} events/s)"
    )


if __name__ == "__main__":
    main()
