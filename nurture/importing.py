"""Read lead and event files (CSV or JSON Lines) into validated records.

Each bad row becomes a ``RowProblem`` with its line number and reason; good
rows are kept. Parsing is pure: the database side upserts what comes out.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nurture.errors import ImportDataError

LEAD_COLUMNS = ("email", "first_name", "last_name", "company", "job_title", "company_size", "country", "timezone")
EVENT_COLUMNS = ("email", "kind", "occurred_at", "properties", "external_id")

_EMAIL = re.compile(r"^[^@\s<>\"',;]+@[^@\s<>\"',;]+\.[^@\s<>\"',;]+$")
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def normalise_email(value: object) -> str:
    """Lower-case, trimmed address; raises ValueError when it is not an address."""
    email = str(value or "").strip().lower()
    if not email:
        raise ValueError("email is empty")
    if len(email) > 320 or not _EMAIL.match(email):
        raise ValueError(f"{email!r} is not an email address")
    return email


def parse_timestamp(value: object) -> datetime:
    """ISO 8601 with a zone (``Z`` or ``+02:00``); a time without a zone is read as UTC."""
    text = str(value or "").strip()
    if not text:
        raise ValueError("occurred_at is empty")
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"occurred_at {text!r} is not an ISO 8601 time (e.g. 2026-11-02T14:30:00Z)") from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass(frozen=True, slots=True)
class RowProblem:
    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class LeadRecord:
    line: int
    email: str
    profile: dict[str, Any]
    attributes: dict[str, Any]


@dataclass(frozen=True, slots=True)
class EventRecord:
    line: int
    email: str
    kind: str
    occurred_at: datetime
    properties: dict[str, Any] = field(default_factory=dict)
    external_id: str | None = None


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def lead_record(line: int, row: dict[str, Any]) -> LeadRecord:
    """Validate one lead row; raises ValueError with the reason."""
    email = normalise_email(row.get("email"))
    profile: dict[str, Any] = {}
    for column in LEAD_COLUMNS[1:]:
        value = row.get(column)
        if _blank(value):
            continue
        if column == "company_size":
            try:
                size = int(str(value).strip().replace(",", ""))
            except ValueError as exc:
                raise ValueError(f"company_size {value!r} is not a whole number") from exc
            if size < 0:
                raise ValueError(f"company_size {value!r} is negative")
            profile[column] = size
        elif column == "timezone":
            try:
                ZoneInfo(str(value).strip())
            except (ZoneInfoNotFoundError, ValueError) as exc:
                raise ValueError(f"timezone {value!r} is not an IANA time zone (e.g. Europe/Berlin)") from exc
            profile[column] = str(value).strip()
        else:
            profile[column] = str(value).strip()
    attributes = {k: v for k, v in row.items() if k not in LEAD_COLUMNS and k and not _blank(v)}
    return LeadRecord(line=line, email=email, profile=profile, attributes=attributes)


def event_record(line: int, row: dict[str, Any]) -> EventRecord:
    """Validate one event row; raises ValueError with the reason."""
    email = normalise_email(row.get("email"))
    kind = str(row.get("kind") or "").strip()
    if not _KIND.match(kind):
        raise ValueError(f"kind {kind!r} must be lower-case letters, digits and _ (e.g. page_view)")
    occurred_at = parse_timestamp(row.get("occurred_at"))
    properties = row.get("properties")
    if _blank(properties):
        properties = {}
    elif isinstance(properties, str):
        try:
            properties = json.loads(properties)
        except json.JSONDecodeError as exc:
            raise ValueError(f"properties is not valid JSON: {exc.msg}") from exc
    if not isinstance(properties, dict):
        raise ValueError("properties must be a JSON object")
    external = row.get("external_id")
    external_id = None if _blank(external) else str(external).strip()[:200]
    return EventRecord(line, email, kind, occurred_at, properties, external_id)


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowProblem]]:
    """Yield (line number, row) from a ``.csv`` or ``.jsonl`` file; unreadable rows as problems."""
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".jsonl", ".ndjson"}:
        raise ImportDataError(f"{path}: unknown file type {suffix or '(none)'}; use .csv or .jsonl")
    try:
        # Undecodable bytes survive as surrogates, so one bad row is reported, not the whole file.
        handle = path.open(encoding="utf-8-sig", errors="surrogateescape", newline="")
    except OSError as exc:
        raise ImportDataError(f"{path}: cannot open: {exc.strerror}") from exc
    with handle:
        if suffix == ".csv":
            yield from _csv_rows(path, handle)
        else:
            yield from _jsonl_rows(handle)


_SURROGATES = re.compile("[\udc80-\udcff]")


def _undecodable(text: str) -> bool:
    return _SURROGATES.search(text) is not None


def _csv_rows(path: Path, handle: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any] | RowProblem]]:
    reader = csv.reader(handle)
    try:
        header = next(reader)
    except StopIteration:
        raise ImportDataError(f"{path}: the file is empty; expected a header row") from None
    except csv.Error as exc:
        raise ImportDataError(f"{path}: line 1: cannot read the header: {exc}") from exc
    columns = [c.strip().lower() for c in header]
    if any(_undecodable(c) for c in columns):
        raise ImportDataError(f"{path}: line 1: the header is not UTF-8 text (save the file as UTF-8)")
    if "email" not in columns:
        raise ImportDataError(f"{path}: line 1: the header has no 'email' column (found: {', '.join(columns)})")
    while True:
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield reader.line_num, RowProblem(reader.line_num, f"cannot read the row: {exc}")
            continue
        line = reader.line_num
        if not any(v.strip() for v in values):
            continue
        if any(_undecodable(v) for v in values):
            yield line, RowProblem(line, "not UTF-8 text (save the file as UTF-8)")
            continue
        if len(values) != len(columns):
            yield line, RowProblem(line, f"has {len(values)} fields, the header has {len(columns)}")
            continue
        yield line, dict(zip(columns, values, strict=True))


def _jsonl_rows(handle: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any] | RowProblem]]:
    line = 0
    while True:
        text = handle.readline()
        if not text:
            return
        line += 1
        if not text.strip():
            continue
        if _undecodable(text):
            yield line, RowProblem(line, "not UTF-8 text (save the file as UTF-8)")
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            yield line, RowProblem(line, f"not valid JSON: {exc}")
            continue
        if not isinstance(value, dict):
            yield line, RowProblem(line, "each line must be a JSON object")
            continue
        yield line, {str(k).strip().lower(): v for k, v in value.items()}
