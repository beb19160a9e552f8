"""Import crash suite: an import SIGKILLed at any instant and run again leaves what one clean run leaves.

Each trial: a fresh database, `nurture import leads` then `nurture import events`
started as a user starts them and SIGKILLed at a random instant (a draw over the
length of a clean run, so some kills land before the first batch commits, some
between batches, some after the end), then both imports run again to their end.
The leads, events and suppressions stored are compared with those of one clean
run of the same files, column by column (ids and arrival times aside).

The files are what real exports look like: events without ``external_id`` (the
documented default), some with one, rows repeated within a file, an address
appearing in several batches, times without a zone, an unsubscribe.

    .venv/bin/python -m tests.suites.import_crash --trials 50 --engine both   # the full run (docs/reliability.md)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import text

from db.engine import get_engine
from tests.suites import harness

KINDS = ("page_view", "pricing_view", "email_open", "email_click", "form_submit", "demo_request")


def write_files(workdir: Path, *, leads: int, events: int, seed: int) -> tuple[Path, Path]:
    """A lead CSV and an event CSV of the given sizes, the same for a seed."""
    draw = random.Random(seed)
    emails = [f"person{n}@import{seed}.example" for n in range(leads)]
    lead_file = workdir / "leads.csv"
    with lead_file.open("w") as out:
        out.write("email,first_name,company_size,country,industry\n")
        for n, email in enumerate(emails):
            out.write(f"{email},Person {n},{draw.randint(1, 5000)},{draw.choice(['US', 'DE', 'FR'])},software\n")
            if n % 997 == 0 and n:  # an address seen again in a later batch, with a new value
                out.write(f"{emails[n // 2]},Renamed {n},,,\n")
    start = datetime(2026, 10, 1, tzinfo=UTC)
    event_file = workdir / "events.csv"
    previous = ""
    with event_file.open("w") as out:
        out.write("email,kind,occurred_at,properties,external_id\n")
        for n in range(events):
            at = start + timedelta(seconds=draw.randint(0, 40 * 86_400))
            when = at.strftime("%Y-%m-%dT%H:%M:%S") if n % 50 == 0 else at.isoformat()  # some without a zone
            props = '"{""path"": ""/p/' + str(draw.randint(1, 30)) + '""}"' if n % 3 == 0 else ""
            ident = f"crm-{n}" if n % 10 == 0 else ""
            row = f"{draw.choice(emails)},{draw.choice(KINDS)},{when},{props},{ident}\n"
            out.write(row)
            if n % 400 == 0 and previous:  # an exported row repeated
                out.write(previous)
            previous = row
        out.write(f"{emails[3]},unsubscribe,{start.isoformat()},,\n")
    return lead_file, event_file


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    """What an import stores, without ids and arrival times."""
    engine = get_engine(url)
    with engine.connect() as conn:
        leads = conn.execute(
            text(
                "SELECT email, first_name, company_size, country, timezone, stage, attributes FROM lead ORDER BY email"
            )
        ).all()
        events = conn.execute(
            text(
                "SELECT l.email, e.kind, e.occurred_at, e.source, e.external_id, e.properties, e.applied "
                "FROM event e JOIN lead l ON l.id = e.lead_id"
            )
        ).all()
        suppressions = conn.execute(text("SELECT email_hash, reason FROM suppression ORDER BY email_hash")).all()
    return {
        "leads": [(*row[:-1], _canonical(row[-1])) for row in leads],
        "events": sorted((*row[:2], str(row[2]), *row[3:5], _canonical(row[5]), row[6]) for row in events),
        "suppressions": [tuple(row) for row in suppressions],
    }


def _canonical(value: Any) -> str:
    return json.dumps(json.loads(value) if isinstance(value, str) else value, sort_keys=True)


def _env(url: str) -> dict[str, str]:
    return {**os.environ, "NURTURE_DATABASE_URL": url, "NURTURE_PLAYBOOK": str(harness.ROOT / "nurture.yaml")}


def import_to_end(url: str, kind: str, path: Path) -> str:
    result = subprocess.run(
        [harness.NURTURE, "import", kind, str(path)], env=_env(url), capture_output=True, text=True, check=False
    )
    output = result.stdout + result.stderr
    if result.returncode != 0 or "Traceback" in output:
        raise RuntimeError(f"`nurture import {kind}` exited {result.returncode}: {output[-2000:]}")
    return output


def import_killed(url: str, kind: str, path: Path, *, seconds: float, table: str, rows: int | None) -> bool:
    """Start an import and SIGKILL it after ``seconds`` or, with ``rows``, once ``table`` holds that many more
    rows (so the kill lands between two batches' commits); whether it was still running when killed."""
    before = _count(url, table) if rows is not None else 0
    process = subprocess.Popen(
        [harness.NURTURE, "import", kind, str(path)],
        env=_env(url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + seconds
    while process.poll() is None:
        if (rows is None and time.monotonic() >= deadline) or (
            rows is not None and _count(url, table) >= before + rows
        ):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.005)
    return False


@dataclass
class ImportCrashReport:
    engine: str
    trials: int = 0
    kills: int = 0
    kills_after_a_commit: int = 0
    events_expected: int = 0
    violations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return self.__dict__ | {"violations": self.violations[:20]}


def _count(url: str, table: str) -> int:
    with get_engine(url).connect() as conn:
        return int(conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one())


def run_suite(
    *,
    trials: int,
    engines: list[str],
    seed: int,
    leads: int,
    events: int,
    workdir: Path,
    postgres_url: str | None,
    echo: bool = True,
) -> list[ImportCrashReport]:
    lead_file, event_file = write_files(workdir, leads=leads, events=events, seed=seed)
    draw = random.Random(seed)
    reports = []
    for engine in engines:
        report = ImportCrashReport(engine)
        clean = harness.fresh_database(engine, workdir, postgres_url)
        began = time.monotonic()
        import_to_end(clean.url, "leads", lead_file)
        lead_seconds = time.monotonic() - began
        import_to_end(clean.url, "events", event_file)
        event_seconds = time.monotonic() - began - lead_seconds
        expected = snapshot(clean.url)
        report.events_expected = len(expected["events"])
        clean.drop()
        for trial in range(trials):
            database = harness.fresh_database(engine, workdir, postgres_url)
            try:
                for kind, path, seconds in (("leads", lead_file, lead_seconds), ("events", event_file, event_seconds)):
                    table, total = ("lead", leads) if kind == "leads" else ("event", events)
                    # Half the kills at an instant drawn over a clean run (start-up included), half
                    # once a number of rows drawn over the file has been committed: between batches.
                    for _attempt in range(1 + (draw.random() < 0.3)):  # killed once, now and then twice
                        rows = draw.randint(1, total) if draw.random() < 0.5 else None
                        seconds_drawn = draw.uniform(0, seconds * 1.1)
                        if import_killed(database.url, kind, path, seconds=seconds_drawn, table=table, rows=rows):
                            report.kills += 1
                            report.kills_after_a_commit += _count(database.url, table) > 0
                    import_to_end(database.url, kind, path)  # the user runs it again, to its end
                got = snapshot(database.url)
                for table, rows in expected.items():
                    if got[table] != rows:
                        missing, extra = set(rows) - set(got[table]), set(got[table]) - set(rows)
                        report.violations.append(
                            f"trial {trial}: {table}: {len(got[table])} rows, a clean run has {len(rows)} "
                            f"({len(missing)} missing, {len(extra)} extra)"
                        )
            finally:
                database.drop()
            report.trials += 1
            if echo:
                print(json.dumps(report.as_dict()), flush=True)
        reports.append(report)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "both"], default="sqlite")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--leads", type=int, default=6_000)
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    with tempfile.TemporaryDirectory(prefix="nurture-import-crash-") as workdir:
        reports = run_suite(
            trials=args.trials,
            engines=engines,
            seed=args.seed,
            leads=args.leads,
            events=args.events,
            workdir=Path(workdir),
            postgres_url=os.environ.get("NURTURE_TEST_DATABASE_URL"),
        )
    for report in reports:
        print(json.dumps(report.as_dict(), indent=2))
    if any(report.violations for report in reports):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
