"""Read lead and event files (CSV or JSON Lines) into validated records.

Each bad row becomes a ``RowProblem`` with its line number and reason; good
rows are kept. Parsing is pure: the database side upserts what comes out.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import re
import unicodedata
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from nurture.errors import ImportDataError
from nurture.payloads import Unrepresentable, parse_json, shown, storage_problem, text_problem

LEAD_COLUMNS = ("email", "first_name", "last_name", "company", "job_title", "company_size", "country", "timezone")
EVENT_COLUMNS = ("email", "kind", "occurred_at", "properties", "external_id")

# No spaces, controls (NUL...), unpaired surrogates, or characters that mean something else in a
# mail header outside quotes (a comment, a group, a literal): ``a:b@x.example`` is addressed to
# ``b@x.example`` by every mail library. Non-ASCII letters are fine.
_ADDRESS_CHAR = "[^@\\s\\x00-\\x1f\\x7f\\ud800-\\udfff<>\"',;:()\\[\\]\\\\]"
_EMAIL = re.compile(f"^{_ADDRESS_CHAR}+@{_ADDRESS_CHAR}+\\.{_ADDRESS_CHAR}+$")
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")

# The widths of the columns these values are stored in (db/models.py).
MAX_EMAIL = 320
MAX_KIND = 64
MAX_EXTERNAL_ID = 200
MAX_TIMEZONE = 64
# company_size is an INTEGER column: 32 bits on PostgreSQL.
MAX_COMPANY_SIZE = 2**31 - 1
_WHOLE = re.compile(r"^[+-]?[0-9]+$")
_ZONE = re.compile(r"^[A-Za-z0-9_+-]+(?:/[A-Za-z0-9_+-]+)*$")
PROFILE_WIDTHS = {"first_name": 200, "last_name": 200, "company": 300, "job_title": 300, "country": 100}
# The longest CSV field read (16 MiB); a longer one ends the reading of its file.
MAX_CSV_FIELD = 16 * 1024 * 1024
# Events outside these years are refused: they are mistakes, and the far ends of the calendar
# overflow as soon as a time zone offset or a duration is applied to them.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2100, 1, 1, tzinfo=UTC)


# A DNS label is at most 63 characters; a longer "xn--" label is not decoded.
_MAX_LABEL = 63
# What a decoded punycode label must be to replace its "xn--" form: characters an address may hold.
_UNICODE_LABEL = re.compile(f"^(?:(?!\\.){_ADDRESS_CHAR})+$")


def canonical_address(text: str) -> str:
    """The one spelling nurture keeps of an address, without checking that it is one.

    Trimmed and lower-cased; in Unicode NFC, so ``josé@`` written with an ``e`` and a
    combining accent (as macOS writes it) and with one ``é`` are one person; without the
    one trailing dot a domain may carry (``f.example.`` is the DNS root's spelling of
    ``f.example``); and with each punycode label (``xn--bcher-kva``) in its Unicode form
    (``bücher``), the form stored addresses already have.
    """
    stripped = text.strip()
    if stripped.isascii():  # most addresses: NFC leaves ASCII as it is
        email = stripped.lower()
    else:
        email = unicodedata.normalize("NFC", unicodedata.normalize("NFC", stripped).lower())
    local, at, domain = email.rpartition("@")
    if not at:
        return email
    labels = domain.removesuffix(".").split(".")
    return f"{local}@{'.'.join(_unicode_label(label) for label in labels)}"


def _unicode_label(label: str) -> str:
    """``xn--bcher-kva`` → ``bücher``; any other label unchanged, and so is one that is not the
    exact punycode of a lower-case NFC label an address may hold (so the mapping has one answer
    each way, and an address that was accepted before stays accepted)."""
    if not label.startswith("xn--") or len(label) > _MAX_LABEL or not label.isascii():
        return label
    try:
        decoded = label[4:].encode("ascii").decode("punycode")
    except ValueError:  # UnicodeError: not punycode
        return label
    canonical = unicodedata.normalize("NFC", decoded.lower())
    if decoded.isascii() or decoded != canonical or not _UNICODE_LABEL.match(decoded):
        return label
    if any(unicodedata.category(ch)[0] in "CZ" for ch in decoded):
        return label
    return decoded if decoded.encode("punycode").decode("ascii") == label[4:] else label


def normalise_email(value: object) -> str:
    """The canonical address (:func:`canonical_address`); raises ValueError when it is not an address."""
    given = str(value or "").strip()
    email = canonical_address(given)
    if not email:
        raise ValueError("email is empty")
    if len(email) > MAX_EMAIL:
        raise ValueError(f"email {shown(given)} is {len(email)} characters long; at most {MAX_EMAIL}")
    # "=?" starts an RFC 2047 encoded word, which mail software decodes even in an address:
    # "=?utf-8?q?bob?=@x.example" is delivered to bob@x.example.
    if not _EMAIL.match(email) or not _well_formed(email) or "=?" in email:
        raise ValueError(f"{shown(given)} is not an email address")
    return email


def _well_formed(email: str) -> bool:
    """Dot-separated parts that are not empty, and no invisible, unassigned or private-use characters.

    Mail libraries read ``a..b@x.example`` or ``a.@x.example`` as no address at all, and
    choke on control and unassigned characters when they write the header.
    """
    local, _, domain = email.rpartition("@")
    if "" in local.split(".") or "" in domain.split("."):
        return False
    return email.isascii() or all(ch.isascii() or unicodedata.category(ch)[0] not in "CZ" for ch in email)


def parse_timestamp(value: object) -> datetime:
    """ISO 8601 with a zone (``Z`` or ``+02:00``); a time without a zone is read as UTC."""
    return read_time(value)[0]


def read_time(value: object) -> tuple[datetime, bool]:
    """The time in UTC, and whether it came without a zone (and was read as UTC)."""
    text = str(value or "").strip()
    if not text:
        raise ValueError("occurred_at is empty")
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError as exc:
        raise ValueError(f"occurred_at {shown(text)} is not an ISO 8601 time (e.g. 2026-11-02T14:30:00Z)") from exc
    try:
        moment = parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)
    except OverflowError:
        moment = None
    return checked_time(moment, text), parsed.tzinfo is None


def checked_time(moment: datetime | None, text: str) -> datetime:
    """``moment`` if it lies in the accepted years (1970–2099 UTC); a ValueError naming ``text`` otherwise."""
    if moment is None or not EARLIEST <= moment < LATEST:
        raise ValueError(f"occurred_at {shown(text)} is out of range: times from 1970 to 2099 (UTC) are accepted")
    return moment


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
    # The time had no zone and was read as UTC: the import says so.
    zone_assumed: bool = False


def event_key(record: EventRecord) -> str:
    """The id of an event that came without ``external_id``: a digest of what it says.

    The same event imported twice (a rerun after a crash, overlapping exports) gets the
    same key and is stored once. Two events that are identical in every field are one
    event; a source that means two gives each its own ``external_id``.
    """
    content = json.dumps(
        [record.email, record.kind, record.occurred_at.isoformat(timespec="microseconds"), record.properties],
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    return "content:" + hashlib.sha256(content.encode()).hexdigest()[:48]


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
            profile[column] = company_size(value)
        elif column == "timezone":
            profile[column] = time_zone(value)
        else:
            profile[column] = _text(column, value, PROFILE_WIDTHS[column])
    attributes = {k: v for k, v in row.items() if k not in LEAD_COLUMNS and k and not _blank(v)}
    problem = storage_problem(attributes, "attributes")
    if problem:
        raise ValueError(problem)
    return LeadRecord(line=line, email=email, profile=profile, attributes=attributes)


def company_size(value: Any) -> int:
    """A head count: a whole number from 0 to ``MAX_COMPANY_SIZE`` (``1,200`` is read as 1200)."""
    text = str(value).strip().replace(",", "")
    if not _WHOLE.match(text):
        raise ValueError(f"company_size {shown(value)} is not a whole number")
    digits = text.lstrip("+-").lstrip("0")
    if text.startswith("-") and digits:
        raise ValueError(f"company_size {shown(value)} is negative")
    # Measured before converting: Python refuses to convert numbers of more than 4,300 digits.
    if len(digits) > len(str(MAX_COMPANY_SIZE)) or int(digits or "0") > MAX_COMPANY_SIZE:
        raise ValueError(f"company_size {shown(value)} is larger than {MAX_COMPANY_SIZE:,}")
    return int(digits or "0")


def time_zone(value: Any) -> str:
    """An IANA time zone name, e.g. ``Europe/Berlin``; ValueError naming it otherwise."""
    name = str(value).strip()
    problem = ValueError(f"timezone {shown(value)} is not an IANA time zone (e.g. Europe/Berlin)")
    # Checked before ZoneInfo sees it: ZoneInfo looks names up as files, and answers a
    # folder (``Europe``) or an over-long name with OSError instead of "not found".
    if len(name) > MAX_TIMEZONE or not _ZONE.match(name):
        raise problem
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
        raise problem from exc
    return name


def _text(name: str, value: Any, width: int) -> str:
    if isinstance(value, dict | list):
        raise ValueError(f"{name} must be text, not a JSON {'object' if isinstance(value, dict) else 'array'}")
    text = str(value).strip()
    problem = text_problem(text)
    if problem:
        raise ValueError(f"{name} {problem}")
    if len(text) > width:
        raise ValueError(f"{name} is {len(text)} characters long; at most {width}")
    return text


def external_id(value: Any, name: str = "external_id") -> str | None:
    """An event's id from its source: text or a whole number, at most 200 characters; None when blank."""
    if _blank(value):
        return None
    if isinstance(value, Unrepresentable):
        raise ValueError(f"{name} {shown(value)} is a number beyond 64 bits: send it as text")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{name} must be text or a whole number")
    return _text(name, value, MAX_EXTERNAL_ID)


def event_record(line: int, row: dict[str, Any]) -> EventRecord:
    """Validate one event row; raises ValueError with the reason."""
    email = normalise_email(row.get("email"))
    kind = str(row.get("kind") or "").strip()
    if len(kind) > MAX_KIND:
        raise ValueError(f"kind {shown(kind)} is {len(kind)} characters long; at most {MAX_KIND}")
    if not _KIND.match(kind):
        raise ValueError(f"kind {shown(kind)} must be lower-case letters, digits and _ (e.g. page_view)")
    occurred_at, zone_assumed = read_time(row.get("occurred_at"))
    properties = row.get("properties")
    if _blank(properties):
        properties = {}
    elif isinstance(properties, str):
        properties = parse_json(properties, what="properties")
    if not isinstance(properties, dict):
        raise ValueError("properties must be a JSON object")
    problem = storage_problem(properties, "properties")
    if problem:
        raise ValueError(problem)
    identifier = external_id(row.get("external_id"))
    return EventRecord(line, email, kind, occurred_at, properties, identifier, zone_assumed)


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any] | RowProblem]]:
    """Yield (line number, row) from a ``.csv`` or ``.jsonl`` file; unreadable rows as problems."""
    suffix = path.suffix.lower()
    if suffix not in {".csv", ".jsonl", ".ndjson"}:
        raise ImportDataError(f"{path}: unknown file type {suffix or '(none)'}; use .csv or .jsonl")
    try:
        with path.open("rb") as raw:
            encoding = _encoding(raw.read(4))
        # Undecodable bytes survive as surrogates, so one bad row is reported, not the whole file.
        handle = path.open(encoding=encoding, errors=_UNDECODABLE, newline="")
    except OSError as exc:
        raise ImportDataError(f"{path}: cannot open: {exc.strerror}") from exc
    with handle:
        if suffix == ".csv":
            yield from _csv_rows(path, handle)
        else:
            yield from _jsonl_rows(path, handle)


_SURROGATES = re.compile("[\udc80-\udcff]")
_UNDECODABLE = "nurture-undecodable"


def _mark_undecodable(error: UnicodeError) -> tuple[str, int]:
    """Replace what cannot be decoded by a lone surrogate (as ``surrogateescape`` does for UTF-8)."""
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "\udcff", error.end


codecs.register_error(_UNDECODABLE, _mark_undecodable)


def _encoding(start: bytes) -> str:
    """UTF-8 (with or without a byte order mark), or UTF-16/32 when the file starts with theirs.

    Spreadsheets save "Unicode text" as UTF-16 with a byte order mark; without one, a
    UTF-16 file shows as text full of NULs, and its header is refused as such.
    """
    if start.startswith((codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE)):
        return "utf-32"
    if start.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return "utf-16"
    return "utf-8-sig"


def _undecodable(text: str) -> bool:
    return _SURROGATES.search(text) is not None


class _Lines:
    """A file's physical lines for the csv reader, numbered, with lines that can be given back.

    The reader pulls as many lines as a record needs; when a record turns out to have
    swallowed the lines after it (a quote that never closes), those lines are given back
    and read again as rows of their own.
    """

    def __init__(self, handle: io.TextIOBase) -> None:
        self._handle = handle
        self._given_back: deque[str] = deque()
        self.number = 0
        self.taken: list[str] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self._given_back:
            text = self._given_back.popleft()
        else:
            text = self._handle.readline()
            if not text:
                raise StopIteration
        self.number += 1
        self.taken.append(text)
        return text

    def give_back(self, lines: list[str]) -> None:
        self._given_back.extendleft(reversed(lines))
        self.number -= len(lines)


def _csv_rows(path: Path, handle: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any] | RowProblem]]:
    # The csv module's limit is per process; raised so that an over-long value is read whole and
    # refused with its column and length instead of breaking the record apart.
    csv.field_size_limit(MAX_CSV_FIELD)
    lines = _Lines(handle)
    # strict: a quote that never closes is an error at the end of the file, not a value
    # holding every line after it.
    reader = csv.reader(lines, strict=True)
    try:
        header = next(reader)
        while not any(c.strip() for c in header):  # blank lines before the header
            header = next(reader)
    except StopIteration:
        raise ImportDataError(f"{path}: the file is empty; expected a header row") from None
    except csv.Error as exc:
        raise ImportDataError(f"{path}: line 1: cannot read the header: {exc}") from exc
    columns = [c.strip().lower() for c in header]
    if any(_undecodable(c) for c in columns):
        raise ImportDataError(f"{path}: line 1: the header is not UTF-8 text (save the file as UTF-8)")
    if any("\x00" in c for c in columns):
        raise ImportDataError(
            f"{path}: line 1: the header contains NUL characters: is the file UTF-16 without a byte order mark? "
            "(save the file as UTF-8)"
        )
    if "email" not in columns:
        raise ImportDataError(f"{path}: line 1: the header has no 'email' column (found: {', '.join(columns)})")
    while True:
        lines.taken = []
        try:
            values = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            line = lines.number - len(lines.taken) + 1
            yield line, RowProblem(line, _unreadable(exc, lines.taken))
            lines.give_back(lines.taken[1:])
            continue
        line = lines.number - len(lines.taken) + 1
        if len(lines.taken) > 1 and _swallows_rows(lines.taken[1:], columns):
            yield line, RowProblem(line, _unclosed_quote(lines.taken))
            lines.give_back(lines.taken[1:])
            continue
        if not any(v.strip() for v in values):
            continue
        if any(_undecodable(v) for v in values):
            yield line, RowProblem(line, "not UTF-8 text (save the file as UTF-8)")
            continue
        if len(values) != len(columns):
            yield line, RowProblem(line, f"has {len(values)} fields, the header has {len(columns)}")
            continue
        yield line, dict(zip(columns, values, strict=True))


def _unreadable(exc: csv.Error, taken: list[str]) -> str:
    if len(taken) > 1 or "unexpected end of data" in str(exc):
        return _unclosed_quote(taken)
    return f"cannot read the row: {exc}"


def _unclosed_quote(taken: list[str]) -> str:
    more = len(taken) - 1
    lines = f"{more} line{'s' * (more != 1)}"
    return (
        f"a quote opened on this line is never closed: it took in the next {lines}, which are read as rows of their own"
    )


def _swallows_rows(continuation: list[str], columns: list[str]) -> bool:
    """Whether the lines inside a quoted value look like rows of this file: the value's quote was left open.

    A value may span lines (a note, an address, with commas); one that holds a line with
    an address where the email column is almost certainly took in a row.
    """
    at = columns.index("email")
    for text in continuation:
        fields = next(csv.reader([text]), [])  # not strict: a row of its own may open a quote too
        if len(fields) > at and _EMAIL.match(fields[at].strip().lower()):
            return True
    return False


def _jsonl_rows(path: Path, handle: io.TextIOBase) -> Iterator[tuple[int, dict[str, Any] | RowProblem]]:
    line = 0
    empty = True
    while True:
        text = handle.readline()
        if not text:
            if empty:  # as an empty CSV file is: most likely the wrong file, or an export that failed
                raise ImportDataError(f"{path}: the file is empty; expected one JSON object per line")
            return
        line += 1
        if not text.strip():
            continue
        empty = False
        if _undecodable(text):
            yield line, RowProblem(line, "not UTF-8 text (save the file as UTF-8)")
            continue
        try:
            value = parse_json(text, what="the line")
        except ValueError as exc:
            yield line, RowProblem(line, str(exc).removeprefix("the line is "))
            continue
        if not isinstance(value, dict):
            yield line, RowProblem(line, "each line must be a JSON object")
            continue
        yield line, {str(k).strip().lower(): v for k, v in value.items()}
