"""The API load test, small, inside `make test`: a few clients for a few seconds per engine while
cycles run and a migration blocks the event table; no 500, no connection error, no event lost
(full run: docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.api_load import run_engine, table
from tests.conftest import postgres_url


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_clients_posting_while_cycles_run_get_no_500_and_lose_no_event(
    kind: str, prefect_api: str, tmp_path: Path
) -> None:
    if kind == "postgresql" and postgres_url() is None:
        pytest.skip("NURTURE_TEST_DATABASE_URL is not set: PostgreSQL tests skipped (CI sets it)")
    report = run_engine(
        kind=kind,
        clients=4,
        seconds=8,
        seed=3,
        leads=100,
        prefect_api=prefect_api,
        workdir=tmp_path,
        postgres_url=postgres_url(),
        # PostgreSQL: the API gives up on the blocked table after a few short waits and answers 503,
        # so the clients' retries after Retry-After are part of the test. SQLite's API waits it out.
        migration_seconds=3,
        lock_timeout=0.1,
    )
    figures = table([report])
    assert report.errors == [], figures
    assert (report.lost, report.duplicates, report.stored_unacknowledged) == (0, 0, 0), figures
    assert report.violations == [], figures
    # The load happened: events and suppressions acknowledged, bad input refused, cycles scoring among them.
    assert len(report.events_acknowledged) > 100, figures
    assert report.suppressed_at, figures
    assert report.refused > 0, figures
    assert report.cycles >= 1, figures
    if kind == "postgresql":
        assert report.retried > 0, figures
