"""`nurture import` as a user meets it: what it says about a file, and a file imported again."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from tests.cli.test_cli import nurture

pytestmark = pytest.mark.usefixtures("nurture_env")


@pytest.fixture(autouse=True)
def _database(nurture_env: dict[str, str]) -> None:
    nurture("db", "upgrade")


def _events(db: Path) -> list[tuple[str, ...]]:
    with closing(sqlite3.connect(db)) as conn:
        rows = conn.execute(
            "SELECT l.email, e.kind, e.occurred_at, e.properties FROM event e JOIN lead l ON l.id = e.lead_id"
        )
        return sorted(rows)


def _event_file(path: Path, rows: int, *, bad_line: int | None = None) -> Path:
    lines = ["email,kind,occurred_at,properties"]
    for n in range(rows):
        company_size = "x" if n + 2 == bad_line else ""
        at = f"2026-10-{1 + n % 28:02d}T{n % 24:02d}:00:00Z"
        lines.append(f"p{n % 700}@f.example,page_view,{at}{'NOT A TIME' if company_size else ''},")
    path.write_text("\n".join(lines) + "\n")
    return path


def test_a_file_that_failed_at_one_line_fixed_and_run_again_stores_each_event_once(
    tmp_path: Path, nurture_env: dict[str, str]
) -> None:
    """A 3,000-line file with a bad line 2,501, then the fixed file: before, 5,000 events were stored."""
    broken = _event_file(tmp_path / "events.csv", 3_000, bad_line=2_501)
    first = nurture("import", "events", str(broken))
    assert "events.csv:2501: occurred_at" in first.stderr
    assert "2999 events stored" in first.stdout
    fixed = _event_file(tmp_path / "events.csv", 3_000)
    again = nurture("import", "events", str(fixed))
    assert "1 events stored, 2999 already stored or repeated" in again.stdout
    db = Path(nurture_env["NURTURE_DATABASE_URL"].removeprefix("sqlite:///"))
    stored = _events(db)
    clean_db = tmp_path / "clean.db"
    env = {"NURTURE_DATABASE_URL": f"sqlite:///{clean_db}"}
    nurture("db", "upgrade", env=env)
    nurture("import", "events", str(fixed), env=env)
    assert len(stored) == 3_000
    assert stored == _events(clean_db)


def test_an_import_says_what_it_merged_and_what_it_assumed(tmp_path: Path) -> None:
    leads = tmp_path / "leads.csv"
    leads.write_text("email,first_name\nann@f.example,Ann\nbob@f.example,Bob\nANN@f.example,Annie\n")
    said = nurture("import", "leads", str(leads))
    assert "1 row(s) repeat an address of an earlier row (first: line 4 repeats line 2)" in said.stderr
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"email": "ann@f.example", "kind": "page_view", "occurred_at": "2026-11-01T09:00:00Z"}\n'
        '{"email": "ann@f.example", "kind": "page_view", "occurred_at": "2026-11-01T10:00:00"}\n'
        '{"email": "ann@f.example", "kind": "page_view", "occurred_at": "2026-11-01T10:00:00"}\n'
    )
    said = nurture("import", "events", str(events))
    assert "2 time(s) have no time zone (first on line 2) and were read as UTC" in said.stderr
    assert "2 events stored, 1 already stored or repeated" in said.stdout


@pytest.mark.parametrize("name", ["empty.csv", "empty.jsonl"])
def test_an_empty_file_is_refused_the_same_way_whatever_its_format(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    path.write_text("\n")
    said = nurture("import", "events", str(path), expect=1)
    assert f"{path}: the file is empty" in said.stderr


def test_an_unclosed_quote_costs_its_row_and_not_the_rows_after_it(tmp_path: Path, nurture_env: dict[str, str]) -> None:
    leads = tmp_path / "leads.csv"
    leads.write_text('email,first_name\nann@f.example,"Ann\nbob@f.example,Bob\ncara@f.example,Cara\n')
    said = nurture("import", "leads", str(leads))
    assert "leads.csv:2: a quote opened on this line is never closed" in said.stderr
    db = Path(nurture_env["NURTURE_DATABASE_URL"].removeprefix("sqlite:///"))
    with closing(sqlite3.connect(db)) as conn:
        assert sorted(conn.execute("SELECT email, first_name FROM lead")) == [
            ("bob@f.example", "Bob"),
            ("cara@f.example", "Cara"),
        ]
