"""Imports at scale: `nurture import leads` / `nurture import events` next to a bare bulk write, on both engines.

The run writes two files in a temporary folder, with ``benchmarks.generate``'s skew:

- ``leads.csv``: N leads (profiles and attributes as ``generate`` draws them);
- ``events.csv``: 10·N events, heavy-tailed per lead, kinds weighted, times over 90 days
  with more recent ones; a third carry ``properties``, a tenth an ``external_id``, 2 % name
  an address the lead file does not have (the import creates those leads), and the kinds
  include ``unsubscribe`` and ``bounce`` (the import suppresses those addresses).

For each engine, in a database made for the run (a SQLite file; on PostgreSQL a database
created for the run and dropped after it):

1. **nurture**: ``db.imports.import_file`` (what ``nurture import`` and the import flows
   call), leads then events: read, validated, upserted in batches of 5,000 rows, one
   transaction each.
2. **again**: the events file imported a second time (every row a duplicate: the cost of
   an interrupted import run again to its end).
3. **bare baseline**: the same rows, parsed by the same parser beforehand (the parse is timed
   apart), written with the engine's plainest bulk path into tables without any index or
   constraint, in batches of 5,000 rows: PostgreSQL a binary ``COPY``, SQLite an
   ``executemany``. It checks nothing, merges nothing, resolves no lead.

The ratio nurture / (parse + baseline) is the price of what an import promises beyond
writing rows; nurture / baseline compares with the write alone. Usage:

    .venv/bin/python -m benchmarks.imports [--quick] [--engine sqlite|postgresql|both] [--leads N]

``--quick`` runs at N = 10,000 (100,000 events), the default is N = 100,000 (1,000,000
events). PostgreSQL is NURTURE_BENCH_DATABASE_URL, else
postgresql+psycopg://postgres@127.0.0.1:5432/test.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.generate import Clock, event_rows, events_per_lead, lead_rows
from benchmarks.scoring import fresh_database, postgres_reachable
from db.engine import get_engine, upgrade_schema
from db.imports import FileImportResult, import_file
from nurture.importing import EventRecord, LeadRecord, event_key, event_record, lead_record, read_rows

EVENTS_PER_LEAD = 10
BATCH = 5_000
NOW = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
LEAD_HEADER = ("email", "first_name", "company", "job_title", "company_size", "country", "timezone", "attributes")


# ---------------------------------------------------------------------------- the files


def write_files(directory: Path, leads: int, seed: int = 7) -> tuple[Path, Path]:
    """``leads.csv`` and ``events.csv`` as described in the module docstring; the same for a seed."""
    rng = random.Random(seed)
    clock = Clock(postgres=False)
    rows = lead_rows(rng, 1, leads, clock)
    lead_file = directory / "leads.csv"
    with lead_file.open("w") as out:
        out.write("email,first_name,company,job_title,company_size,country,timezone,industry,plan\n")
        for _id, email, first, company, title, size, country, zone, attributes, _created in rows:
            extra = json.loads(attributes)
            fields = (email, first, company, title, size, country, zone, extra.get("industry"), extra.get("plan"))
            out.write(",".join(_csv(v) for v in fields) + "\n")
    emails = [row[1] for row in rows]
    counts = events_per_lead(rng, leads, leads * EVENTS_PER_LEAD)
    event_file = directory / "events.csv"
    with event_file.open("w") as out:
        out.write("email,kind,occurred_at,properties,external_id\n")
        for n, (lead_id, kind, at) in enumerate(event_rows(rng, range(1, leads + 1), counts, clock)):
            email = emails[lead_id - 1] if n % 50 else f"new{n}@events.example"  # 2 %: leads the file creates
            when = at.replace(" ", "T").removesuffix(".000000") + "Z"
            properties = f'"{{""path"": ""/p/{n % 40}""}}"' if n % 3 == 0 else ""
            ident = f"crm-{n}" if n % 10 == 0 else ""
            out.write(f"{email},{kind},{when},{properties},{ident}\n")
    return lead_file, event_file


def _csv(value: Any) -> str:
    if value is None:
        return ""
    text = str(value)
    return f'"{text}"' if "," in text else text


# ---------------------------------------------------------------------------- measuring


@dataclass(frozen=True, slots=True)
class Timed:
    rows: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.rows / max(self.seconds, 1e-9)


def nurture_import(url: str, path: Path, kind: str) -> tuple[Timed, FileImportResult]:
    engine = get_engine(url)
    started = time.perf_counter()
    result = import_file(engine=engine, path=path, kind=kind, now=NOW)  # type: ignore[arg-type]
    return Timed(result.rows_read, time.perf_counter() - started), result


def parse(path: Path, kind: str) -> tuple[Timed, list[Any]]:
    """The rows as the import's parser reads them, event keys included (the baseline writes them)."""
    started = time.perf_counter()
    read = lead_record if kind == "leads" else event_record
    records = [read(line, row) for line, row in read_rows(path) if isinstance(row, dict)]
    if kind == "events":
        records = [(r, r.external_id or event_key(r)) for r in records]
    return Timed(len(records), time.perf_counter() - started), records


def _lead_tuple(record: LeadRecord) -> tuple[Any, ...]:
    p = record.profile
    return (
        record.email,
        p.get("first_name"),
        p.get("company"),
        p.get("job_title"),
        p.get("company_size"),
        p.get("country"),
        p.get("timezone") or "UTC",
        record.attributes,
    )


def _event_tuple(item: tuple[EventRecord, str]) -> tuple[Any, ...]:
    record, key = item
    return (record.email, record.kind, record.occurred_at, key, record.properties)


BASELINE_TABLES = {
    "leads": (
        "bare_lead",
        LEAD_HEADER,
        ("text", "text", "text", "text", "int4", "text", "text", "json"),
    ),
    "events": (
        "bare_event",
        ("email", "kind", "occurred_at", "external_id", "properties"),
        ("text", "text", "timestamptz", "text", "json"),
    ),
}


def baseline_postgres(url: str, kind: str, records: Sequence[Any]) -> Timed:
    """Binary COPY of the parsed rows into a table without index or constraint, 5,000 rows a transaction."""
    import psycopg

    name, columns, types = BASELINE_TABLES[kind]
    to_row = _lead_tuple if kind == "leads" else _event_tuple
    conninfo = get_engine(url).url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(conninfo) as connection:
        ddl = ", ".join(f"{c} {t}" for c, t in zip(columns, types, strict=True))
        connection.execute(f"CREATE TABLE {name} ({ddl})")
        connection.commit()
        started = time.perf_counter()
        for at in range(0, len(records), BATCH):
            with (
                connection.cursor() as cursor,
                cursor.copy(f"COPY {name} ({', '.join(columns)}) FROM STDIN (FORMAT BINARY)") as copy,
            ):
                copy.set_types(list(types))
                for record in records[at : at + BATCH]:
                    copy.write_row(to_row(record))
            connection.commit()
        return Timed(len(records), time.perf_counter() - started)


def baseline_sqlite(url: str, kind: str, records: Sequence[Any]) -> Timed:
    """``executemany`` of the parsed rows into a table without index or constraint, 5,000 rows a transaction,
    on a connection with nurture's own settings (WAL, synchronous=NORMAL)."""
    name, columns, _ = BASELINE_TABLES[kind]
    to_row = _lead_tuple if kind == "leads" else _event_tuple
    engine = get_engine(url)
    with engine.connect() as connection:
        raw: Any = connection.connection.dbapi_connection
        raw.execute(f"CREATE TABLE {name} ({', '.join(columns)})")
        insert = f"INSERT INTO {name} VALUES ({', '.join('?' for _ in columns)})"
        started = time.perf_counter()
        for at in range(0, len(records), BATCH):
            rows = []
            for record in records[at : at + BATCH]:
                row = list(to_row(record))
                row[-1] = json.dumps(row[-1])
                if kind == "events":
                    row[2] = row[2].isoformat()
                rows.append(row)
            raw.execute("BEGIN")
            raw.executemany(insert, rows)
            raw.execute("COMMIT")
        return Timed(len(records), time.perf_counter() - started)


# ---------------------------------------------------------------------------- the run


def _line(label: str, timed: Timed, extra: str = "") -> None:
    print(f"  {label:<40} {timed.rows:>10,} rows {timed.seconds:8.2f} s {timed.rate:>10,.0f} rows/s  {extra}")


def run_engine(engine_name: str, files: dict[str, Path], workdir: Path) -> dict[str, float]:
    figures: dict[str, float] = {}
    print(f"\n== {engine_name} ==")
    with fresh_database(engine_name, workdir, "imports") as url:
        upgrade_schema(get_engine(url))
        for kind in ("leads", "events"):
            timed, result = nurture_import(url, files[kind], kind)
            said = (
                f"{result.created:,} created"
                if kind == "leads"
                else f"{result.rows_kept:,} stored, {result.leads_created:,} leads created, "
                f"{result.suppressions_added:,} suppressed"
            )
            _line(f"nurture import {kind}", timed, f"{said}, {len(result.problems)} bad rows")
            figures[f"{kind}_nurture"] = timed.rate
        again, result = nurture_import(url, files["events"], "events")
        _line("nurture import events again", again, f"{result.duplicates:,} already stored")
        figures["events_again"] = again.rate
        for kind in ("leads", "events"):
            parsed, records = parse(files[kind], kind)
            write = (baseline_postgres if engine_name == "postgresql" else baseline_sqlite)(url, kind, records)
            nurture_seconds = parsed.rows / figures[f"{kind}_nurture"]
            _line(f"parse {kind} (the import's parser)", parsed)
            _line(f"bare {'COPY' if engine_name == 'postgresql' else 'executemany'} {kind}", write)
            both = parsed.seconds + write.seconds
            print(
                f"  {kind}: nurture / (parse + bare write) {nurture_seconds / both:.2f}x, "
                f"nurture / bare write {nurture_seconds / write.seconds:.1f}x"
            )
            figures[f"{kind}_ratio"] = nurture_seconds / both
            figures[f"{kind}_baseline"] = write.rate
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="N = 10,000 leads, 100,000 events")
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--leads", type=int, help="N (default 100,000; 10,000 with --quick)")
    args = parser.parse_args()
    leads = args.leads or (10_000 if args.quick else 100_000)
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    print(f"import benchmark: {leads:,} leads, {leads * EVENTS_PER_LEAD:,} events, cpus: {os.cpu_count()}")
    started = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nurture-bench-imports-") as workdir:
        lead_file, event_file = write_files(Path(workdir), leads)
        print(
            f"files: {lead_file.stat().st_size / 1e6:.1f} MB of leads, "
            f"{event_file.stat().st_size / 1e6:.1f} MB of events"
        )
        files = {"leads": lead_file, "events": event_file}
        for engine_name in engines:
            if engine_name == "postgresql":
                version = postgres_reachable()
                if version is None:
                    continue
                print(f"PostgreSQL server {version}")
            results[engine_name] = run_engine(engine_name, files, Path(workdir))
    print("\nsummary (rows/s)")
    for name, f in results.items():
        print(
            f"  {name:<10} leads {f['leads_nurture']:>8,.0f} (bare {f['leads_baseline']:>9,.0f}), "
            f"events {f['events_nurture']:>8,.0f} (bare {f['events_baseline']:>9,.0f}), "
            f"events again {f['events_again']:>8,.0f}; nurture / (parse + bare): "
            f"leads {f['leads_ratio']:.2f}x, events {f['events_ratio']:.2f}x"
        )
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
