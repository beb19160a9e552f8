"""Lead scoring: profile fit plus engagement that decays with a half-life.

``score = fit(lead) + engagement(lead, now)``, where every event adds
``points · 2^(−age / half_life)``. Decay has a closed form, so a lead's stored
engagement ``E(t0)`` is enough to know ``E(t) = E(t0) · 2^(−(t−t0)/h)`` plus the
points of events it has not seen yet: a cycle only touches leads that changed.

Pure: no clock, no database. ``now`` is always a parameter.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

from nurture.playbook import FitRule, Scoring

# Scores are shown to one decimal; smaller moves are not worth a ledger row.
SCORE_EPSILON = 0.05


@dataclass(frozen=True, slots=True)
class ActivityEvent:
    """The part of an event scoring needs."""

    kind: str
    occurred_at: datetime


def decay_factor(elapsed: timedelta, half_life: timedelta) -> float:
    """How much of a point is left after ``elapsed``: ``2^(−elapsed/half_life)``."""
    return math.pow(2.0, -(elapsed / half_life))


def profile_value(profile: Mapping[str, Any], field_path: str) -> Any:
    """Read ``job_title`` or ``attributes.industry`` from a lead's profile."""
    value: Any = profile
    for part in field_path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(part)
    return value


def _as_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    try:
        return float(str(value).strip())
    except (TypeError, ValueError):
        return None


# A regex sees at most this much of a field: profile fields are shorter, but an attribute
# may hold megabytes, and even a pattern `nurture validate` accepts can take time that
# grows with the square or the cube of the length (``\s*\s*$``).
MAX_MATCHED = 1_000


def rule_matches(rule: FitRule, profile: Mapping[str, Any]) -> bool:
    """Whether one fit rule holds for a profile; a missing field never matches."""
    return value_matches(rule, profile_value(profile, rule.field))


def value_matches(rule: FitRule, value: Any) -> bool:
    """Whether one fit rule holds for its field's value (``db.scoring`` asks once per distinct value)."""
    if value is None or value == "":
        return False
    if rule.equals is not None:
        return str(value).casefold() == str(rule.equals).casefold()
    if rule.in_ is not None:
        return str(value).casefold() in {str(v).casefold() for v in rule.in_}
    if rule.regex is not None:
        return re.search(rule.regex, str(value)[:MAX_MATCHED]) is not None
    number = _as_number(value)
    if number is None:
        return False
    if rule.gte is not None:
        return number >= rule.gte
    if rule.lte is not None:
        return number <= rule.lte
    return False


def fit_breakdown(profile: Mapping[str, Any], rules: Sequence[FitRule]) -> dict[str, float]:
    """Points per matching fit rule, by rule label."""
    points: dict[str, float] = {}
    for rule in rules:
        if rule_matches(rule, profile):
            points[rule.label] = points.get(rule.label, 0.0) + rule.points
    return points


def day_key(kind: str, occurred_at: datetime) -> tuple[str, date]:
    """The bucket a per-kind daily cap counts in (UTC day)."""
    return kind, occurred_at.date()


@dataclass(frozen=True, slots=True)
class EventPoints:
    """Points new events add at ``now``, after caps and decay."""

    by_kind: dict[str, float]
    counted: list[ActivityEvent]
    kinds_seen: frozenset[str]

    @property
    def total(self) -> float:
        return sum(self.by_kind.values())


NO_POINTS = EventPoints(by_kind={}, counted=[], kinds_seen=frozenset())


def event_points(
    events: Iterable[ActivityEvent],
    scoring: Scoring,
    now: datetime,
    *,
    already_counted: Mapping[tuple[str, date], int] | None = None,
) -> EventPoints:
    """Decayed points of ``events`` at ``now``; kinds the playbook does not score add nothing.

    ``already_counted`` is how many events of a kind were already counted per
    day, so a daily cap holds across cycles.
    """
    counts: Counter[tuple[str, date]] = Counter(already_counted or {})
    by_kind: dict[str, float] = {}
    counted: list[ActivityEvent] = []
    kinds: set[str] = set()
    for event in sorted(events, key=lambda e: e.occurred_at):
        kinds.add(event.kind)
        rule = scoring.events.get(event.kind)
        if rule is None:
            continue
        key = day_key(event.kind, event.occurred_at)
        if rule.max_per_day is not None and counts[key] >= rule.max_per_day:
            continue
        counts[key] += 1
        counted.append(event)
        age = max(now - event.occurred_at, timedelta(0))
        points = rule.points * decay_factor(age, scoring.half_life)
        by_kind[event.kind] = by_kind.get(event.kind, 0.0) + points
    return EventPoints(by_kind=by_kind, counted=counted, kinds_seen=frozenset(kinds))


def engagement_at(engagement: float, scored_at: datetime | None, now: datetime, half_life: timedelta) -> float:
    """Closed form: the stored engagement at ``scored_at``, decayed to ``now``."""
    if scored_at is None or engagement == 0.0:
        return engagement
    return engagement * decay_factor(max(now - scored_at, timedelta(0)), half_life)


@dataclass(frozen=True, slots=True)
class LeadScoreState:
    """What the database keeps about a lead's score."""

    fit: float = 0.0
    engagement: float = 0.0
    scored_at: datetime | None = None
    score: float = 0.0


@dataclass(frozen=True, slots=True)
class ScoreUpdate:
    """A lead's new score and why it moved (rule → points, summing to the change)."""

    fit: float
    engagement: float
    score: float
    old_score: float
    contributions: dict[str, float] = field(default_factory=dict)
    kinds_seen: frozenset[str] = frozenset()

    @property
    def changed(self) -> bool:
        return abs(self.score - self.old_score) >= SCORE_EPSILON


def rescore(
    state: LeadScoreState,
    *,
    profile: Mapping[str, Any],
    new_events: Iterable[ActivityEvent],
    scoring: Scoring,
    now: datetime,
    already_counted: Mapping[tuple[str, date], int] | None = None,
    new_points: EventPoints | None = None,
    fit_points: Mapping[str, float] | None = None,
) -> ScoreUpdate:
    """Bring a lead's score to ``now`` from its stored state and its unseen events (or their points,
    when the database summed them: ``new_points``). ``fit_points``: the profile's ``fit_breakdown``,
    when the caller already has it (a simulation scores the same profile at every event)."""
    if fit_points is None:
        fit_points = fit_breakdown(profile, scoring.fit)
    fit = sum(fit_points.values())
    decayed = engagement_at(state.engagement, state.scored_at, now, scoring.half_life)
    new = (
        new_points
        if new_points is not None
        else event_points(new_events, scoring, now, already_counted=already_counted)
    )
    engagement = decayed + new.total
    contributions: dict[str, float] = {}
    if state.scored_at is None:
        contributions.update({f"fit: {label}": pts for label, pts in fit_points.items()})
    elif abs(fit - state.fit) > 1e-9:
        contributions["fit (profile changed)"] = fit - state.fit
    if abs(decayed - state.engagement) > 1e-9:
        contributions["decay"] = decayed - state.engagement
    contributions.update({f"event: {kind}": pts for kind, pts in new.by_kind.items()})
    return ScoreUpdate(
        fit=fit,
        engagement=engagement,
        score=fit + engagement,
        old_score=state.score,
        contributions={k: round(v, 4) for k, v in contributions.items()},
        kinds_seen=new.kinds_seen,
    )


def next_review_at(
    *,
    fit: float,
    engagement: float,
    now: datetime,
    half_life: timedelta,
    thresholds: Iterable[float],
) -> datetime | None:
    """When decay alone next carries the score across a threshold, or None if never.

    Engagement decays towards 0, so the score moves towards ``fit``; every
    threshold strictly between the two is crossed at ``h · log2(E / (T − fit))``.
    """
    score = fit + engagement
    soonest: float | None = None
    for threshold in thresholds:
        gap = threshold - fit
        between = (fit < threshold < score) or (score < threshold < fit)
        if not between or gap == 0:
            continue
        half_lives = math.log2(engagement / gap)
        if half_lives > 0 and (soonest is None or half_lives < soonest):
            soonest = half_lives
    if soonest is None:
        return None
    # One second past the crossing, so the review sees the score on the far side.
    return now + half_life * soonest + timedelta(seconds=1)
