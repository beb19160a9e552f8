"""The decisions behind `nurture serve`'s refusal and watch (the real scheduler: test_scheduled_runs.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from uuid import uuid4

from flows.serving import WatchedDeployment, stack_problem, unscheduled


def test_prefect_3_8_with_sqlalchemy_2_1_is_refused_and_the_locked_pair_is_not() -> None:
    problem = stack_problem((3, 8, 8), (2, 1, 9))
    assert problem is not None
    assert "SQLAlchemy 2.1.9" in problem
    assert "make setup" in problem
    assert stack_problem((3, 8, 8), (2, 0, 58)) is None
    assert stack_problem((3, 9, 0), (2, 1, 0)) is None  # not known broken


def test_a_deployment_without_an_upcoming_run_is_named_only_after_the_grace_period() -> None:
    cycle, dispatch = WatchedDeployment("nurture-cycle", uuid4()), WatchedDeployment("dispatch", uuid4())
    served_at = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
    grace = timedelta(minutes=3)
    upcoming = {cycle.id: 1}
    early = served_at + timedelta(minutes=2)
    late = served_at + timedelta(minutes=3)
    assert unscheduled([cycle, dispatch], upcoming, served_at=served_at, now=early, grace=grace) == []
    assert unscheduled([cycle, dispatch], upcoming, served_at=served_at, now=late, grace=grace) == ["dispatch"]
    both = {cycle.id: 3, dispatch.id: 1}
    assert unscheduled([cycle, dispatch], both, served_at=served_at, now=late, grace=grace) == []
