"""Shared fixtures: the shipped playbook, and a migrated database on SQLite and on PostgreSQL.

PostgreSQL tests need ``NURTURE_TEST_DATABASE_URL`` (CI sets it); each test gets
a fresh schema in that database, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import settings
from sqlalchemy import Engine, create_engine, text

from db.engine import get_engine, upgrade_schema
from nurture.playbook import Playbook, load_playbook
from nurture.rendering import EmailRenderer

# Property tests (tests/suites/test_fuzz.py, test_hostile.py): a quick, repeatable run in
# `make test`, thousands of fresh examples with HYPOTHESIS_PROFILE=full (docs/reliability.md).
# No deadline: this machine is shared, and a slow example is not a wrong one.
settings.register_profile("default", max_examples=20, deadline=None, derandomize=True, print_blob=True)
settings.register_profile("full", max_examples=2000, deadline=None, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

ROOT = Path(__file__).resolve().parents[1]
PLAYBOOK_PATH = ROOT / "nurture.yaml"
TEMPLATES_DIR = ROOT / "templates"
T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)  # a Monday morning


# The shipped welcome's first step: a split test with a wait for a click, and the nudge of the "else" branch.
BRANCHED_WELCOME = (
    PLAYBOOK_PATH.read_text()
    .split("    steps:\n      - id: welcome\n", 1)[1]
    .split("      # `after` counts from when the previous step was sent")[0]
)
STRAIGHT_WELCOME = """        after: 0h
        template: welcome
        subject: "{{ lead.first_name or 'Hi' }}, here is how teams get started with {{ brand.name }}"
"""


def straight_welcome(text: str) -> str:
    """The playbook text with a welcome that is a straight list (welcome, case_study, webinar_invite):
    for tests about walking steps in order, sending and timing, apart from branches and split tests."""
    assert BRANCHED_WELCOME in text
    text = text.replace(BRANCHED_WELCOME, STRAIGHT_WELCOME, 1)
    return text.replace("was sent (or the wait before it ended).", "was sent.", 1)


@pytest.fixture(scope="session")
def playbook() -> Playbook:
    return load_playbook(PLAYBOOK_PATH, templates_dir=TEMPLATES_DIR)


@pytest.fixture(scope="session")
def renderer() -> EmailRenderer:
    return EmailRenderer(TEMPLATES_DIR)


def postgres_url() -> str | None:
    return os.environ.get("NURTURE_TEST_DATABASE_URL") or None


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a fresh schema in the test PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'nurture.db'}"
        return
    base = postgres_url()
    if base is None:
        pytest.skip("NURTURE_TEST_DATABASE_URL is not set: PostgreSQL tests skipped (CI sets it)")
    schema = f"nurture_test_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f"CREATE SCHEMA {schema}"))
    separator = "&" if "?" in base else "?"
    url = f"{base}{separator}options=-csearch_path%3D{schema}"
    try:
        yield url
    finally:
        get_engine(url).dispose()
        get_engine.cache_clear()
        with admin.begin() as conn:
            conn.execute(text(f"DROP SCHEMA {schema} CASCADE"))
        admin.dispose()


@pytest.fixture
def engine(database_url: str) -> Engine:
    """A database at the current schema."""
    engine = get_engine(database_url)
    upgrade_schema(engine)
    return engine


@pytest.fixture(scope="session")
def prefect_api() -> Iterator[str]:
    """One Prefect test server for the whole session (it takes ~20 s to start); yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        url = PREFECT_API_URL.value()
        assert url, "the Prefect test harness did not set an API URL"
        yield url


@pytest.fixture
def nurture_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Settings for a nurture installation in ``tmp_path`` (SQLite, file outbox)."""
    from flows.runtime import reset_runtime

    env = {
        "NURTURE_DATABASE_URL": f"sqlite:///{tmp_path / 'nurture.db'}",
        "NURTURE_PLAYBOOK": str(PLAYBOOK_PATH),
        "NURTURE_TEMPLATES": str(TEMPLATES_DIR),
        "NURTURE_OUTBOX_DIR": str(tmp_path / "outbox"),
        "NURTURE_TRANSPORT": "outbox",
        "NURTURE_PUBLIC_URL": "https://nurture.acme.example",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    reset_runtime()
    yield env
    reset_runtime()
