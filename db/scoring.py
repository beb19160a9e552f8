"""The playbook's engagement scoring compiled to SQL: a chunk's decayed, capped event points in one statement.

:mod:`nurture.scoring` is the reference: every event of a scored kind adds
``points · 2^(−age / half_life)`` at ``now``, and of a kind with ``max_per_day`` only
the first events of each UTC day count. Here the same sum is one ``SELECT`` per chunk
(a window function numbers each lead's events per kind and day), so a replay of every
event reads them in the database instead of as Python objects. A property test
(tests/db/test_scoring_sql.py) checks both agree to 1e-9 on SQLite and PostgreSQL.

Ages are counted exactly on both engines: PostgreSQL's ``EXTRACT(EPOCH ...)`` is exact;
on SQLite (naive UTC text, microseconds included) whole seconds come from
``strftime('%s')`` and the microseconds from the text, since ``julianday`` would lose
tens of microseconds.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    MetaData,
    Numeric,
    Table,
    Text,
    bindparam,
    case,
    cast,
    func,
    insert,
    literal,
    literal_column,
    select,
    text,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import aggregate_order_by
from sqlalchemy.orm import Session, aliased
from sqlalchemy.schema import CreateTable
from sqlmodel import col

from db.engine import array_param
from db.models import Event, Flag, Lead, ScoreChange, UTCDateTime, is_pending
from nurture.advancing import StageMove, check_move
from nurture.lifecycle import review_thresholds, transition_reason
from nurture.playbook import FitRule, Playbook, Stage
from nurture.scoring import value_matches

# Events beyond this many per kind and day are never a cap (kinds without max_per_day).
_UNCAPPED = 2**62
# Past 900 half-lives nothing is left worth counting (2^-900 < 1e-270): 0, as PostgreSQL's power() and
# products would raise an underflow error where Python returns a denormal or 0 (points are 0 or ≥ 1e-6).
_NOTHING_LEFT = 900.0


@dataclass(frozen=True, slots=True)
class KindPoints:
    """One lead's events of one kind up to ``now``: how many, and the decayed points of those counted."""

    lead_id: int
    kind: str
    events: int
    points: float


def _age_seconds(dialect: str, occurred: Any, now: Any) -> Any:
    """Seconds from ``occurred`` to ``now``, exactly (to the microsecond) on both engines."""
    if dialect == "postgresql":
        return cast(func.extract("epoch", now - occurred), Float)
    # Whole seconds of the text without its fraction: strftime rounds to milliseconds first, so
    # "09:00:00.999999" would count as 09:00:01.
    whole = cast(func.strftime("%s", func.substr(now, 1, 19)), Integer) - cast(
        func.strftime("%s", func.substr(occurred, 1, 19)), Integer
    )
    micros = cast(func.substr(now, 21, 6), Integer) - cast(func.substr(occurred, 21, 6), Integer)
    return whole + micros / 1_000_000.0


def _utc_day(dialect: str, occurred: Any) -> Any:
    """The UTC day a daily cap counts in (``nurture.scoring.day_key``)."""
    if dialect == "postgresql":
        return func.date(func.timezone("UTC", occurred))
    return func.substr(occurred, 1, 10)


def chunk_points(*, session: Session, lead_ids: Sequence[int], playbook: Playbook, now: datetime) -> list[KindPoints]:
    """Every event up to ``now`` of these leads, summed per lead and kind as a replay sums them: scored kinds
    with their decayed, capped points, and the kinds that make a customer (counted, for the stage).

    The replay's own statement (:func:`score_chunk`), read back: the rows are one per (lead, kind).
    """
    if not lead_ids:
        return []
    _start_chunk(session, lead_ids)
    _sum_points(
        session, session.get_bind().dialect.name, playbook, now, replay=True, lo=min(lead_ids), hi=max(lead_ids)
    )
    k = chunk_kind.c
    rows = session.execute(select(k.lead_id, k.kind, k.events, k.points).order_by(k.lead_id, k.kind))
    return [KindPoints(int(lead), str(kind), int(n), float(total)) for lead, kind, n, total in rows]


# ---------------------------------------------------------------------------- a chunk scored in the database
#
# A chunk's leads, their fit rules' matches, their points per kind and their new scores live in temporary
# tables for the length of the chunk's transaction (per connection: concurrent chunks never see each other's).

_scratch = MetaData()
_Id = BigInteger().with_variant(Integer(), "sqlite")
_TEMP: dict[str, Any] = {"prefixes": ["TEMPORARY"], "postgresql_on_commit": "DELETE ROWS"}

chunk_lead = Table("nurture_chunk_lead", _scratch, Column("lead_id", _Id, primary_key=True), **_TEMP)
# A fit rule's field values, among the chunk's leads, that match it (as the field's text; see _field_text).
fit_match = Table(
    "nurture_fit_match",
    _scratch,
    Column("rule", Integer, primary_key=True),
    Column("value", Text, primary_key=True),
    **_TEMP,
)
chunk_fit = Table(
    "nurture_chunk_fit",
    _scratch,
    Column("lead_id", _Id),
    Column("rule", Integer),
    Column("label", Text),
    Column("points", Float),
    **_TEMP,
)
chunk_kind = Table(
    "nurture_chunk_kind",
    _scratch,
    Column("lead_id", _Id),
    Column("kind", Text),
    Column("events", Integer),
    Column("counted", Integer),
    Column("points", Float),
    **_TEMP,
)
chunk_score = Table(
    "nurture_chunk_score",
    _scratch,
    Column("lead_id", _Id, primary_key=True),
    Column("old_stage", Text),
    Column("old_score", Float),
    Column("old_fit", Float),
    Column("old_engagement", Float),
    Column("first", Integer),
    Column("had_events", Integer),
    Column("purchased", Integer),
    Column("fit", Float),
    Column("decayed", Float),
    Column("points", Float),
    Column("score", Float),
    Column("held", Integer),
    Column("target", Text),
    **_TEMP,
)


@dataclass
class ChunkScores:
    """What scoring a chunk wrote: its ledger rows, the stage changes it calls for, the leads that did something."""

    score_changes: int = 0
    moves: list[StageMove] = field(default_factory=list)
    with_events: list[int] = field(default_factory=list)


def score_chunk(
    *,
    session: Session,
    lead_ids: Sequence[int],
    playbook: Playbook,
    now: datetime,
    replay: bool = False,
    held: Iterable[int] = (),
    flow_run_id: str | None = None,
) -> ChunkScores:
    """Score a chunk of (locked) leads in the database, as :func:`nurture.advancing.plan_chunk` would.

    A cycle brings each stored score to ``now`` and adds the leads' events not yet scored; a replay
    recomputes every score from all events under the current playbook. Writes the new scores,
    stages and review times, one ledger row per moved score (rule by rule), and marks the events
    as scored: a handful of set-based statements, whatever the chunk's size. Only the leads whose
    stage changes come back to Python (``moves``), for the state machine. ``held`` leads keep their stage.
    """
    result = ChunkScores()
    if not lead_ids:
        return result
    dialect = session.get_bind().dialect.name
    _start_chunk(session, lead_ids)
    lo, hi = min(lead_ids), max(lead_ids)
    _match_fit(session, dialect, playbook.scoring.fit, lo=lo, hi=hi)
    _sum_points(session, dialect, playbook, now, replay=replay, lo=lo, hi=hi)
    _assemble(session, dialect, playbook, now, replay=replay, held=sorted(set(held)), lo=lo, hi=hi)
    _write_leads(session, dialect, playbook, now, lo=lo, hi=hi)
    result.score_changes = _write_ledger(session, dialect, playbook, now, replay=replay, flow_run_id=flow_run_id)
    result.moves = _stage_moves(session, playbook)
    result.with_events = [
        int(i) for i in session.scalars(select(chunk_score.c.lead_id).where(chunk_score.c.had_events == 1))
    ]
    session.execute(
        update(Event)
        .where(
            col(Event.lead_id).in_(select(chunk_lead.c.lead_id)),
            # As the partial index ix_event_pending says it: its entries are all there is to mark.
            is_pending(col(Event.applied)),
            col(Event.occurred_at) <= bindparam("now", now, type_=UTCDateTime()),
        )
        .values(applied=True)
    )
    return result


def _is_sqlite(session: Session) -> bool:
    return session.get_bind().dialect.name == "sqlite"


def _start_chunk(session: Session, lead_ids: Sequence[int]) -> None:
    """Empty scratch tables (created on the connection's first chunk) holding this chunk's lead ids."""
    for table in _scratch.sorted_tables:
        session.execute(CreateTable(table, if_not_exists=True))
        session.execute(table.delete())
    ids = sorted(set(lead_ids))
    if session.get_bind().dialect.name != "postgresql":
        session.execute(insert(chunk_lead), [{"lead_id": i} for i in ids])
    else:
        # One array, not a row per id: an executemany of thousands of rows costs seconds per chunk here.
        session.execute(insert(chunk_lead).from_select(["lead_id"], select(func.unnest(array_param(ids, BigInteger)))))
    # A temporary table has no statistics until analysed: without them the planner takes a cycle's
    # scattered leads for a large part of the id range and scans every lead instead of probing the key.
    session.execute(text("ANALYZE temp.nurture_chunk_lead" if _is_sqlite(session) else "ANALYZE nurture_chunk_lead"))


# The text of a lead's field that a fit rule reads, and how Python reads that text back into the value
# nurture.scoring.profile_value would give (a JSON attribute: its JSON text).
_TEXT_COLUMNS = {"email", "first_name", "last_name", "company", "job_title", "country", "timezone"}


def _field_text(dialect: str, field_path: str) -> tuple[Any, Callable[[str], Any]] | None:
    """The SQL text of ``field_path`` on ``lead``, and its reader; None for a field no lead has
    (``profile_value`` finds nothing there: the rule never matches)."""
    head, _, rest = field_path.partition(".")
    if head in _TEXT_COLUMNS and not rest:
        return getattr(Lead, head), str
    if head == "company_size" and not rest:
        return cast(col(Lead.company_size), Text), int
    if head != "attributes":
        return None
    document = col(Lead.attributes)
    keys = rest.split(".") if rest else []
    if dialect == "postgresql":
        # Key by key into objects only, as profile_value: json_extract_path would also index an array by "0".
        value: Any = document
        for key in keys:
            value = case((func.json_typeof(value) == "object", value.op("->")(key)), else_=literal(None))
        return cast(value, Text), json.loads
    if not keys:
        return cast(document, Text), json.loads
    path = "$" + "".join('."' + key.replace('"', '""') + '"' for key in keys)
    return document.op("->", return_type=Text)(path), json.loads


def _match_fit(session: Session, dialect: str, rules: Sequence[FitRule], *, lo: int, hi: int) -> None:
    """Which of the chunk's field values match each fit rule, decided by the reference
    (``nurture.scoring.value_matches``) once per distinct value; then one row per lead and matched rule."""
    # Every statement names the chunk's id range too: the primary key's range, not a scan of every lead.
    in_range = col(Lead.id).between(lo, hi)
    in_chunk = in_range & col(Lead.id).in_(select(chunk_lead.c.lead_id))
    matches: list[tuple[int, str]] = []
    per_rule = []
    for index, rule in enumerate(rules):
        found = _field_text(dialect, rule.field)
        if found is None:
            continue
        text_of, read = found
        values = session.scalars(select(text_of).where(in_chunk, text_of.is_not(None)).distinct()).all()
        matched = [v for v in values if value_matches(rule, read(v))]
        if not matched:
            continue
        matches += [(index, v) for v in matched]
        per_rule.append(
            select(col(Lead.id), literal(index), literal(rule.label, Text), literal(float(rule.points), Float))
            .select_from(chunk_lead)
            .join(Lead, col(Lead.id) == chunk_lead.c.lead_id)
            .join(fit_match, (fit_match.c.rule == index) & (fit_match.c.value == text_of))
            .where(in_range)
        )
    if not matches:
        return
    if dialect == "postgresql":
        rules_of, values_of = zip(*matches, strict=True)
        pairs = select(func.unnest(array_param(rules_of, Integer)), func.unnest(array_param(values_of, Text)))
        session.execute(insert(fit_match).from_select(["rule", "value"], pairs))
    else:
        session.execute(insert(fit_match), [{"rule": r, "value": v} for r, v in matches])
    # Every rule's matching leads in one statement.
    session.execute(insert(chunk_fit).from_select(["lead_id", "rule", "label", "points"], union_all(*per_rule)))


def _sum_points(
    session: Session, dialect: str, playbook: Playbook, now: datetime, *, replay: bool, lo: int, hi: int
) -> None:
    """The chunk's new event points per lead and kind: in a replay every event up to ``now``; in a cycle the
    events not yet scored, a daily cap counting those of the same day already in the score."""
    query = _points_query(dialect, playbook, now, replay=replay, lo=lo, hi=hi)
    if query is not None:
        session.execute(insert(chunk_kind).from_select(["lead_id", "kind", "events", "counted", "points"], query))


def _points_query(dialect: str, playbook: Playbook, now: datetime, *, replay: bool, lo: int, hi: int) -> Any:
    scoring = playbook.scoring
    kinds = sorted(set(scoring.events) | set(playbook.stages.customer.on_events))
    if not kinds:
        return None
    at = bindparam("now", now, type_=UTCDateTime())
    occurred = col(Event.occurred_at)
    day = _utc_day(dialect, occurred)
    in_chunk = col(Event.lead_id).in_(select(chunk_lead.c.lead_id))
    # A replay reads every event of a range of leads (the index's prefix); a cycle reads the pending ones
    # (the partial index ix_event_pending), wherever its scattered leads are.
    pending = is_pending(col(Event.applied))
    chunk_events = [col(Event.lead_id).between(lo, hi), in_chunk] if replay else [in_chunk, pending]
    ranked = (
        select(
            col(Event.lead_id).label("lead_id"),
            col(Event.kind).label("kind"),
            day.label("day"),
            _age_seconds(dialect, occurred, at).label("age"),
            func.row_number()
            .over(partition_by=(col(Event.lead_id), col(Event.kind), day), order_by=(occurred, col(Event.id)))
            .label("nth"),
        )
        .where(*chunk_events, col(Event.kind).in_(kinds), occurred <= at)
        .subquery()
    )
    caps = {kind: rule.max_per_day for kind, rule in scoring.events.items() if rule.max_per_day is not None}
    nth: Any = ranked.c.nth
    if caps and not replay:
        # A cap holds across cycles: the day's events already in the score come first. Counted per pending
        # event through the (lead, kind, time) index: the cost follows the new events, not the history.
        scored = aliased(Event)
        before = (
            select(func.count())
            .where(
                col(scored.lead_id) == ranked.c.lead_id,
                col(scored.kind) == ranked.c.kind,
                Flag(col(scored.applied), value=True),
                _utc_day(dialect, col(scored.occurred_at)) == ranked.c.day,
            )
            .scalar_subquery()
        )
        nth = ranked.c.nth + case((ranked.c.kind.in_(sorted(caps)), before), else_=0)
    points = {kind: rule.points for kind, rule in scoring.events.items()}
    half_lives = ranked.c.age / scoring.half_life.total_seconds()
    decay = case((half_lives > _NOTHING_LEFT, literal(0.0)), else_=func.power(literal(2.0), -half_lives))
    each = case(points, value=ranked.c.kind, else_=literal(0.0)) * decay if points else literal(0.0)
    cap = case(caps, value=ranked.c.kind, else_=literal(_UNCAPPED)) if caps else literal(_UNCAPPED)
    counts = nth <= cap
    return (
        select(
            ranked.c.lead_id,
            ranked.c.kind,
            func.count(),
            func.sum(case((counts, 1), else_=0)),
            func.coalesce(func.sum(case((counts, each), else_=literal(0.0))), 0.0),
        )
        .select_from(ranked)
        .group_by(ranked.c.lead_id, ranked.c.kind)
    )


def _assemble(
    session: Session,
    dialect: str,
    playbook: Playbook,
    now: datetime,
    *,
    replay: bool,
    held: Sequence[int],
    lo: int,
    hi: int,
) -> None:
    """ONE statement: every lead of the chunk with its fit, its engagement decayed to ``now`` plus the
    new points, and its score; then the stage each belongs in."""
    at = bindparam("now", now, type_=UTCDateTime())
    scoring = playbook.scoring
    fit = (
        select(chunk_fit.c.lead_id, func.sum(chunk_fit.c.points).label("fit")).group_by(chunk_fit.c.lead_id).subquery()
    )
    customer_kinds = sorted(playbook.stages.customer.on_events)
    purchase = case((chunk_kind.c.kind.in_(customer_kinds), 1), else_=0) if customer_kinds else literal(0)
    scored_kinds = sorted(scoring.events)
    new = (
        select(
            chunk_kind.c.lead_id,
            func.sum(case((chunk_kind.c.kind.in_(scored_kinds), chunk_kind.c.points), else_=0.0)).label("points"),
            func.max(purchase).label("purchased"),
        )
        .group_by(chunk_kind.c.lead_id)
        .subquery()
    )
    lead = Lead.__table__  # type: ignore[attr-defined]
    if replay:
        decayed: Any = literal(0.0)
        had_events: Any = literal(0)
    else:
        half_lives = _age_seconds(dialect, lead.c.scored_at, at) / scoring.half_life.total_seconds()
        decayed = case(
            ((lead.c.scored_at.is_(None)) | (lead.c.engagement == 0.0), lead.c.engagement),
            (half_lives <= 0, lead.c.engagement),
            (half_lives > _NOTHING_LEFT, literal(0.0)),
            else_=lead.c.engagement * func.power(literal(2.0), -half_lives),
        )
        any_event = (
            select(literal(1))
            .where(
                col(Event.lead_id) == lead.c.id,
                is_pending(col(Event.applied)),
                col(Event.occurred_at) <= at,
            )
            .exists()
        )
        had_events = case((any_event, 1), else_=0)
    parts = (
        select(
            lead.c.id.label("lead_id"),
            lead.c.stage.label("old_stage"),
            lead.c.score.label("old_score"),
            lead.c.fit_score.label("old_fit"),
            lead.c.engagement.label("old_engagement"),
            case((lead.c.scored_at.is_(None), 1), else_=0).label("first"),
            had_events.label("had_events"),
            func.coalesce(new.c.purchased, 0).label("purchased"),
            func.coalesce(fit.c.fit, 0.0).label("fit"),
            cast(decayed, Float).label("decayed"),
            func.coalesce(new.c.points, 0.0).label("points"),
        )
        .join(chunk_lead, chunk_lead.c.lead_id == lead.c.id)
        .outerjoin(fit, fit.c.lead_id == lead.c.id)
        .outerjoin(new, new.c.lead_id == lead.c.id)
        .where(lead.c.id.between(lo, hi))
        .subquery()
    )
    columns = [c.name for c in parts.c]
    session.execute(
        insert(chunk_score).from_select(
            [*columns, "score", "held"],
            select(*parts.c, (parts.c.fit + parts.c.decayed + parts.c.points).label("score"), literal(0)),
        )
    )
    if dialect == "sqlite":
        # Row counts for SQLite's planner, which otherwise takes the chunk's tables for a million rows and
        # walks every lead of the id range (a cycle's scattered leads span most of it) instead of probing them.
        session.execute(text("ANALYZE temp.nurture_chunk_score"))
    for ids in _batches(held):
        session.execute(chunk_score.update().where(chunk_score.c.lead_id.in_(ids)).values(held=1))
    stages = playbook.stages
    s = chunk_score.c
    session.execute(
        chunk_score.update().values(
            target=case(
                (s.held == 1, s.old_stage),
                ((s.old_stage == Stage.customer.value) | (s.purchased == 1), Stage.customer.value),
                (
                    (s.score >= stages.hot.enter_at)
                    | ((s.old_stage == Stage.hot.value) & (s.score >= stages.hot.leave_below)),
                    Stage.hot.value,
                ),
                (
                    (s.score >= stages.warm.enter_at)
                    | (s.old_stage.in_([Stage.warm.value, Stage.hot.value]) & (s.score >= stages.warm.leave_below)),
                    Stage.warm.value,
                ),
                else_=Stage.cold.value,
            )
        )
    )


def _batches(items: Sequence[int], size: int = 5000) -> Iterable[Sequence[int]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


# Stands for "no threshold ahead" in the minimum of the review times (NULL would hide the others on SQLite).
_NEVER = 1e300


def _review_at(dialect: str, playbook: Playbook, now: datetime) -> Any:
    """When decay alone next carries a lead's score across a threshold (``nurture.scoring.next_review_at``):
    the threshold strictly between fit and score crossed first, ``h · log2(E / (T − fit))``, plus one second."""
    s = chunk_score.c
    engagement = s.decayed + s.points
    half_lives = []
    for threshold in review_thresholds(playbook.stages):
        gap = literal(threshold, Float) - s.fit
        between = ((s.fit < threshold) & (s.score > threshold)) | ((s.score < threshold) & (s.fit > threshold))
        ratio = engagement / case((between, gap), else_=literal(1.0))
        half_lives.append(case((between & (ratio > 1.0), func.ln(ratio) / math.log(2.0)), else_=literal(_NEVER)))
    soonest = func.least(*half_lives) if dialect == "postgresql" else func.min(*half_lives, literal(_NEVER))
    seconds = playbook.scoring.half_life.total_seconds()
    if dialect == "postgresql":
        at = bindparam("now", now, type_=UTCDateTime())
        when: Any = at + func.make_interval(0, 0, 0, 0, 0, 0, soonest * seconds + 1.0)
    else:
        # Naive UTC text, as UTCDateTime stores it: microseconds since the epoch, formatted.
        micros = (
            literal(round(now.timestamp() * 1_000_000))
            + cast(func.round(soonest * (seconds * 1_000_000)), Integer)
            + 1_000_000
        )
        when = (
            func.strftime("%Y-%m-%d %H:%M:%S", micros // 1_000_000, "unixepoch")
            .op("||")(".")
            .op("||")(func.substr(literal("000000", Text) + cast(micros % 1_000_000, Text), -6))
        )
    return case(
        ((s.held == 1) | (s.target == Stage.customer.value) | (soonest >= _NEVER), literal(None)),
        else_=when,
    )


def _write_leads(session: Session, dialect: str, playbook: Playbook, now: datetime, *, lo: int, hi: int) -> None:
    """The chunk's new scores, stages and review times, in one UPDATE … FROM."""
    lead = Lead.__table__  # type: ignore[attr-defined]
    s = chunk_score.c
    session.execute(
        lead.update()
        .where(lead.c.id == s.lead_id, lead.c.id.between(lo, hi))
        .values(
            fit_score=s.fit,
            engagement=s.decayed + s.points,
            score=s.score,
            scored_at=bindparam("now", now, type_=UTCDateTime()),
            next_review_at=_review_at(dialect, playbook, now),
            needs_rescore=False,
            stage=s.target,
            updated_at=bindparam("now", now, type_=UTCDateTime()),
        )
    )


# Moves smaller than this are rounding, not a change of score (nurture.advancing.plan_chunk).
_MOVED = 1e-9


def _write_ledger(
    session: Session, dialect: str, playbook: Playbook, now: datetime, *, replay: bool, flow_run_id: str | None
) -> int:
    """One ledger row per changed score, its contributions rule by rule (INSERT … SELECT); how many."""
    s = chunk_score.c
    moved = func.abs(s.score - s.old_score) > _MOVED
    wanted = moved if replay else (moved | (s.had_events == 1) | (s.first == 1))

    def row(order: Any, key: Any, value: Any, *where: Any) -> Any:
        return select(s.lead_id.label("lead_id"), order.label("ord"), key.label("key"), value.label("value")).where(
            *where
        )

    parts = []
    if replay:
        previous = f"replay under playbook {playbook.version}: previous score"
        parts.append(row(literal(0), literal(previous, Text), -s.old_score))
    fit_labels = (
        select(
            chunk_fit.c.lead_id.label("lead_id"),
            (100 + func.min(chunk_fit.c.rule)).label("ord"),
            (literal("fit: ", Text) + chunk_fit.c.label).label("key"),
            func.sum(chunk_fit.c.points).label("value"),
        )
        .join(chunk_score, s.lead_id == chunk_fit.c.lead_id)
        .group_by(chunk_fit.c.lead_id, chunk_fit.c.label)
    )
    if not replay:
        fit_labels = fit_labels.where(s.first == 1)
        parts.append(
            row(
                literal(99),
                literal("fit (profile changed)", Text),
                s.fit - s.old_fit,
                s.first == 0,
                func.abs(s.fit - s.old_fit) > _MOVED,
            )
        )
        parts.append(
            row(
                literal(10_000),
                literal("decay", Text),
                s.decayed - s.old_engagement,
                func.abs(s.decayed - s.old_engagement) > _MOVED,
            )
        )
    parts.append(fit_labels)
    scored = sorted(playbook.scoring.events)
    if scored:
        parts.append(
            select(
                chunk_kind.c.lead_id.label("lead_id"),
                (20_000 + case({k: n for n, k in enumerate(scored)}, value=chunk_kind.c.kind)).label("ord"),
                (literal("event: ", Text) + chunk_kind.c.kind).label("key"),
                chunk_kind.c.points.label("value"),
            ).where(chunk_kind.c.kind.in_(scored), chunk_kind.c.counted > 0)
        )
    rows = union_all(*parts).subquery()
    if dialect == "postgresql":
        rounded = cast(func.round(cast(rows.c.value, Numeric), 4), Float)
        joined = func.json_object_agg(rows.c.key, aggregate_order_by(rounded, rows.c.ord))
        by_lead = select(rows.c.lead_id, joined.label("contributions")).group_by(rows.c.lead_id).subquery()
    else:
        ordered = select(rows).order_by(rows.c.lead_id, rows.c.ord).subquery()
        joined = func.json_group_object(ordered.c.key, func.round(ordered.c.value, 4))
        by_lead = select(ordered.c.lead_id, joined.label("contributions")).group_by(ordered.c.lead_id).subquery()
    ledger = ScoreChange.__table__  # type: ignore[attr-defined]
    empty: Any = literal_column("'{}'")
    session.execute(
        insert(ledger).from_select(
            ["lead_id", "at", "old_score", "new_score", "contributions", "playbook_version", "flow_run_id"],
            select(
                s.lead_id,
                bindparam("now", now, type_=UTCDateTime()),
                s.old_score,
                s.score,
                func.coalesce(
                    by_lead.c.contributions,
                    cast(empty, ledger.c.contributions.type) if dialect == "postgresql" else empty,
                ),
                literal(playbook.version, Text),
                literal(flow_run_id, Text),
            )
            .outerjoin(by_lead, by_lead.c.lead_id == s.lead_id)
            .where(wanted)
            .order_by(s.lead_id),
        )
    )
    # Counted on the chunk's own table: a driver's rowcount of INSERT … SELECT is not always known.
    return int(session.scalar(select(func.count()).select_from(chunk_score).where(wanted)) or 0)


def _stage_moves(session: Session, playbook: Playbook) -> list[StageMove]:
    """The chunk's leads whose stage changes, each checked against the lifecycle state machine."""
    s = chunk_score.c
    moves = []
    query = (
        select(s.lead_id, s.old_stage, s.target, s.score, s.purchased)
        .where(s.target != s.old_stage)
        .order_by(s.lead_id)
    )
    for lead_id, old, target, score, purchased in session.execute(query):
        source, goal = Stage(old), Stage(target)
        reason = transition_reason(score, source, goal, playbook.stages, purchased=bool(purchased))
        moves.append(StageMove(int(lead_id), source, goal, float(score), reason))
        check_move(int(lead_id), source, goal)
    return moves
