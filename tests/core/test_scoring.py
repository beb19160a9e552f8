"""Scoring math: fit rules, decay, daily caps, the closed form, and when to review a lead."""

from __future__ import annotations

import math
import random
from datetime import timedelta

import pytest

from nurture.lifecycle import review_thresholds, target_stage
from nurture.playbook import FitRule, Playbook, Scoring, Stage
from nurture.scoring import (
    ActivityEvent,
    LeadScoreState,
    decay_factor,
    engagement_at,
    event_points,
    fit_breakdown,
    next_review_at,
    rescore,
)
from tests.conftest import T0


def test_a_point_halves_every_half_life() -> None:
    half_life = timedelta(days=14)
    assert decay_factor(timedelta(0), half_life) == 1.0
    assert decay_factor(timedelta(days=14), half_life) == pytest.approx(0.5)
    assert decay_factor(timedelta(days=28), half_life) == pytest.approx(0.25)
    assert decay_factor(timedelta(days=7), half_life) == pytest.approx(1 / math.sqrt(2))


def test_fit_rules_match_each_operator(playbook: Playbook) -> None:
    profile = {
        "email": "ceo@bigco.example",
        "job_title": "VP Product",
        "company_size": 120,
        "country": "de",
        "attributes": {"industry": "SaaS"},
    }
    assert fit_breakdown(profile, playbook.scoring.fit) == {
        "decision maker": 15,
        "mid-market or larger": 10,
        "target market": 5,
        "software industry": 5,
    }
    small_freemail = {"email": "x@gmail.com", "job_title": "Student", "company_size": "12", "country": "BR"}
    assert fit_breakdown(small_freemail, playbook.scoring.fit) == {"free-mail address": -10}


def test_missing_or_non_numeric_fields_never_match() -> None:
    rules = (FitRule(field="company_size", gte=10, points=5), FitRule(field="company_size", lte=10, points=1))
    assert fit_breakdown({}, rules) == {}
    assert fit_breakdown({"company_size": "lots"}, rules) == {}
    assert fit_breakdown({"company_size": "10"}, rules) == {"company_size >= 10.0": 5, "company_size <= 10.0": 1}


def test_events_decay_from_when_they_happened(playbook: Playbook) -> None:
    events = [ActivityEvent("demo_request", T0), ActivityEvent("form_submit", T0 + timedelta(days=14))]
    points = event_points(events, playbook.scoring, T0 + timedelta(days=28))
    assert points.by_kind == pytest.approx({"demo_request": 30 * 0.25, "form_submit": 10 * 0.5})


def test_unknown_kinds_are_ignored_and_negative_weights_subtract(playbook: Playbook) -> None:
    events = [ActivityEvent("tweet_liked", T0), ActivityEvent("unsubscribe", T0)]
    points = event_points(events, playbook.scoring, T0)
    assert points.by_kind == {"unsubscribe": -30}
    assert points.kinds_seen == {"tweet_liked", "unsubscribe"}


def test_daily_cap_counts_the_first_events_of_the_day_even_across_cycles(playbook: Playbook) -> None:
    views = [ActivityEvent("page_view", T0 + timedelta(minutes=i)) for i in range(15)]
    assert event_points(views, playbook.scoring, T0).total == pytest.approx(10, rel=1e-4)
    already = {("page_view", T0.date()): 8}
    later = event_points(views[:5], playbook.scoring, T0, already_counted=already)
    assert len(later.counted) == 2
    next_day = event_points(
        [ActivityEvent("page_view", T0 + timedelta(days=1))], playbook.scoring, T0 + timedelta(days=1)
    )
    assert len(next_day.counted) == 1


def test_closed_form_over_many_cycles_equals_the_direct_sum(playbook: Playbook) -> None:
    rng = random.Random(11)
    kinds = ["page_view", "pricing_view", "form_submit", "email_click", "webinar_attended", "bounce"]
    events = sorted(
        (ActivityEvent(rng.choice(kinds), T0 + timedelta(hours=rng.uniform(0, 24 * 60))) for _ in range(300)),
        key=lambda e: e.occurred_at,
    )
    state = LeadScoreState()
    seen = 0
    for cycle in range(1, 61):
        now = T0 + timedelta(days=cycle)
        new = [e for e in events[seen:] if e.occurred_at <= now]
        seen += len(new)
        # Caps need what earlier cycles counted: recompute it as the database does.
        counted: dict = {}
        for e in event_points(events[: seen - len(new)], playbook.scoring, now).counted:
            key = (e.kind, e.occurred_at.date())
            counted[key] = counted.get(key, 0) + 1
        update = rescore(state, profile={}, new_events=new, scoring=playbook.scoring, now=now, already_counted=counted)
        state = LeadScoreState(update.fit, update.engagement, now, update.score)
    end = T0 + timedelta(days=60)
    direct = event_points(events, playbook.scoring, end).total
    assert state.engagement == pytest.approx(direct, rel=1e-9)


def test_rescore_explains_the_change(playbook: Playbook) -> None:
    first = rescore(
        LeadScoreState(),
        profile={"job_title": "CTO"},
        new_events=[ActivityEvent("demo_request", T0)],
        scoring=playbook.scoring,
        now=T0,
    )
    assert first.score == pytest.approx(45)
    assert first.contributions == {"fit: decision maker": 15, "event: demo_request": 30}
    later = rescore(
        LeadScoreState(first.fit, first.engagement, T0, first.score),
        profile={"job_title": "CTO"},
        new_events=[],
        scoring=playbook.scoring,
        now=T0 + timedelta(days=14),
    )
    assert later.score == pytest.approx(30)
    assert later.contributions == {"decay": pytest.approx(-15)}
    assert sum(later.contributions.values()) == pytest.approx(later.score - later.old_score)


@pytest.mark.parametrize("engagement", [80.0, 45.0, 12.0, -20.0])
def test_next_review_is_when_decay_crosses_the_first_threshold(playbook: Playbook, engagement: float) -> None:
    scoring, stages = playbook.scoring, playbook.stages
    fit = 10.0
    review = next_review_at(
        fit=fit, engagement=engagement, now=T0, half_life=scoring.half_life, thresholds=review_thresholds(stages)
    )
    crossings = [t for t in review_thresholds(stages) if min(fit, fit + engagement) < t < max(fit, fit + engagement)]
    if not crossings:
        assert review is None
        return
    assert review is not None

    def score_at(t):  # type: ignore[no-untyped-def]
        return fit + engagement_at(engagement, T0, t, scoring.half_life)

    nearest = min(crossings, key=lambda t: abs(t - (fit + engagement)))
    before, after = score_at(review - timedelta(seconds=2)), score_at(review)
    assert (before - nearest) * (after - nearest) < 0, "the review must land just past a threshold"


def test_a_lead_that_does_nothing_needs_no_review() -> None:
    scoring = Scoring(half_life=timedelta(days=14), events={})
    assert next_review_at(fit=20, engagement=0, now=T0, half_life=scoring.half_life, thresholds=(30, 40)) is None


def test_review_times_walk_a_decaying_lead_down_through_every_stage(playbook: Playbook) -> None:
    """Following next_review_at alone takes a hot lead to cold, one threshold at a time."""
    fit, engagement, now, stage = 5.0, 95.0, T0, Stage.hot
    stages_seen = [stage]
    for _ in range(10):
        review = next_review_at(
            fit=fit,
            engagement=engagement,
            now=now,
            half_life=playbook.scoring.half_life,
            thresholds=review_thresholds(playbook.stages),
        )
        if review is None:
            break
        engagement = engagement_at(engagement, now, review, playbook.scoring.half_life)
        now = review
        new_stage = target_stage(fit + engagement, stage, playbook.stages)
        if new_stage != stage:
            stages_seen.append(new_stage)
            stage = new_stage
    assert stages_seen == [Stage.hot, Stage.warm, Stage.cold]


def test_a_fit_regex_sees_at_most_the_first_thousand_characters_of_a_field() -> None:
    """An attribute may hold megabytes, and even a pattern validate accepts is quadratic in it when unanchored."""
    from nurture.playbook import FitRule
    from nurture.scoring import MAX_MATCHED, rule_matches

    slow = FitRule.model_validate(
        {"name": "x after spaces", "field": "attributes.notes", "regex": r"\s*x", "points": 1}
    )
    assert rule_matches(slow, {"attributes": {"notes": " " * 5 + "x"}})
    # Without the cut this takes about a day (5 million spaces, quadratic backtracking); with it, a moment.
    assert not rule_matches(slow, {"attributes": {"notes": " " * 5_000_000}})
    early = FitRule.model_validate({"name": "vip", "field": "attributes.notes", "regex": "vip", "points": 1})
    assert rule_matches(early, {"attributes": {"notes": "vip" + "." * 10_000}})
    assert not rule_matches(early, {"attributes": {"notes": "." * MAX_MATCHED + "vip"}})


@pytest.mark.parametrize(
    ("total", "batch"),
    [(0, 2000), (1, 2000), (99_999, 2000), (100_000, 2000), (1_000_000, 2000), (1_249_999, 2000), (1_000_000, 50_000)],
)
def test_a_replay_takes_at_most_50_task_runs_below_1_25_million_leads(total: int, batch: int) -> None:
    from flows.advancing import MAX_CHUNK, REPLAY_TASK_RUNS, replay_chunk_size

    size = replay_chunk_size(total, batch)
    assert size >= batch
    assert size <= max(batch, MAX_CHUNK)
    # The replay's leads are cut into ranges of `size` leads: one advance-leads task run per range.
    runs = -(-total // size)
    assert runs <= REPLAY_TASK_RUNS
