"""The suites, small, inside `make test`: a crash trial per engine, an overlap round (full: docs/reliability.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import postgres_url
from tests.suites.crash import run_suite
from tests.suites.import_crash import run_suite as run_import_crash
from tests.suites.overlap import run_suite as run_overlap


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_killed_cycle_and_dispatcher_lose_nothing_and_send_nothing_twice(
    kind: str, prefect_api: str, tmp_path: Path
) -> None:
    if kind == "postgresql" and postgres_url() is None:
        pytest.skip("NURTURE_TEST_DATABASE_URL is not set: PostgreSQL tests skipped (CI sets it)")
    (report,) = run_suite(
        trials=1,
        engines=[kind],
        seed=11,
        leads=150,
        prefect_api=prefect_api,
        workdir=tmp_path,
        postgres_url=postgres_url(),
        echo=False,
    )
    assert report.kills >= 1, "the trial killed nothing: it proved nothing"
    assert report.accepted > 20
    assert report.violations == []


@pytest.mark.postgres
def test_two_cycles_and_two_dispatchers_at_once_do_nothing_twice(prefect_api: str, tmp_path: Path) -> None:
    if postgres_url() is None:
        pytest.skip("NURTURE_TEST_DATABASE_URL is not set: PostgreSQL tests skipped (CI sets it)")
    (report,) = run_overlap(
        rounds=1,
        engines=["postgresql"],
        seed=5,
        leads=150,
        prefect_api=prefect_api,
        workdir=tmp_path,
        postgres_url=postgres_url(),
    )
    assert report["emails_accepted"] > 20
    assert report["violations"] == []


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_an_import_killed_and_run_again_stores_what_one_clean_run_stores(kind: str, tmp_path: Path) -> None:
    if kind == "postgresql" and postgres_url() is None:
        pytest.skip("NURTURE_TEST_DATABASE_URL is not set: PostgreSQL tests skipped (CI sets it)")
    (report,) = run_import_crash(
        trials=2,
        engines=[kind],
        seed=5,
        leads=4_500,
        events=9_000,
        workdir=tmp_path,
        postgres_url=postgres_url(),
        echo=False,
    )
    assert report.kills_after_a_commit >= 1, "no kill landed after a batch was committed: it proved little"
    assert report.events_expected > 8_000
    assert report.violations == []
