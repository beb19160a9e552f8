"""`nurture explain` as a timeline: what happens next, worked out from the playbook's thresholds."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from nurture.playbook import Playbook
from nurture.scoring import engagement_at
from nurture.timeline import render, what_next

NOW = datetime(2026, 3, 2, 12, tzinfo=UTC)


def report(stage: str, *, fit: float, engagement: float, **extra: Any) -> dict[str, Any]:
    lead = {
        "email": "ann@northwind.example",
        "first_name": "Ann",
        "last_name": None,
        "job_title": None,
        "company": None,
        "country": None,
        "timezone": None,
        "stage": stage,
        "score": fit + engagement,
        "fit_score": fit,
        "engagement": engagement,
        "scored_at": NOW.isoformat(),
    }
    return {
        "lead": lead,
        "score_breakdown": {
            "fit": {},
            "engagement_by_kind": {},
            "engagement_now": engagement,
            "score_now": fit + engagement,
            "half_life_days": 14,
        },
        "suppression": None,
        "activity": [],
        "score_changes": [],
        "transitions": [],
        "enrollments": [],
        "messages": [],
        **extra,
    }


def test_decay_alone_is_shown_moving_the_lead_to_cold_with_the_sequence_it_starts(playbook: Playbook) -> None:
    lines = what_next(report("warm", fit=5, engagement=45), playbook, NOW)
    # Score 50 decays towards 5 and crosses warm.leave_below 30 when 45·2^(−t/14d) = 25.
    crossing = NOW + timedelta(days=14) * 0.8479969065549501
    expected = (
        f"Without new activity, on {crossing:%Y-%m-%d} the score falls to 30.0: warm → cold, which starts win_back."
    )
    assert expected in lines
    assert abs(5 + engagement_at(45, NOW, crossing, playbook.scoring.half_life) - 30) < 1e-6


def test_a_suppressed_lead_is_told_no_email_will_go_out(playbook: Playbook) -> None:
    lines = what_next(
        report("hot", fit=30, engagement=60, suppression={"reason": "unsubscribed", "at": None}), playbook, NOW
    )
    assert lines[0] == "No email will go out: the address is suppressed (unsubscribed)."


def test_every_line_fits_80_columns_even_with_a_long_subject(playbook: Playbook) -> None:
    subject = "A very long subject line " * 8
    message = {
        "sequence": "welcome",
        "step": 0,
        "step_id": "welcome",
        "template": "welcome",
        "variant": None,
        "status": "sent",
        "subject": subject.strip(),
        "due_at": NOW.isoformat(),
        "sent_at": NOW.isoformat(),
        "opened_at": None,
        "clicked_at": None,
        "last_error": None,
        "enrollment_id": None,
    }
    lines = render(report("warm", fit=30, engagement=20, messages=[message]), playbook, NOW)
    assert max(len(line) for line in lines) <= 80, "\n".join(lines)
    assert sum("A very long subject line" in line for line in lines) >= 3
