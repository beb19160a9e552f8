"""Scoring at scale: nurture's full rescore and incremental cycle against bare SQL, on SQLite and PostgreSQL.

For each engine, in a database created for the run and dropped after it:

1. ``benchmarks.generate`` writes L leads and 10·L events, the events already counted (as cycles leave
   them: what a nightly rescore-all or one after a scoring change meets), the leads unscored.
2. **Full rescore as nurture does it**: the replay path of the ``rescore-all`` flow (every lead cut
   into disjoint id ranges sized as rescore-all sizes them, ``advance_leads(replay=True)`` per range in
   its own transaction, NURTURE_CHUNK_CONCURRENCY ranges at a time: 2 on PostgreSQL, 1 on SQLite),
   called directly, without Prefect: the flow runs one ``advance-leads`` task per range, so the task
   runs it would take are printed, but their overhead is not in the time.
3. **The bare SQL baseline**: ONE statement per engine that computes every lead's score as
   ``nurture.scoring`` defines it for a replay (decayed points of every event, the per-kind
   daily caps through a window function, plus fit) and writes it to ``lead``. It runs on the
   same tables after nurture's rescore; both results are compared (max |Δscore|), so the
   baseline is known to compute the same thing. It writes scores only, where nurture also
   writes the ledger, the transitions and the enrollments they start.
4. **An incremental cycle** (the scoring part of ``nurture-cycle``: ``candidate_ranges`` →
   ``advance_leads`` per range) after 10,000 new events for 2,000 leads, at L and at L/10 leads: the
   cycle's cost should follow what changed, so the ratio of the two should stay near 1.
5. **A naive baseline** at L/10 leads over its first few thousand: one ORM object per
   lead, its events loaded by a query per lead, scored by ``nurture.scoring.rescore``.

Peak RSS is this process's (VmHWM, reset before each step); PostgreSQL's own memory is
the server's and not in it. Usage:

    .venv/bin/python -m benchmarks.scoring [--quick] [--engine sqlite|postgresql|both]

``--quick`` runs at 1/10 of the default scale (L = 100,000 instead of 1,000,000). The
PostgreSQL server is NURTURE_BENCH_DATABASE_URL, else
postgresql+psycopg://postgres@127.0.0.1:5432/test; the run creates its own database there.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import re
import resource
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, func, insert, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session
from sqlmodel import col

from benchmarks.generate import KINDS, NOW, generate
from db.chunks import LeadRange, candidate_ranges, candidates_in_range, lead_ranges, leads_in_range
from db.cycle import PROFILE_COLUMNS, ChunkResult
from db.engine import get_engine, session_scope
from db.models import Event, Lead
from flows.advancing import advance_leads, replay_chunk_size
from nurture.playbook import FitRule, Playbook, load_playbook
from nurture.scoring import MAX_MATCHED, ActivityEvent, LeadScoreState, rescore
from nurture.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
BATCH = 2000  # rescore-all's and nurture-cycle's default batch_size
EVENTS_PER_LEAD = 10
NEW_EVENTS, NEW_EVENT_LEADS = 10_000, 2_000
CYCLE_AT = NOW + timedelta(hours=1)


# ---------------------------------------------------------------------------- measuring


def _reset_peak_rss() -> None:
    # Writing 5 to clear_refs resets VmHWM (Linux ≥ 4.0); elsewhere the peak is the process's.
    with suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def _peak_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass(frozen=True, slots=True)
class Measured:
    seconds: float
    peak_mb: float


def measure(step: Callable[[], Any]) -> tuple[Measured, Any]:
    _reset_peak_rss()
    started = time.perf_counter()
    value = step()
    return Measured(time.perf_counter() - started, _peak_rss_mb()), value


# ---------------------------------------------------------------------------- nurture's paths


def _advance_ranges(url: str, playbook: Playbook, ranges: list[LeadRange], *, replay: bool, at: Any) -> ChunkResult:
    """Each range in its own transaction, ``chunk_concurrency`` at a time, as the flows' ``advance-leads``
    tasks run them (a thread pool; Prefect's task overhead is not in the time)."""
    engine = get_engine(url)
    workers = max(1, min(chunk_concurrency(url), len(ranges)))

    def one(lead_range: LeadRange) -> ChunkResult:
        with session_scope(engine) as session:
            if replay:
                lead_ids = leads_in_range(session=session, lo=lead_range.lo, hi=lead_range.hi)
            else:
                lead_ids = candidates_in_range(session=session, now=at, lo=lead_range.lo, hi=lead_range.hi)
            return advance_leads(session=session, lead_ids=lead_ids, playbook=playbook, now=at, replay=replay)

    advanced = ChunkResult()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for result in pool.map(one, ranges):
            advanced.add(result)
    return advanced


def chunk_concurrency(url: str) -> int:
    """NURTURE_CHUNK_CONCURRENCY as the flows read it for this database (1 on SQLite)."""
    return Settings(nurture_database_url=url).chunk_concurrency


def nurture_replay(url: str, playbook: Playbook) -> tuple[ChunkResult, int]:
    """What ``rescore-all`` does: every lead cut into ranges sized as it sizes them, one task run each."""
    engine = get_engine(url)
    with session_scope(engine) as session:
        size = replay_chunk_size(int(session.scalar(select(func.count(col(Lead.id)))) or 0), BATCH)
        ranges = lead_ranges(session=session, size=size)
    return _advance_ranges(url, playbook, ranges, replay=True, at=NOW), len(ranges)


def nurture_cycle_scoring(url: str, playbook: Playbook) -> tuple[ChunkResult, int]:
    """The scoring part of ``nurture-cycle`` (its advance-leads tasks), at ``CYCLE_AT``."""
    with session_scope(get_engine(url)) as session:
        ranges = candidate_ranges(session=session, now=CYCLE_AT, size=BATCH)
    return _advance_ranges(url, playbook, ranges, replay=False, at=CYCLE_AT), len(ranges)


def add_new_events(url: str, leads: int, seed: int) -> None:
    """10,000 events for 2,000 leads, between the rescore and the cycle."""
    rng = random.Random(seed)
    lead_ids = rng.sample(range(1, leads + 1), NEW_EVENT_LEADS)
    kinds = rng.choices(list(KINDS), weights=list(KINDS.values()), k=NEW_EVENTS)
    rows = [
        {
            "lead_id": lead_ids[i % NEW_EVENT_LEADS],
            "kind": kind,
            "occurred_at": NOW + timedelta(seconds=rng.randrange(1, 3600)),
            "source": "bench",
            "properties": {},
            "applied": False,
            "received_at": CYCLE_AT,
        }
        for i, kind in enumerate(kinds)
    ]
    with get_engine(url).begin() as connection:
        connection.execute(insert(Event), rows)


def naive_rescore(url: str, playbook: Playbook, leads: int) -> None:
    """One ORM object per lead, a query for its events, the reference scoring, committed every 1,000."""
    with Session(get_engine(url)) as session:
        for lead_id in range(1, leads + 1):
            lead = session.get(Lead, lead_id)
            assert lead is not None
            query = select(Event).where(col(Event.lead_id) == lead_id, col(Event.occurred_at) <= NOW)
            events = session.scalars(query).all()
            update = rescore(
                LeadScoreState(),
                profile={c: getattr(lead, c) for c in PROFILE_COLUMNS},
                new_events=[ActivityEvent(e.kind, e.occurred_at) for e in events],
                scoring=playbook.scoring,
                now=NOW,
            )
            lead.fit_score, lead.engagement, lead.score = update.fit, update.engagement, update.score
            lead.scored_at, lead.needs_rescore = NOW, False
            if lead_id % 1000 == 0:
                session.commit()
        session.commit()


# ---------------------------------------------------------------------------- the SQL baseline


def _quote(value: object) -> str:
    return "'" + str(value).replace("'", "''") + "'"


def postgres_regex(pattern: str) -> tuple[str, str]:
    """A Python pattern as a PostgreSQL operator and pattern: ``(?i)`` becomes ``~*`` and ``\\b``
    (word boundary) becomes ``\\y``, PostgreSQL's spelling of it. Enough for the shipped playbook's
    patterns (alternations, escapes, word boundaries); other inline flags are refused."""
    operator = "~"
    if pattern.startswith("(?i)"):
        operator, pattern = "~*", pattern[4:]
    if "(?" in pattern:
        raise NotImplementedError(f"no PostgreSQL translation for {pattern!r}")
    return operator, pattern.replace(r"\b", r"\y")


_NUMERIC_COLUMNS = {"company_size"}


def fit_sql(rules: list[FitRule], dialect: str, alias: str) -> str:
    """The playbook's fit rules as one SQL expression over ``alias`` (a lead row).

    As ``rule_matches``: a missing or empty field never matches; equals/in compare casefolded
    (``lower`` here: the values are ASCII); a regex sees the first MAX_MATCHED characters.
    """
    terms = []
    for rule in rules:
        numeric = rule.field in _NUMERIC_COLUMNS
        if rule.field.startswith("attributes."):
            key = rule.field.split(".", 1)[1]
            value = (
                f"json_extract({alias}.attributes, '$.{key}')"
                if dialect == "sqlite"
                else f"({alias}.attributes ->> '{key}')"
            )
        elif rule.field in PROFILE_COLUMNS:
            value = f"{alias}.{rule.field}"
        else:
            raise NotImplementedError(f"fit rule on {rule.field}")
        as_text = f"CAST({value} AS TEXT)" if numeric else value
        present = f"{value} IS NOT NULL" + ("" if numeric else f" AND {value} <> ''")
        if rule.equals is not None:
            test = f"lower({as_text}) = {_quote(str(rule.equals).casefold())}"
        elif rule.in_ is not None:
            test = f"lower({as_text}) IN ({', '.join(_quote(str(v).casefold()) for v in rule.in_)})"
        elif rule.regex is not None:
            if dialect == "sqlite":
                # SQLite has no regex engine: `regexp` is Python's re.search, registered on the connection.
                test = f"regexp({_quote(rule.regex)}, substr({as_text}, 1, {MAX_MATCHED}))"
            else:
                operator, pattern = postgres_regex(rule.regex)
                test = f"left({as_text}, {MAX_MATCHED}) {operator} {_quote(pattern)}"
        elif numeric and rule.gte is not None:
            test = f"{value} >= {rule.gte}"
        elif numeric and rule.lte is not None:
            test = f"{value} <= {rule.lte}"
        else:
            raise NotImplementedError(f"fit rule {rule.label}")
        terms.append(f"CASE WHEN {present} AND {test} THEN {float(rule.points)!r} ELSE 0.0 END")
    return " + ".join(terms) or "0.0"


def baseline_sql(playbook: Playbook, dialect: str) -> str:
    """ONE statement: every lead's replayed score, written back to ``lead``."""
    scoring = playbook.scoring
    kinds = ", ".join(_quote(k) for k in scoring.events)
    points = " ".join(f"WHEN {_quote(k)} THEN {float(r.points)!r}" for k, r in scoring.events.items())
    caps = " ".join(f"WHEN {_quote(k)} THEN {r.max_per_day}" for k, r in scoring.events.items() if r.max_per_day)
    half_life = scoring.half_life.total_seconds()
    if dialect == "sqlite":
        day, age = "date(occurred_at)", "(julianday(:now) - julianday(occurred_at)) * 86400.0"
        now, done = ":now", "0"
    else:
        day = "(occurred_at AT TIME ZONE 'UTC')::date"
        age = "extract(epoch FROM (CAST(:now AS timestamptz) - occurred_at))::float8"
        now, done = "CAST(:now AS timestamptz)", "false"
    return f"""
WITH ranked AS (
    SELECT lead_id, kind, occurred_at,
           row_number() OVER (PARTITION BY lead_id, kind, {day} ORDER BY occurred_at) AS nth
    FROM event
    WHERE occurred_at <= {now} AND kind IN ({kinds})
),
engagement AS (
    SELECT lead_id, sum((CASE kind {points} END) * power(2.0, -({age}) / {half_life!r})) AS points
    FROM ranked
    WHERE nth <= CASE kind {caps} ELSE 2147483647 END
    GROUP BY lead_id
)
UPDATE lead
SET fit_score = scored.fit, engagement = scored.points, score = scored.fit + scored.points,
    scored_at = {now}, needs_rescore = {done}
FROM (
    SELECT l.id, {fit_sql(list(scoring.fit), dialect, "l")} AS fit, coalesce(g.points, 0.0) AS points
    FROM lead l LEFT JOIN engagement g ON g.lead_id = l.id
) AS scored
WHERE lead.id = scored.id
"""


def _regexp(pattern: str, value: str | None) -> bool:
    return value is not None and re.search(pattern, value) is not None


def sql_baseline(url: str, playbook: Playbook) -> None:
    engine = get_engine(url)
    dialect = engine.dialect.name
    # SQLite stores times as text in this format; PostgreSQL takes the aware datetime.
    now: Any = NOW.strftime("%Y-%m-%d %H:%M:%S.%f") if dialect == "sqlite" else NOW
    with engine.begin() as connection:
        if dialect == "sqlite":
            raw: Any = connection.connection.dbapi_connection
            raw.create_function("regexp", 2, _regexp, deterministic=True)
        else:
            # The sort behind the window function, in memory rather than in temporary files.
            connection.execute(text("SET LOCAL work_mem = '256MB'"))
        connection.execute(text(baseline_sql(playbook, dialect)), {"now": now})


def keep_scores(url: str, table: str, up_to: int | None = None) -> None:
    where = f" WHERE id <= {up_to}" if up_to else ""
    with get_engine(url).begin() as connection:
        connection.execute(text(f"CREATE TABLE {table} AS SELECT id, fit_score, engagement, score FROM lead{where}"))


def max_difference(url: str, table: str) -> float:
    with get_engine(url).connect() as connection:
        value = connection.execute(
            text(f"SELECT max(abs(l.score - k.score)) FROM lead l JOIN {table} k ON k.id = l.id")
        ).scalar()
    return float(value or 0.0)


# ---------------------------------------------------------------------------- databases


@contextmanager
def fresh_database(engine_name: str, workdir: Path, label: str) -> Iterator[str]:
    """A SQLite file, or a PostgreSQL database created for this run and dropped after it."""
    if engine_name == "sqlite":
        yield f"sqlite:///{workdir / f'{label}.db'}"
        return
    base = make_url(os.environ.get("NURTURE_BENCH_DATABASE_URL") or DEFAULT_POSTGRES)
    name = f"nurture_bench_{label}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(base, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.execute(text(f"CREATE DATABASE {name}"))
    url = base.set(database=name).render_as_string(hide_password=False)
    try:
        yield url
    finally:
        get_engine(url).dispose()
        with admin.connect() as connection:
            connection.execute(text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        admin.dispose()


def postgres_reachable() -> str | None:
    base = os.environ.get("NURTURE_BENCH_DATABASE_URL") or DEFAULT_POSTGRES
    try:
        with create_engine(base).connect() as connection:
            return str(connection.execute(text("SHOW server_version")).scalar())
    except OperationalError as exc:
        print(f"PostgreSQL at {make_url(base).render_as_string()} is not reachable, skipped: {exc.orig}")
        return None


# ---------------------------------------------------------------------------- the run


def _line(label: str, m: Measured, extra: str = "") -> None:
    print(f"  {label:<44} {m.seconds:9.2f} s  peak RSS {m.peak_mb:7.0f} MB  {extra}")


def run_engine(
    engine_name: str, playbook: Playbook, *, large: int, naive_leads: int, workdir: Path
) -> dict[str, float]:
    small = large // 10
    figures: dict[str, float] = {}
    print(f"\n== {engine_name}: {large:,} leads / {large * EVENTS_PER_LEAD:,} events ==")
    with fresh_database(engine_name, workdir, "large") as url:
        gen = generate(url, leads=large, events=large * EVENTS_PER_LEAD, seed=7, scored=True)
        print(f"  generate: {gen.seconds:.1f} s ({gen.events / gen.seconds:,.0f} events/s)")
        replay, (advanced, chunks) = measure(lambda: nurture_replay(url, playbook))
        _line(
            "nurture full rescore (rescore-all replay)",
            replay,
            f"{large / replay.seconds:8,.0f} leads/s, {chunks} advance-leads task runs "
            f"({chunk_concurrency(url)} at a time), "
            f"{advanced.score_changes:,} ledger rows, {sum(advanced.transitions.values()):,} transitions",
        )
        keep_scores(url, "bench_nurture_scores")
        baseline, _ = measure(lambda: sql_baseline(url, playbook))
        _line("bare SQL baseline (one UPDATE)", baseline, f"{large / baseline.seconds:8,.0f} leads/s")
        difference = max_difference(url, "bench_nurture_scores")
        print(f"  nurture / baseline: {replay.seconds / baseline.seconds:.1f}x")
        verdict = "agree" if difference < 1e-6 else "DISAGREE"
        print(f"  max |score(nurture) − score(baseline)| = {difference:.2e}  ({verdict}, expected < 1e-6)")
        add_new_events(url, large, seed=11)
        cycle_large, (touched, cycle_chunks) = measure(lambda: nurture_cycle_scoring(url, playbook))
        _line(
            f"incremental cycle, {NEW_EVENTS:,} new events, {large:,} leads",
            cycle_large,
            f"{touched.leads:,} leads in {cycle_chunks} task runs",
        )
        figures.update(replay=replay.seconds, baseline=baseline.seconds, difference=difference)
    print(f"== {engine_name}: {small:,} leads / {small * EVENTS_PER_LEAD:,} events ==")
    with fresh_database(engine_name, workdir, "small") as url:
        gen = generate(url, leads=small, events=small * EVENTS_PER_LEAD, seed=7, scored=True)
        print(f"  generate: {gen.seconds:.1f} s ({gen.events / gen.seconds:,.0f} events/s)")
        naive, _ = measure(lambda: naive_rescore(url, playbook, naive_leads))
        keep_scores(url, "bench_naive_scores", up_to=naive_leads)
        replay_small, (advanced, chunks) = measure(lambda: nurture_replay(url, playbook))
        _line(
            "nurture full rescore (rescore-all replay)", replay_small, f"{small / replay_small.seconds:8,.0f} leads/s"
        )
        naive_rate, nurture_rate = naive_leads / naive.seconds, small / replay_small.seconds
        _line(
            f"naive ORM loop, first {naive_leads:,} leads",
            naive,
            f"{naive_rate:8,.0f} leads/s (all {small:,}: ~{small / naive_rate:.0f} s)",
        )
        print(
            f"  naive / nurture, per lead: {nurture_rate / naive_rate:.1f}x; "
            f"max |Δscore| naive vs nurture: {max_difference(url, 'bench_naive_scores'):.2e}"
        )
        add_new_events(url, small, seed=11)
        cycle_small, (touched, cycle_chunks) = measure(lambda: nurture_cycle_scoring(url, playbook))
        _line(
            f"incremental cycle, {NEW_EVENTS:,} new events, {small:,} leads",
            cycle_small,
            f"{touched.leads:,} leads in {cycle_chunks} task runs",
        )
    ratio = cycle_large.seconds / cycle_small.seconds
    print(f"  incremental cycle at {large:,} / at {small:,} leads: {ratio:.2f}x  (1x: cost follows what changed)")
    figures.update(cycle_ratio=ratio)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1/10 scale: 100,000 leads, 1,000,000 events")
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--leads", type=int, help="the large size (default 1,000,000; 100,000 with --quick)")
    args = parser.parse_args()
    large = args.leads or (100_000 if args.quick else 1_000_000)
    naive_leads = max(min(large // 50, 20_000), 100)
    playbook = load_playbook(ROOT / "nurture.yaml", templates_dir=ROOT / "templates")
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    print(f"scoring benchmark, playbook {playbook.version}, cpus: {os.cpu_count()}, now = {NOW.isoformat()}")
    started = time.perf_counter()
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="nurture-bench-") as workdir:
        for engine_name in engines:
            if engine_name == "postgresql":
                version = postgres_reachable()
                if version is None:
                    continue
                print(f"PostgreSQL server {version}")
            results[engine_name] = run_engine(
                engine_name, playbook, large=large, naive_leads=naive_leads, workdir=Path(workdir)
            )
    print("\nsummary")
    for name, f in results.items():
        print(
            f"  {name:<10} full rescore nurture/baseline {f['replay'] / f['baseline']:6.1f}x  "
            f"(max |Δ| {f['difference']:.1e}); incremental cycle at L / L/10: {f['cycle_ratio']:.2f}x"
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    if any(not math.isfinite(f["difference"]) or f["difference"] >= 1e-6 for f in results.values()):
        raise SystemExit("the baseline and nurture disagree: the baseline does not compute nurture's scores")


if __name__ == "__main__":
    main()
