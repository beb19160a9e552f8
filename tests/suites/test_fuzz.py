"""Bad input, fuzzed: import files, the webhook and the events API, the playbook.

Whatever comes in, a user meets no traceback; each rejection says what was wrong and where
(the file and line of a row, the index of an item, the file, line and key of a playbook);
and what was good is kept, exactly. Each property drives the entry point a user meets:
``import_file`` (what ``nurture import`` calls) on SQLite and PostgreSQL, the API over
HTTP with real signatures, ``load_playbook`` (what ``nurture validate`` calls); a handful
of cases run the real ``nurture`` command.

The generators know which rows and items they made bad, and how, so every property
compares counts and stored values with what was generated, not with what came back.
Examples per property: the `default` profile (``make test``) or ``HYPOTHESIS_PROFILE=full``
(see docs/reliability.md).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import math
import os
import re
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from sqlalchemy import Engine, func, select
from sqlmodel import col

from db.engine import session_scope
from db.imports import import_file, upsert_leads
from db.models import Event, Lead, Suppression
from nurture.errors import ImportDataError, PlaybookError
from nurture.importing import LeadRecord
from nurture.lifecycle import review_thresholds, target_stage
from nurture.playbook import Playbook, Stage, load_playbook
from nurture.privacy import email_hash
from nurture.rendering import EmailRenderer
from nurture.scoring import ActivityEvent, LeadScoreState, next_review_at, rescore
from nurture.sequences import EnrollmentSnapshot, decide_due_steps
from nurture.validation import validate_files
from tests.api.conftest import TOKEN, sign
from tests.conftest import PLAYBOOK_PATH, T0, TEMPLATES_DIR
from tests.db.world import World

# The suites' fixtures (a database, an API client) live across a property's examples; each
# example writes under its own tag (addresses, ids), so examples cannot see each other's rows.
SHARED = settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
NOW = T0 + timedelta(days=1)


def _tag() -> str:
    """A fresh label for one example's addresses and ids ('g' is not a hex digit: no clash with 'tag')."""
    return "g" + uuid.uuid4().hex[:10]


@dataclass(frozen=True)
class Raw:
    """A JSON number Python's json cannot write: NaN, 1e999, a 30-digit integer."""

    literal: str


def to_json(value: Any) -> str:
    """JSON text, with ``Raw`` numbers written as they are; non-ASCII sometimes left unescaped."""
    if isinstance(value, Raw):
        return value.literal
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(str(k))}:{to_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    # Non-ASCII as it is (lone surrogates cannot be written raw, so they stay escaped).
    return json.dumps(value, ensure_ascii=isinstance(value, str) and re.search("[\ud800-\udfff]", value) is not None)


STORABLE = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")  # what a column can hold
UNSTORABLE_NUMBERS = [Raw("NaN"), Raw("-Infinity"), Raw("1e999"), Raw("9" * 30), Raw("-" + "9" * 25)]


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


def json_values(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    """JSON values every engine stores as they are: finite floats, 64-bit integers, text without NUL."""
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(min_value=-(2**63), max_value=2**63 - 1),
        st.floats(allow_nan=False, allow_infinity=False),
        text,
    )
    return st.recursive(
        scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(text, inner, max_size=3)),
        max_leaves=6,
    )


# ---------------------------------------------------------------------------------------------
# Import files.


@dataclass
class Row:
    """One generated row: its values as written, and, when it is bad, a word its reason must contain."""

    values: dict[str, Any]
    bad: str | None = None
    raw_line: str | None = None  # a JSON Lines line written as it is (not JSON, not an object)
    extra_field: bool = False  # a CSV row with one field more than its header


@dataclass
class ImportPlan:
    kind: str  # "leads" or "events"
    fmt: str  # "csv" or "jsonl"
    encoding: str
    rows: list[Row]
    blank_after: set[int] = field(default_factory=set)
    batch_size: int = 2000


ENCODINGS = ["utf-8", "utf-8-sig", "utf-16", "utf-16-be-bom", "utf-32", "latin-1"]
LOCALS = ["ann", "bob", "cara", "dan.o", "eve+news", "zoë", "jörg", "ǆemal", "ſam"]  # ǆ, ſ change under .lower()
PROFILE_TEXT = ["first_name", "last_name", "company", "job_title", "country"]
ZONES = ["Europe/Berlin", "America/New_York", "UTC", "Asia/Kolkata", "America/Argentina/Buenos_Aires", "Etc/GMT+5"]
ATTRIBUTES = ["industry", "plan", "source"]
BAD_EMAILS = [
    "",
    "no-at-sign",
    "two@@x.example",
    "a b@x.example",
    "a:b@x.example",
    "a(b)@x.example",
    "a..b@x.example",
    "<a@x.example>",
    "a\x00b@x.example",
    "x" * 320 + "@x.example",
    "a@x",
]
EVENT_KINDS = [
    "page_view",
    "demo_request",
    "purchase",
    "unsubscribe",
    "bounce",
    "spamreport",
    "webinar_attended",
    "x_9",
]


def _text(ascii_only: bool, max_size: int = 20) -> st.SearchStrategy[str]:
    alphabet = st.characters(codec="ascii", exclude_characters="\x00") if ascii_only else STORABLE
    return st.text(alphabet, max_size=max_size)


@st.composite
def email_cell(draw: st.DrawFn, ascii_only: bool) -> str:
    """A good address under the example's tag, cased and padded as people type them."""
    locals_ = [name for name in LOCALS if name.isascii()] if ascii_only else LOCALS
    local = draw(st.sampled_from(locals_))
    written = draw(st.sampled_from([str, str.upper, str.title]))(f"{local}@TAG.example")
    return draw(st.sampled_from(["", " ", "\t"])) + written + draw(st.sampled_from(["", " "]))


@st.composite
def lead_row(draw: st.DrawFn, fmt: str, ascii_only: bool) -> Row:
    values: dict[str, Any] = {"email": draw(email_cell(ascii_only))}
    for column in draw(st.lists(st.sampled_from(PROFILE_TEXT), unique=True, max_size=5)):
        values[column] = draw(_text(ascii_only))
    if draw(st.booleans()):
        size = draw(st.integers(min_value=0, max_value=2**31 - 1))
        values["company_size"] = (
            size
            if fmt == "jsonl" and draw(st.booleans())
            else draw(st.sampled_from([str(size), f"{size:,}", f" {size} "]))
        )
    if draw(st.booleans()):
        values["timezone"] = draw(st.sampled_from(ZONES))
    for attribute in draw(st.lists(st.sampled_from(ATTRIBUTES), unique=True, max_size=3)):
        values[attribute] = draw(json_values(_text(ascii_only, 8)) if fmt == "jsonl" else _text(ascii_only))
    defect = draw(st.sampled_from(lead_defects(fmt, ascii_only)) | st.none() | st.none())
    if defect is None:
        return Row(values)
    return defect(draw, values)


def _set(column: str, value: Any, word: str) -> Any:
    def apply(draw: st.DrawFn, values: dict[str, Any]) -> Row:
        return Row({**values, column: value}, bad=word)

    return apply


def _bad_email(draw: st.DrawFn, values: dict[str, Any]) -> Row:
    # A CSV row with nothing in it but blanks is a blank line, skipped without a word: keep one value.
    return Row({**values, "email": draw(st.sampled_from(BAD_EMAILS)), "country": "DE"}, bad="email")


def _not_utf8(draw: st.DrawFn, values: dict[str, Any]) -> Row:
    # One non-ASCII letter between ASCII ones: in Latin-1 it can never be valid UTF-8.
    return Row({**values, "company": "Zo" + draw(st.sampled_from("ëéüñß")) + "e"}, bad="not UTF-8")


def _unclosed_last(rows: list[Row]) -> list[Row]:
    """At most one unclosed quote, on the last line: what it takes in after it depends on where the next
    quote is, and whether those rows are given back on what they hold (tests/core/test_importing.py)."""
    unclosed = [row for row in rows if row.bad == "never closed"]
    return [row for row in rows if row.bad != "never closed"] + unclosed[:1]


def _unclosed_quote(draw: st.DrawFn, values: dict[str, Any]) -> Row:
    # A quote opened and never closed: it used to take in every row after it, up to the next quote.
    opened = draw(st.sampled_from(['"Ann', '"Ann, Jr.', '"']))
    return Row(values, bad="never closed", raw_line=f"open@TAG.example,{opened}")


def lead_defects(fmt: str, ascii_only: bool) -> list[Any]:
    defects: list[Any] = [
        _bad_email,
        _set("first_name", "F" * 201, "first_name is 201 characters long"),
        _set("company", "Ac\x00me", "company contains a NUL"),
        _set("company_size", "lots", "company_size"),
        _set("company_size", "-5", "company_size"),
        _set("company_size", "3000000000", "company_size"),
        _set("company_size", "9" * 5000, "company_size"),
        _set("timezone", "Mars/Olympus", "timezone"),
        _set("timezone", "Europe", "timezone"),
        _set("timezone", "Z" * 300, "timezone"),
        _set("source", "\ud800", "unpaired surrogate") if fmt == "jsonl" else _set("company", "C" * 301, "at most 300"),
    ]
    if fmt == "csv":
        defects += [
            _set("job_title", "y" * 140_000, "job_title is 140000 characters long"),  # past csv's default limit
            lambda draw, values: Row(values, bad="fields, the header has", extra_field=True),
            _unclosed_quote,
        ]
    else:
        defects += [
            _set("source", Raw("NaN"), "attributes.source: the number 'NaN'"),
            _set("plan", {"n": Raw("9" * 30)}, "attributes.plan.n: the number"),
            _set("industry", nested(20), "nested too deeply"),
            _set("first_name", {"a": 1}, "first_name must be text"),
            lambda draw, values: Row(values, bad="not valid JSON", raw_line='{"email": "a@x.example", '),
            lambda draw, values: Row(values, bad="must be a JSON object", raw_line="[1, 2]"),
            lambda draw, values: Row(values, bad="levels deep", raw_line="[" * 40 + "]" * 40),
        ]
    if ascii_only:
        defects.append(_not_utf8)
    return defects


@st.composite
def occurred_at(draw: st.DrawFn) -> tuple[str, datetime]:
    """A time in the accepted years as people write it (Z, an offset, no zone), and its UTC value."""
    moment = draw(
        st.datetimes(min_value=datetime(1970, 1, 2), max_value=datetime(2099, 12, 30), timezones=st.just(UTC))
    )
    if draw(st.booleans()):
        moment = moment.replace(microsecond=0)
    form = draw(st.sampled_from(["Z", "offset", "naive", "space"]))
    if form == "Z":
        return moment.isoformat().replace("+00:00", "Z"), moment
    if form == "offset":
        minutes = draw(st.integers(min_value=-12 * 60, max_value=14 * 60))
        return moment.astimezone(timezone(timedelta(minutes=minutes))).isoformat(), moment
    if form == "naive":  # read as UTC, as the README says
        return moment.replace(tzinfo=None).isoformat(), moment
    return moment.replace(tzinfo=None).isoformat(sep=" "), moment


@st.composite
def event_row(draw: st.DrawFn, fmt: str, ascii_only: bool, ids: list[str]) -> Row:
    written, moment = draw(occurred_at())
    values: dict[str, Any] = {
        "email": draw(email_cell(ascii_only)),
        "kind": draw(st.sampled_from(EVENT_KINDS)),
        "occurred_at": written,
        "_utc": moment,
    }
    if draw(st.booleans()):
        properties = draw(st.dictionaries(_text(ascii_only, 8), json_values(_text(ascii_only, 8)), max_size=3))
        values["properties"] = properties if fmt == "jsonl" and draw(st.booleans()) else to_json(properties)
    if draw(st.booleans()):
        values["external_id"] = draw(st.sampled_from(ids))
    defect = draw(st.sampled_from(event_defects(fmt, ascii_only)) | st.none() | st.none())
    if defect is None:
        return Row(values)
    return defect(draw, values)


def event_defects(fmt: str, ascii_only: bool) -> list[Any]:
    defects: list[Any] = [
        _bad_email,
        _set("kind", "Page View", "kind"),
        _set("kind", "k" * 65, "at most 64"),
        _set("kind", "", "kind"),
        _set("occurred_at", "yesterday", "ISO 8601"),
        _set("occurred_at", "", "occurred_at is empty"),
        _set("occurred_at", "1969-12-31T23:59:59Z", "out of range"),
        _set("occurred_at", "2100-01-01T00:00:00Z", "out of range"),
        _set("occurred_at", "0001-01-01T00:00:00+01:00", "out of range"),
        _set("occurred_at", "9999-12-31T23:59:59-01:00", "out of range"),
        _set("properties", "[1, 2]", "properties must be a JSON object"),
        _set("properties", "{", "properties is not valid JSON"),
        _set("properties", to_json({"n": Raw("NaN")}), "properties.n: the number 'NaN'"),
        _set("properties", to_json({"n": [1, Raw("1e999")]}), "properties.n[1]: the number"),
        _set("properties", to_json({"n": Raw("9" * 30)}), "properties.n: the number"),
        _set("properties", json.dumps({"p": "a\x00b"}), "properties.p: contains a NUL"),
        _set("properties", json.dumps(nested(20)), "nested too deeply"),
        _set("external_id", "e" * 201, "external_id is 201 characters long"),
        _set("external_id", "e\x00", "external_id contains a NUL"),
    ]
    if fmt == "csv":
        defects.append(_set("properties", "y" * 140_000, "properties is not valid JSON"))
        defects.append(_unclosed_quote)
    else:
        defects += [
            _set("external_id", {"a": 1}, "external_id must be text or a whole number"),
            _set("external_id", Raw("9" * 30), "beyond 64 bits"),
            _set("properties", 5, "properties must be a JSON object"),
            _set("properties", {"n": Raw("Infinity")}, "properties.n: the number"),
            lambda draw, values: Row(values, bad="not valid JSON", raw_line='{"email": '),
        ]
    if ascii_only:
        defects.append(_not_utf8)
    return defects


@st.composite
def import_plans(draw: st.DrawFn, kind: str) -> ImportPlan:
    fmt = draw(st.sampled_from(["csv", "jsonl"]))
    encoding = draw(st.sampled_from(ENCODINGS))
    ascii_only = encoding == "latin-1"
    if kind == "leads":
        rows = _unclosed_last(draw(st.lists(lead_row(fmt, ascii_only), max_size=12)))
    else:
        ids = [f"e{i}-TAG" for i in range(4)]
        rows = _unclosed_last(_replayed(draw(st.lists(event_row(fmt, ascii_only, ids), max_size=12))))
        good = [row for row in rows if not row.bad]
        if good and draw(st.booleans()):  # a row exported twice: without an id, known by its content
            rows.append(Row(dict(draw(st.sampled_from(good)).values)))
    blank_after = set(draw(st.lists(st.integers(min_value=0, max_value=max(len(rows) - 1, 0)), max_size=2)))
    batch_size = draw(st.sampled_from([1, 2, 3, 2000]))
    return ImportPlan(kind, fmt, encoding, rows, blank_after, batch_size)


def _tagged(value: Any, tag: str) -> Any:
    return re.sub("tag", tag, value, flags=re.IGNORECASE) if isinstance(value, str) else value


def _written_values(row: Row, tag: str) -> dict[str, Any]:
    return {k: _tagged(v, tag) if k in ("email", "external_id") else v for k, v in row.values.items() if k != "_utc"}


def _encode(text: str, encoding: str) -> bytes:
    if encoding == "utf-16-be-bom":
        return codecs.BOM_UTF16_BE + text.encode("utf-16-be")
    if encoding == "latin-1":
        # Latin-1 writes the characters it has; a row's only non-Latin-1 text is generated ASCII.
        return text.encode("latin-1", errors="strict")
    return text.encode(encoding)


def write_import_file(plan: ImportPlan, directory: Path, tag: str) -> tuple[Path, dict[int, Row]]:
    """Write the plan's rows; returns the file and each row by the line its problem is reported on."""
    by_line: dict[int, Row] = {}
    if plan.fmt == "jsonl":
        lines: list[str] = []
        for index, row in enumerate(plan.rows):
            lines.append(row.raw_line if row.raw_line is not None else to_json(_written_values(row, tag)))
            by_line[len(lines)] = row
            if index in plan.blank_after:
                lines.append("")
        text = "".join(line + "\n" for line in lines)
    else:
        columns = ["email", *sorted({k for row in plan.rows for k in row.values if k not in ("email", "_utc")})]
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow([c.upper() if c == "email" else c for c in columns])  # headers are matched case-blind
        for index, row in enumerate(plan.rows):
            if row.raw_line is not None:  # a line as people break them: written as it is
                by_line[len(io.StringIO(out.getvalue(), newline="").readlines()) + 1] = row
                out.write(_tagged(row.raw_line, tag) + "\r\n")
                continue
            values = _written_values(row, tag)
            cells = [str(values.get(column, "")) for column in columns] + (["surplus"] if row.extra_field else [])
            # A row that spans lines (a quoted line break) is reported on the line it starts on.
            by_line[len(io.StringIO(out.getvalue(), newline="").readlines()) + 1] = row
            writer.writerow(cells)
            if index in plan.blank_after:
                writer.writerow([])
        text = out.getvalue()
    path = directory / f"{tag}.{plan.fmt}"
    path.write_bytes(_encode(text, plan.encoding))
    return path, by_line


def _email(row: Row, tag: str) -> str:
    return str(_tagged(row.values["email"], tag)).strip().lower()


def expected_leads(rows: list[Row], tag: str) -> dict[str, dict[str, Any]]:
    """What the good rows make of each lead: later rows win field by field, blanks keep a value."""
    leads: dict[str, dict[str, Any]] = {}
    for row in rows:
        if row.bad:
            continue
        lead = leads.setdefault(_email(row, tag), {"profile": {}, "attributes": {}})
        for column, value in row.values.items():
            if column == "email" or value is None or (isinstance(value, str) and not value.strip()):
                continue
            if column == "company_size":
                lead["profile"][column] = int(str(value).replace(",", "").strip())
            elif column in PROFILE_TEXT or column == "timezone":
                lead["profile"][column] = str(value).strip()
            else:
                lead["attributes"][column] = value
    for lead in leads.values():
        if lead["profile"].get("timezone") == "UTC":  # the default: stored the same as no zone
            del lead["profile"]["timezone"]
    return leads


def _stored_leads(engine: Engine, tag: str) -> dict[str, dict[str, Any]]:
    with session_scope(engine) as session:
        rows = session.scalars(select(Lead).where(col(Lead.email).like(f"%@{tag}.example")))
        return {
            lead.email: {
                "profile": {
                    c: getattr(lead, c)
                    for c in (*PROFILE_TEXT, "company_size", "timezone")
                    if getattr(lead, c) is not None and not (c == "timezone" and lead.timezone == "UTC")
                },
                "attributes": lead.attributes,
            }
            for lead in rows
        }


def _stored_events(engine: Engine, tag: str) -> list[tuple[Any, ...]]:
    with session_scope(engine) as session:
        query = (
            select(Lead.email, Event.kind, Event.occurred_at, Event.external_id, Event.properties)
            .join(Lead, col(Lead.id) == col(Event.lead_id))
            .where(col(Lead.email).like(f"%@{tag}.example"), col(Event.source) == "import")
        )
        # An event imported without an id is stored under a digest of its content.
        return sorted(
            (
                (email, kind, at, None if (external_id or "").startswith("content:") else external_id, properties)
                for email, kind, at, external_id, properties in session.execute(query)
            ),
            key=_event_order,
        )


def _event_order(event: tuple[Any, ...]) -> tuple[Any, ...]:
    email, kind, at, external_id, properties = event
    return (email, kind, at, external_id or "", json.dumps(properties, sort_keys=True))


def _properties(value: Any) -> Any:
    if value is None or (isinstance(value, str) and not value.strip()):
        return {}
    return json.loads(value) if isinstance(value, str) else value


def _count(plan: ImportPlan) -> None:
    """What the examples covered, shown by ``--hypothesis-show-statistics``."""
    event(f"{plan.fmt} in {plan.encoding}")
    bad = sum(1 for row in plan.rows if row.bad)
    if not plan.rows:
        event("no rows")
    elif bad == len(plan.rows):
        event("only bad rows")
    else:
        event("all rows good" if not bad else f"good rows and {'1 bad' if bad == 1 else 'several bad'}")


def check_problems(result: Any, by_line: dict[int, Row]) -> None:
    """Every bad row is reported once, on its own line, with what was wrong; no good row is."""
    reported = {p.line: p.reason for p in result.problems}
    assert len(reported) == len(result.problems), f"a line reported twice: {result.problems}"
    assert sorted(reported) == sorted(line for line, row in by_line.items() if row.bad), result.problems
    for line, reason in reported.items():
        assert by_line[line].bad in reason, f"line {line}: {reason!r} does not say {by_line[line].bad!r}"
        assert 0 < len(reason) < 300, f"line {line}: the reason quotes too much: {reason[:100]}"


@SHARED
@given(plan=import_plans("leads"))
def test_a_lead_import_keeps_every_good_row_and_names_every_bad_one(
    engine: Engine, tmp_path: Path, plan: ImportPlan
) -> None:
    tag = _tag()
    path, by_line = write_import_file(plan, tmp_path, tag)
    _count(plan)
    if _refused_as_empty(plan, engine, path):
        return
    result = import_file(engine=engine, path=path, kind="leads", now=NOW, batch_size=plan.batch_size)
    check_problems(result, by_line)
    expected = expected_leads(plan.rows, tag)
    assert result.rows_read == len(plan.rows)
    assert result.rows_kept == sum(1 for row in plan.rows if not row.bad)
    assert result.created == len(expected)
    # Every good row whose address an earlier good row had is said to repeat it.
    assert result.repeated_addresses == result.rows_kept - len(expected)
    assert _stored_leads(engine, tag) == expected


@SHARED
@given(plan=import_plans("events"))
def test_an_event_import_keeps_every_good_row_and_names_every_bad_one(
    engine: Engine, tmp_path: Path, plan: ImportPlan
) -> None:
    tag = _tag()
    path, by_line = write_import_file(plan, tmp_path, tag)
    _count(plan)
    if _refused_as_empty(plan, engine, path):
        return
    result = import_file(engine=engine, path=path, kind="events", now=NOW, batch_size=plan.batch_size)
    check_problems(result, by_line)
    good = [row for row in plan.rows if not row.bad]
    stored: dict[Any, tuple[Any, ...]] = {}
    for row in good:
        # Without an id, an event is known by what it says: a repeat of it is a duplicate.
        content = (_email(row, tag), row.values["kind"], row.values["_utc"])
        properties = json.dumps(_properties(row.values.get("properties")), sort_keys=True)
        identity = _tagged(row.values.get("external_id"), tag) or (*content, properties)
        event = (
            _email(row, tag),
            row.values["kind"],
            row.values["_utc"],
            identity if isinstance(identity, str) else None,
            _properties(row.values.get("properties")),
        )
        stored.setdefault(identity, event)
    emails = {_email(row, tag) for row in good}
    suppressed = {_email(row, tag) for row in good if row.values["kind"] in ("unsubscribe", "bounce", "spamreport")}
    assert (result.rows_read, result.rows_kept) == (len(plan.rows), len(stored))
    zone_less = [row for row in good if datetime.fromisoformat(row.values["occurred_at"]).tzinfo is None]
    assert result.zone_assumed == len(zone_less), "a time without a zone was read as UTC without a word"
    assert result.duplicates == len(good) - len(stored)
    assert (result.leads_created, result.suppressions_added) == (len(emails), len(suppressed))
    assert _stored_events(engine, tag) == sorted(stored.values(), key=_event_order)
    with session_scope(engine) as session:
        hashes = set(session.scalars(select(col(Suppression.email_hash))))
    assert {email for email in emails if email_hash(email) in hashes} == suppressed


def _refused_as_empty(plan: ImportPlan, engine: Engine, path: Path) -> bool:
    """An empty file (JSON Lines without a line; CSV is written with a header) is refused as such."""
    if plan.fmt == "csv" or plan.rows:
        return False
    with pytest.raises(ImportDataError, match="the file is empty"):
        import_file(engine=engine, path=path, kind=plan.kind, now=NOW, batch_size=plan.batch_size)  # type: ignore[arg-type]
    return True


def _replayed(rows: list[Row]) -> list[Row]:
    """Rows that share an external id are replays: a later one is made a copy of the first good one."""
    first: dict[str, Row] = {}
    out = []
    for row in rows:
        identity = row.values.get("external_id")
        if row.bad or not isinstance(identity, str):
            out.append(row)
            continue
        original = first.setdefault(identity, row)
        out.append(Row(dict(original.values)) if original is not row else row)
    return out


# ---------------------------------------------------------------------------------------------
# The events API (POST /v1/events) and SendGrid's webhook (POST /webhooks/sendgrid), over HTTP.


@dataclass(frozen=True)
class IdNumber:
    """An integer id, made unique to the example when the body is written."""

    offset: int


@dataclass
class Item:
    """One generated item of a batch; ``bad`` is a word its error must contain."""

    value: Any
    bad: str | None = None


def _body_text(value: Any, tag: str, base: int) -> str:
    def place(v: Any) -> Any:
        if isinstance(v, IdNumber):
            return base + v.offset
        if isinstance(v, str):
            return _tagged(v, tag)
        if isinstance(v, dict):
            return {k: place(x) for k, x in v.items()}
        if isinstance(v, list):
            return [place(x) for x in v]
        return v

    return to_json(place(value))


API_IDS = [*(f"web-{i}-TAG" for i in range(3)), *(IdNumber(i) for i in range(2))]
NOT_AN_OBJECT = [5, "event", [1, 2], None, True]


@st.composite
def api_item(draw: st.DrawFn) -> Item:
    item: dict[str, Any] = {"email": draw(email_cell(False)), "kind": draw(st.sampled_from(EVENT_KINDS))}
    if draw(st.booleans()):
        item["occurred_at"] = draw(occurred_at())[0]
    if draw(st.booleans()):
        item["properties"] = draw(st.dictionaries(_text(False, 8), json_values(_text(False, 8)), max_size=3))
    if draw(st.booleans()):
        item["id"] = draw(st.sampled_from(API_IDS))
    if draw(st.booleans()):
        item["extra"] = draw(json_values(_text(False, 8)))  # unknown keys are ignored
    defect = draw(st.sampled_from(API_DEFECTS) | st.none() | st.none())
    if defect is None:
        return Item(item)
    key, value, word = defect
    if key is None:
        return Item(value, word)
    if value is _DELETE:
        item.pop(key, None)
    else:
        item[key] = value
    return Item(item, word)


_DELETE = object()
API_DEFECTS: list[tuple[str | None, Any, str]] = [
    ("email", _DELETE, "email is empty"),
    ("email", None, "email is empty"),
    ("email", 12345, "is not an email address"),
    ("email", ["ann@x.example"], "is not an email address"),
    ("email", "a:b@x.example", "is not an email address"),
    ("email", "b" * 320 + "@x.example", "at most 320"),
    ("email", "a\x00@x.example", "is not an email address"),
    ("kind", _DELETE, "kind"),
    ("kind", 7, "kind '7'"),
    ("kind", "Page View", "kind 'Page View'"),
    ("kind", "k" * 65, "at most 64"),
    ("occurred_at", "soon", "ISO 8601"),
    ("occurred_at", {"at": 1}, "ISO 8601"),
    ("occurred_at", "1969-12-31T23:59:59Z", "out of range"),
    ("occurred_at", "0001-01-01T00:00:00+01:00", "out of range"),
    ("occurred_at", "9999-12-31T23:59:59-01:00", "out of range"),
    ("occurred_at", "2150-01-01T00:00:00Z", "out of range"),
    ("properties", [1, 2], "properties must be a JSON object"),
    ("properties", 3, "properties must be a JSON object"),
    ("properties", "x", "properties is not valid JSON"),
    ("properties", {"n": Raw("NaN")}, "properties.n: the number 'NaN'"),
    ("properties", {"n": [1, Raw("1e999")]}, "properties.n[1]: the number"),
    ("properties", {"n": Raw("9" * 5000)}, "properties.n: the number"),
    ("properties", {"p": "a\x00b"}, "properties.p: contains a NUL"),
    ("properties", {"a\x00": 1}, "contains a NUL"),
    ("properties", {"p": "\ud800"}, "unpaired surrogate"),
    ("properties", nested(20), "nested too deeply"),
    ("id", {"a": 1}, "id must be text or a whole number"),
    ("id", True, "id must be text or a whole number"),
    ("id", Raw("9" * 30), "beyond 64 bits"),
    ("id", "i" * 201, "at most 200"),
    ("id", "i\x00", "id contains a NUL"),
    *((None, value, "each event must be a JSON object") for value in NOT_AN_OBJECT),
]


def _replayed_items(items: list[Item]) -> list[Item]:
    """Good items sharing an id are one event sent twice: a later one is a copy of the first."""
    first: dict[Any, Item] = {}
    out = []
    for item in items:
        identity = item.value.get("id") if not item.bad else None
        if identity is None:
            out.append(item)
            continue
        out.append(Item(dict(first.setdefault(identity, item).value)))
    return out


@st.composite
def api_bodies(draw: st.DrawFn) -> tuple[Any, list[Item]]:
    """A body and its items: usually {"events": [...]}, sometimes one event, sometimes no events at all."""
    items = _replayed_items(draw(st.lists(api_item(), max_size=8)))
    shape = draw(st.sampled_from(["batch", "batch", "batch", "single", "not-an-event", "events-not-a-list"]))
    if shape == "single" and len(items) == 1 and isinstance(items[0].value, dict):
        return items[0].value, items
    if shape == "not-an-event":
        return draw(st.sampled_from([[item.value for item in items], 5, "events", None])), []
    if shape == "events-not-a-list":
        return {"events": draw(st.sampled_from([{"email": "a@x.example"}, 5, "x", None]))}, []
    return {"events": [item.value for item in items]}, items


AUTH = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}


def _stored_api_events(engine: Engine, tag: str) -> int:
    with session_scope(engine) as session:
        query = (
            select(func.count())
            .select_from(Event)
            .join(Lead, col(Lead.id) == col(Event.lead_id))
            .where(col(Lead.email).like(f"%@{tag}.example"), col(Event.source) == "api")
        )
        return int(session.scalar(query) or 0)


@SHARED
@given(body=api_bodies())
def test_the_events_api_answers_every_body_with_what_it_kept_and_what_was_wrong(
    client: TestClient, world: World, body: tuple[Any, list[Item]]
) -> None:
    value, items = body
    tag, base = _tag(), int.from_bytes(os.urandom(6), "big") + 1
    answer = client.post("/v1/events", content=_body_text(value, tag, base).encode(), headers=AUTH)
    event(f"answered {answer.status_code}")
    assert answer.status_code < 500, answer.text
    result = answer.json()
    if not items and not (isinstance(value, dict) and isinstance(value.get("events"), list)):
        assert answer.status_code == 422, answer.text
        assert [e["index"] for e in result["errors"]] == [None]
        return
    bad = {index: item.bad for index, item in enumerate(items) if item.bad}
    good = [item.value for item in items if not item.bad]
    assert [e["index"] for e in result["errors"]] == sorted(bad)
    for error in result["errors"]:
        assert bad[error["index"]] in error["error"], error
        assert len(error["error"]) < 300, error
    assert answer.status_code == (422 if bad and not good else 200), answer.text
    identities = {
        str(_tagged(v.get("id"), tag)) if v.get("id") is not None else f"no id {i}" for i, v in enumerate(good)
    }
    assert (result["accepted"], result["duplicates"]) == (len(identities), len(good) - len(identities))
    assert result["leads_created"] == len({str(_tagged(v["email"], tag)).strip().lower() for v in good})
    assert _stored_api_events(world.engine, tag) == len(identities)


SENDGRID_KINDS = ["open", "click", "processed", "delivered", "deferred", "bounce", "spamreport", "unsubscribe"]
SCORED = {"open", "click", "bounce", "spamreport", "unsubscribe"}
SUPPRESSING = {"bounce", "spamreport", "unsubscribe"}


@st.composite
def sendgrid_event(draw: st.DrawFn, index: int) -> Item:
    event: dict[str, Any] = {
        "email": draw(email_cell(False)),
        "event": draw(st.sampled_from(SENDGRID_KINDS)),
        "timestamp": draw(st.integers(min_value=0, max_value=4_102_444_799)),
        "nurture_fuzz": index,  # events without sg_event_id are told apart by their content
    }
    if draw(st.booleans()):
        event["sg_event_id"] = draw(st.sampled_from([f"sg-{i}-TAG" for i in range(3)]))
    if draw(st.booleans()):
        event["category"] = draw(st.one_of(_text(False, 8), st.lists(_text(False, 8), max_size=2)))
    for key in draw(st.lists(st.sampled_from(["url", "useragent", "ip", "reason", "sg_message_id", "unique_args"]))):
        event[key] = draw(json_values(_text(False, 8)))
    if draw(st.booleans()):
        event["nurture_message_id"] = draw(st.one_of(st.integers(), _text(False, 8), st.just(Raw("9" * 30))))
    kind = draw(st.sampled_from(["good", "good", "good", "unknown", "bad-time", "not-an-object", "bad-address"]))
    if kind == "unknown":
        return Item({**event, "event": draw(st.sampled_from(["", "spam", "Open", None, 5]))}, bad="ignored")
    if kind == "bad-time":
        stamp = draw(st.sampled_from([None, "soon", -1, 4_102_444_800, 10**30, Raw("1e400"), Raw("NaN"), [1]]))
        return Item({**event, "timestamp": stamp}, bad=f"event {index}: ")
    if kind == "not-an-object":
        return Item(draw(st.sampled_from(NOT_AN_OBJECT)), bad=f"event {index}: not an object")
    if kind == "bad-address":  # kept, without effects on any address
        return Item({**event, "email": draw(st.sampled_from(BAD_EMAILS))}, bad="no address")
    return Item(event)


@st.composite
def sendgrid_batches(draw: st.DrawFn) -> list[Item]:
    size = draw(st.integers(min_value=0, max_value=8))
    items = [draw(sendgrid_event(index)) for index in range(size)]
    first: dict[str, Item] = {}
    for position, item in enumerate(items):  # a shared sg_event_id is SendGrid sending an event again
        identity = item.value.get("sg_event_id") if item.bad is None else None
        if identity is not None:
            items[position] = Item(dict(first.setdefault(identity, item).value))
    return items


def _address(event: dict[str, Any], tag: str) -> str:
    return str(_tagged(event["email"], tag)).strip().lower()


@SHARED
@given(items=sendgrid_batches())
def test_the_webhook_keeps_what_it_can_use_and_names_what_it_cannot(
    client: TestClient, world: World, items: list[Item]
) -> None:
    tag = _tag()
    addresses = {_address(item.value, tag) for item in items if item.bad is None}
    with session_scope(world.engine) as session:  # the addresses are known leads, so events are stored
        upsert_leads(session=session, records=[LeadRecord(1, a, {}, {}) for a in addresses], now=NOW)
    raw = _body_text([item.value for item in items], tag, 0).encode()
    answer = client.post("/webhooks/sendgrid", content=raw, headers=sign(raw))
    event(f"answered {answer.status_code}")
    assert answer.status_code < 500, answer.text
    problems = [item.bad for item in items if item.bad and item.bad.startswith("event ")]
    usable = [item for item in items if item.bad in (None, "no address")]
    ignored = sum(1 for item in items if item.bad == "ignored")
    if problems and not usable and not ignored:
        assert answer.status_code == 400, answer.text
        assert all(p.split(":")[0] + ":" in answer.json()["detail"] for p in problems[:5])
        return
    assert answer.status_code == 200, answer.text
    result = answer.json()
    assert [p.split(":")[0] + ": " for p in result["problems"]] == [p.split(":")[0] + ": " for p in problems]
    good = [item.value for item in items if item.bad is None]
    scored = [event for event in good if event["event"] in SCORED]
    identities = {event.get("sg_event_id") or event["nurture_fuzz"] for event in scored}
    suppressed = {_address(e, tag) for e in good if e["event"] in SUPPRESSING}
    assert (result["received"], result["ignored"]) == (len(usable), ignored)
    assert (result["events_stored"], result["duplicates"]) == (len(identities), len(scored) - len(identities))
    assert (result["suppressions_added"], result["messages_updated"]) == (len(suppressed), 0)


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"events": [', "not valid JSON"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 50 + b"]" * 50, "levels deep"),
        (b"", "not valid JSON"),
    ],
)
def test_an_unreadable_body_is_a_400_that_says_why(client: TestClient, body: bytes, detail: str) -> None:
    for path, headers in (("/v1/events", AUTH), ("/webhooks/sendgrid", sign(body))):
        answer = client.post(path, content=body, headers=headers)
        if path == "/webhooks/sendgrid" and body.startswith(b"\xff"):
            assert answer.status_code == 403  # the signature is verified over UTF-8 text, before parsing
            continue
        assert answer.status_code == 400, (path, answer.text)
        assert detail in answer.json()["detail"]


def test_huge_arrays_are_kept_when_they_fit_and_refused_whole_when_they_do_not(
    client: TestClient, world: World, settings: Any
) -> None:
    tag = _tag()
    wide = {"email": f"ann@{tag}.example", "kind": "page_view", "properties": {"seen": list(range(50_000))}}
    answer = client.post("/v1/events", content=json.dumps(wide).encode(), headers=AUTH)
    assert (answer.status_code, answer.json()["accepted"]) == (200, 1), answer.text
    many = json.dumps({"events": [{"email": f"bob@{tag}.example", "kind": "page_view"}] * 2_000}).encode()
    answer = client.post("/v1/events", content=many, headers=AUTH)
    assert (answer.status_code, answer.json()["accepted"]) == (200, 2_000), answer.text
    limit = settings.nurture_max_body_bytes
    too_big = json.dumps({"events": [0] * limit}).encode()
    for path, headers in (("/v1/events", AUTH), ("/webhooks/sendgrid", sign(too_big))):
        answer = client.post(path, content=too_big, headers=headers)
        assert answer.status_code == 413, (path, answer.text)
        assert f"body larger than {limit} bytes" in answer.json()["detail"]
    assert _stored_api_events(world.engine, tag) == 2_001


# ---------------------------------------------------------------------------------------------
# The playbook.

SHIPPED = PLAYBOOK_PATH.read_text()
SHIPPED_DOCUMENT = yaml.safe_load(SHIPPED)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path in a YAML document (list indexes included)."""
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


YAML_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.sampled_from(["3d", "0h", "-1d", "99999999999w", "1.5d", "2026-13-01", "", "welcome", "{{ lead.x }}", "{x}"]),
    st.sampled_from(["3000000d", "999999999d", "3650d", "^(a+)+$", "(a*)*b", "(\\w+\\s?)+$", "(a|a)*", "\\1"]),
    st.sampled_from([float("inf"), float("-inf"), float("nan"), 10**400, -(10**30)]),
    st.sampled_from(["../welcome", "/etc/passwd", "sub/welcome", "Hi {{ lead.first_name }}", "{% if %}", "cold"]),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@st.composite
def structural_edit(draw: st.DrawFn) -> str:
    """The shipped playbook with keys deleted, renamed, retyped or added, written back as YAML."""
    document = json.loads(json.dumps(SHIPPED_DOCUMENT))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = _paths(document)
        if not paths:
            break
        path = draw(st.sampled_from(paths))
        parent = document
        for step in path[:-1]:
            parent = parent[step]
        key = path[-1]
        action = draw(st.sampled_from(["delete", "set", "set", "add", "rename"]))
        if action == "delete":
            del parent[key]
        elif action == "set":
            parent[key] = draw(YAML_VALUES)
        elif action == "add" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = draw(YAML_VALUES)
        elif action == "rename" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=8))] = parent.pop(key)
    return yaml.safe_dump(document, allow_unicode=draw(st.booleans()), sort_keys=False)


@st.composite
def textual_edit(draw: st.DrawFn) -> str:
    """The shipped text with lines duplicated, dropped or cut, or characters typed in."""
    lines = SHIPPED.splitlines(keepends=True)
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        at = draw(st.integers(min_value=0, max_value=len(lines) - 1))
        action = draw(st.sampled_from(["duplicate", "drop", "cut", "type", "indent"]))
        if action == "duplicate":
            lines.insert(at, lines[at])
        elif action == "drop" and len(lines) > 1:
            del lines[at]
        elif action == "cut":
            lines = lines[:at]
            break
        elif action == "type":
            line = lines[at]
            column = draw(st.integers(min_value=0, max_value=len(line)))
            typed = draw(
                st.one_of(
                    st.text(max_size=4), st.sampled_from(["\t", ":", "- ", "&a ", "*a", "[", "{", "!!int ", "\x00"])
                )
            )
            lines[at] = line[:column] + typed + line[column:]
        elif action == "indent":
            lines[at] = " " * draw(st.integers(min_value=1, max_value=3)) + lines[at]
    return "".join(lines)


PROFILE = {"email": "jordan@example.com", "job_title": "CTO", "company_size": 120, "country": "US", "attributes": {}}


def _usable(playbook: Playbook) -> None:
    """What a cycle does with a playbook, without a database: score, review, stage, plan."""
    events = [ActivityEvent(kind, T0 - timedelta(days=d)) for kind in playbook.scoring.events for d in (0, 3, 30)]
    update = rescore(LeadScoreState(), profile=PROFILE, new_events=events, scoring=playbook.scoring, now=NOW)
    assert math.isfinite(update.score)
    next_review_at(
        fit=update.fit,
        engagement=update.engagement,
        now=NOW,
        half_life=playbook.scoring.half_life,
        thresholds=review_thresholds(playbook.stages),
    )
    target_stage(update.score, Stage.cold, playbook.stages, purchased=True)
    walking = [EnrollmentSnapshot(i, 1, name, 1, (), NOW) for i, name in enumerate(playbook.sequences)]
    decide_due_steps(walking, playbook=playbook, now=NOW + timedelta(days=3650))


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(
    text=st.one_of(structural_edit(), textual_edit()),
    encoding=st.sampled_from(["utf-8", "utf-8", "utf-8", "utf-8-sig", "latin-1", "utf-16"]),
)
def test_a_playbook_loads_or_says_where_it_is_wrong(
    renderer: EmailRenderer, tmp_path: Path, text: str, encoding: str
) -> None:
    path = tmp_path / "nurture.yaml"
    path.write_bytes(text.encode(encoding, errors="replace"))
    try:
        playbook = load_playbook(path, templates_dir=TEMPLATES_DIR)
    except PlaybookError as exc:
        problems = exc.problems
        event("refused")
    else:
        event("loaded")
        problems = []
        for problem in renderer.check(playbook):  # what `nurture validate` adds: the templates, rendered
            # a template file, the playbook (a subject, with its line), or a sequence
            assert problem.startswith((str(TEMPLATES_DIR), str(path), "sequence")), problem
        _usable(playbook)
    for problem in problems:
        assert re.match(rf"{re.escape(str(path))}:\d+: ", problem), problem
        assert len(problem) < 600, problem
    for found in validate_files(path, TEMPLATES_DIR).problems:  # `nurture validate`: never a traceback
        assert found.file in (str(path), *(f"{TEMPLATES_DIR}/{name}" for name in os.listdir(TEMPLATES_DIR))), found


# ---------------------------------------------------------------------------------------------
# The real `nurture` command on a few of the files above: messages, exit codes, no traceback.


def _nurture(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "nurture.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "400"},
        timeout=300,
        check=False,
    )
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


@pytest.mark.usefixtures("nurture_env")
def test_nurture_import_reports_each_bad_row_with_its_file_and_line(tmp_path: Path) -> None:
    assert _nurture("db", "upgrade").returncode == 0
    leads = tmp_path / "leads.csv"
    leads.write_bytes(
        "email,first_name,company_size,timezone\n"
        "ann@northwind.example,Ann,12,Europe/Berlin\n"
        "bob@northwind.example,Bob,3000000000,UTC\n"
        "a:b@northwind.example,Eve,1,UTC\n"
        "cara@northwind.example,Cara,1,Europe\n"
        'dan@northwind.example,"Dan\u2028\r\nBcc: x",2,UTC\n'  # a name with line breaks is still a name
        "eve@northwind.example,Eve,3\n".encode("utf-16")
    )
    result = _nurture("import", "leads", str(leads))
    assert result.returncode == 0, result.stderr
    assert f"{leads}:3: company_size '3000000000' is larger than 2,147,483,647" in result.stderr
    assert f"{leads}:4: 'a:b@northwind.example' is not an email address" in result.stderr
    assert f"{leads}:5: timezone 'Europe' is not an IANA time zone" in result.stderr
    assert f"{leads}:8: has 3 fields, the header has 4" in result.stderr
    assert "6 rows read, 2 leads created, 0 updated, 4 bad rows skipped" in result.stdout
    events = tmp_path / "events.jsonl"
    events.write_text('{"email": "ann@northwind.example", "kind": "page_view", "occurred_at": "2150-01-01"}\n[1]\n')
    result = _nurture("import", "events", str(events))
    assert result.returncode == 1  # nothing kept: the command fails, so a script notices
    assert f"{events}:1: occurred_at '2150-01-01' is out of range" in result.stderr
    assert f"{events}:2: each line must be a JSON object" in result.stderr
    headless = tmp_path / "headless.csv"
    headless.write_text("name,company\nAnn,Northwind\n")
    result = _nurture("import", "leads", str(headless))
    assert result.returncode == 1
    assert f"error: {headless}: line 1: the header has no 'email' column" in result.stderr


# A billion laughs: nine levels of nine aliases, 387 million strings if expanded.
ALIAS_BOMB = "".join(f"  b{n}: &l{n} [{', '.join([f'*l{n - 1}' if n else 'lol'] * 9)}]\n" for n in range(9))


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda text: text.replace("  welcome:\n", "  win_back:\n", 1),
            f":{SHIPPED[: SHIPPED.index('  win_back:')].count(chr(10)) + 1}: sequences.win_back: given twice",
        ),
        (lambda text: "brand: " + "[" * 5000 + "]" * 5000, ":1: nested more than 64 levels deep"),
        (lambda text: text.replace("form_submit: 10", "form_submit: .nan"), ":25: scoring.events.form_submit.points"),
        (lambda text: text.replace("half_life: 14d", "half_life: 2026-13-01"), ":20: scoring.half_life: '2026-13-01'"),
        (
            lambda text: text.replace("half_life: 14d", "half_life: 99999999999w"),
            ":20: scoring.half_life: '99999999999w'",
        ),
        (lambda text: text.replace("per: 7d", "per: 999999999d"), ":67: contact_policy.frequency_cap.per"),
        (lambda text: text.replace("purchase: 50", "purchase: .inf"), ":30: scoring.events.purchase.points"),
        (lambda text: text.replace("enter_at: 40", "enter_at: .nan"), ":58: stages.warm.enter_at"),
        (lambda text: text.replace('regex: "@(gmail', 'regex: "^(a+)+$|@(gmail', 1), ":53: scoring.fit.4.regex"),
        (
            lambda text: text.replace("links:\n", "links:\n" + ALIAS_BOMB, 1),
            ":12: links.b1: Input should be a valid string",
        ),
    ],
    ids=[
        "duplicate-key",
        "deep",
        "nan",
        "bad-date",
        "huge-half-life",
        "huge-cap",
        "inf",
        "nan-stage",
        "redos",
        "alias-bomb",
    ],
)
@pytest.mark.usefixtures("nurture_env")
def test_nurture_validate_names_file_line_and_key(tmp_path: Path, edit: Any, expected: str) -> None:
    path = tmp_path / "nurture.yaml"
    path.write_text(edit(SHIPPED))
    os.environ["NURTURE_PLAYBOOK"] = str(path)  # nurture_env restores the environment afterwards
    result = _nurture("validate")
    assert result.returncode == 1
    assert f"{path}{expected}" in result.stderr
