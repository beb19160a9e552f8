"""Reading import files: every bad row is reported with its line, every good row is kept."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from nurture.errors import ImportDataError
from nurture.importing import RowProblem, event_record, lead_record, normalise_email, parse_timestamp, read_rows


def test_emails_are_normalised_and_checked() -> None:
    assert normalise_email("  Jane.Doe@Example.COM ") == "jane.doe@example.com"
    for bad in ("", "jane", "jane@", "a b@example.com", "<x@example.com>"):
        with pytest.raises(ValueError, match="email"):
            normalise_email(bad)


def test_timestamps_are_utc() -> None:
    assert parse_timestamp("2026-11-02T14:30:00Z") == datetime(2026, 11, 2, 14, 30, tzinfo=UTC)
    assert parse_timestamp("2026-11-02T15:30:00+01:00") == datetime(2026, 11, 2, 14, 30, tzinfo=UTC)
    assert parse_timestamp("2026-11-02 14:30") == datetime(2026, 11, 2, 14, 30, tzinfo=UTC)
    with pytest.raises(ValueError, match="ISO 8601"):
        parse_timestamp("yesterday")


def test_lead_rows_split_profile_and_attributes() -> None:
    record = lead_record(
        2,
        {
            "email": "A@B.example",
            "first_name": " Ann ",
            "company_size": "1,200",
            "timezone": "Europe/Berlin",
            "industry": "saas",
            "notes": "",
        },
    )
    assert record.email == "a@b.example"
    assert record.profile == {"first_name": "Ann", "company_size": 1200, "timezone": "Europe/Berlin"}
    assert record.attributes == {"industry": "saas"}
    with pytest.raises(ValueError, match="timezone 'Mars/Olympus'"):
        lead_record(3, {"email": "a@b.example", "timezone": "Mars/Olympus"})
    with pytest.raises(ValueError, match="company_size 'big'"):
        lead_record(3, {"email": "a@b.example", "company_size": "big"})


def test_event_rows() -> None:
    record = event_record(
        5,
        {
            "email": "a@b.example",
            "kind": "page_view",
            "occurred_at": "2026-11-02T10:00:00Z",
            "properties": '{"path": "/pricing"}',
            "external_id": "e-1",
        },
    )
    assert (record.kind, record.properties, record.external_id) == ("page_view", {"path": "/pricing"}, "e-1")
    with pytest.raises(ValueError, match="kind 'Page View'"):
        event_record(5, {"email": "a@b.example", "kind": "Page View", "occurred_at": "2026-11-02"})
    with pytest.raises(ValueError, match="properties is not valid JSON"):
        event_record(5, {"email": "a@b.example", "kind": "x", "occurred_at": "2026-11-02", "properties": "{"})
    with pytest.raises(ValueError, match="must be a JSON object"):
        event_record(5, {"email": "a@b.example", "kind": "x", "occurred_at": "2026-11-02", "properties": "[1]"})


def test_csv_rows_carry_their_line_numbers(tmp_path: Path) -> None:
    path = tmp_path / "leads.csv"
    path.write_text('email,first_name\na@b.example,Ann\n\n"c@d.example","multi\nline"\nonly-one-field,x,extra\n')
    rows = list(read_rows(path))
    assert rows[0] == (2, {"email": "a@b.example", "first_name": "Ann"})
    # A record that spans lines is numbered by the line it starts on.
    assert rows[1] == (4, {"email": "c@d.example", "first_name": "multi\nline"})
    assert rows[2] == (6, RowProblem(6, "has 3 fields, the header has 2"))


def test_bytes_that_are_not_utf8_spoil_only_their_row(tmp_path: Path) -> None:
    path = tmp_path / "leads.csv"
    path.write_bytes(b"email,first_name\n\xff\xfe@x.example,A\nok@x.example,B\n")
    assert list(read_rows(path)) == [
        (2, RowProblem(2, "not UTF-8 text (save the file as UTF-8)")),
        (3, {"email": "ok@x.example", "first_name": "B"}),
    ]
    jsonl = tmp_path / "events.jsonl"
    jsonl.write_bytes(b'{"email": "\xff@x.example"}\n{"email": "ok@x.example"}\n')
    assert [row for _, row in read_rows(jsonl)] == [
        RowProblem(1, "not UTF-8 text (save the file as UTF-8)"),
        {"email": "ok@x.example"},
    ]


def test_jsonl_rows(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"email": "a@b.example", "Kind": "page_view"}\nnot json\n[1, 2]\n')
    rows = list(read_rows(path))
    assert rows[0] == (1, {"email": "a@b.example", "kind": "page_view"})
    assert rows[1][1] == RowProblem(2, rows[1][1].reason)
    assert "not valid JSON" in rows[1][1].reason
    assert rows[2] == (3, RowProblem(3, "each line must be a JSON object"))


def test_unusable_files_are_rejected_whole(tmp_path: Path) -> None:
    with pytest.raises(ImportDataError, match=r"unknown file type \.xlsx"):
        list(read_rows(tmp_path / "leads.xlsx"))
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ImportDataError, match="empty"):
        list(read_rows(tmp_path / "empty.csv"))
    (tmp_path / "noemail.csv").write_text("name\nAnn\n")
    with pytest.raises(ImportDataError, match="no 'email' column"):
        list(read_rows(tmp_path / "noemail.csv"))
    with pytest.raises(ImportDataError, match="cannot open"):
        list(read_rows(tmp_path / "missing.csv"))


def test_what_a_database_column_cannot_hold_is_a_row_problem() -> None:
    def event(**fields: str) -> dict[str, str]:
        return {"email": "a@b.example", "kind": "page_view", "occurred_at": "2026-11-02T10:00:00Z", **fields}

    cases = [
        (event(external_id="e" * 201), "external_id is 201 characters long; at most 200"),
        (event(external_id="e\x00"), "external_id contains a NUL character"),
        (event(kind="k" * 65), "at most 64"),
        (event(occurred_at="0001-01-01T00:00:00+01:00"), "out of range"),
        (event(occurred_at="9999-12-31T23:59:59-01:00"), "out of range"),
        (event(occurred_at="1969-12-31T23:59:59Z"), "out of range"),
        (event(properties='{"a": NaN}'), "properties.a: the number 'NaN'"),
        (event(properties="[" * 50 + "]" * 50), "50 levels deep"),
        (event(properties='{"p": "\\u0000"}'), "properties.p: contains a NUL"),
        (event(email="a\x00@b.example"), "is not an email address"),
    ]
    for row, message in cases:
        with pytest.raises(ValueError, match=re.escape(message)):
            event_record(2, row)
    with pytest.raises(ValueError, match="company is 301 characters long; at most 300"):
        lead_record(2, {"email": "a@b.example", "company": "c" * 301})
    with pytest.raises(ValueError, match="first_name contains a NUL"):
        lead_record(2, {"email": "a@b.example", "first_name": "A\x00"})
    with pytest.raises(ValueError, match=r"attributes\.notes: contains an unpaired surrogate"):
        lead_record(2, {"email": "a@b.example", "notes": "\ud800"})
    # The edges of the accepted years are accepted.
    assert event_record(2, event(occurred_at="1970-01-01T00:00:00Z")).occurred_at.year == 1970
    assert event_record(2, event(occurred_at="2099-12-31T23:59:59Z")).occurred_at.year == 2099


def test_a_jsonl_line_nested_too_deeply_spoils_only_its_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"email": "a@b.example", "properties": ' + "[" * 5000 + "]" * 5000 + "}\n" + '{"email": "ok"}\n')
    rows = list(read_rows(path))
    assert rows[0] == (1, RowProblem(1, "the line nests arrays and objects 5001 levels deep; at most 32 are accepted"))
    assert rows[1] == (2, {"email": "ok"})


@pytest.mark.parametrize(
    ("zone", "message"),
    [
        ("Europe", "timezone 'Europe' is not an IANA time zone"),  # a folder of zones: ZoneInfo raised OSError
        ("x" * 300, "is not an IANA time zone"),  # ZoneInfo raised "File name too long"
        ("../../etc/passwd", "is not an IANA time zone"),
    ],
)
def test_a_time_zone_that_names_no_zone_file_is_a_row_problem(zone: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        lead_record(2, {"email": "a@b.example", "timezone": zone})


def test_company_size_must_fit_its_column() -> None:
    """An INTEGER on PostgreSQL: 3,000,000,000 used to reach it and stop the whole import."""
    assert (
        lead_record(2, {"email": "a@b.example", "company_size": "2,147,483,647"}).profile["company_size"] == 2**31 - 1
    )
    for size in ("2147483648", "9" * 5000, "-5", "1_000", "+-5"):
        with pytest.raises(ValueError, match="company_size"):
            lead_record(2, {"email": "a@b.example", "company_size": size})


@pytest.mark.parametrize(
    "address",
    [
        "a:b@x.example",  # a group: mail libraries address it to b@x.example
        "a(b)@x.example",  # a comment: addressed to a@x.example
        "a[b@x.example",
        "a\\b@x.example",
        "a..b@x.example",
        "a.@x.example",
        ".a@x.example",
        "a@x..example",
        "a\x8cb@x.example",  # a C1 control character
        "a\u00adb@x.example",  # a soft hyphen: invisible
        "a\U000c9546@x.example",  # unassigned
        "=?utf-8?q?bob?=@x.example",  # an RFC 2047 encoded word: delivered to bob@x.example
    ],
)
def test_addresses_mail_software_reads_as_another_mailbox_are_refused(address: str) -> None:
    with pytest.raises(ValueError, match="is not an email address"):
        normalise_email(address)


def test_international_addresses_are_kept() -> None:
    assert normalise_email("Jörg.Müller@Bücher.example") == "jörg.müller@bücher.example"


def test_a_utf16_file_with_its_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Spreadsheets save "Unicode text" as UTF-16; it used to be refused as not UTF-8."""
    path = tmp_path / "leads.csv"
    path.write_bytes("email,first_name\nl@x.example,Lé\n".encode("utf-16"))
    assert list(read_rows(path)) == [(2, {"email": "l@x.example", "first_name": "Lé"})]
    path.write_bytes('{"email": "l@x.example"}\n'.encode("utf-32"))
    assert [row for _, row in read_rows(path.rename(tmp_path / "leads.jsonl"))] == [{"email": "l@x.example"}]


def test_a_utf16_file_without_its_byte_order_mark_is_named_as_such(tmp_path: Path) -> None:
    path = tmp_path / "leads.csv"
    path.write_bytes("email,first_name\nl@x.example,L\n".encode("utf-16-le"))
    with pytest.raises(ImportDataError, match="line 1: the header contains NUL characters: is the file UTF-16"):
        list(read_rows(path))


def test_an_over_long_csv_value_is_refused_whole_with_its_column(tmp_path: Path) -> None:
    """Past the csv module's default limit (131,072) the reader gave up mid-record, and the rest
    of the quoted value was read as rows of its own."""
    path = tmp_path / "leads.csv"
    path.write_text('email,first_name\nann@x.example,"' + "y" * 140_000 + '"\ncara@x.example,C\n')
    rows = list(read_rows(path))
    assert [line for line, _ in rows] == [2, 3]
    with pytest.raises(ValueError, match="first_name is 140000 characters long; at most 200"):
        lead_record(2, rows[0][1])  # type: ignore[arg-type]
    assert rows[1] == (3, {"email": "cara@x.example", "first_name": "C"})


def test_past_the_field_limit_the_row_is_refused_and_the_next_lines_are_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("nurture.importing.MAX_CSV_FIELD", 1000)
    path = tmp_path / "leads.csv"
    path.write_text('email,first_name\nann@x.example,Ann\ndan@x.example,"' + "y" * 2000 + '"\nbob@x.example,Bob\n')
    assert list(read_rows(path)) == [
        (2, {"email": "ann@x.example", "first_name": "Ann"}),
        (3, RowProblem(3, "cannot read the row: field larger than field limit (1000)")),
        (4, {"email": "bob@x.example", "first_name": "Bob"}),
    ]


def test_an_unclosed_quote_costs_its_own_row_only(tmp_path: Path) -> None:
    """A quote left open used to run to the end of the file (or to the next quote) and take
    the good rows after it into one value: here Carol and Dan were lost without a word."""
    path = tmp_path / "leads.csv"
    path.write_text(
        'email,first_name\nann@x.example,Ann\nbob@x.example,"Bob\ncara@x.example,Carol\ndan@x.example,Dan\n'
    )
    rows = list(read_rows(path))
    assert rows == [
        (2, {"email": "ann@x.example", "first_name": "Ann"}),
        (
            3,
            RowProblem(
                3,
                "a quote opened on this line is never closed: it took in the next 2 lines, "
                "which are read as rows of their own",
            ),
        ),
        (4, {"email": "cara@x.example", "first_name": "Carol"}),
        (5, {"email": "dan@x.example", "first_name": "Dan"}),
    ]


def test_a_quote_closed_rows_later_does_not_hide_the_rows_between(tmp_path: Path) -> None:
    path = tmp_path / "leads.csv"
    path.write_text(
        'email,first_name\nbob@x.example,"Bob\ncara@x.example,Carol\ndan@x.example,"Dan"\neve@x.example,Eve\n'
    )
    rows = list(read_rows(path))
    assert rows[0][0] == 2
    assert isinstance(rows[0][1], RowProblem)
    assert rows[1] == (3, {"email": "cara@x.example", "first_name": "Carol"})
    assert rows[2] == (4, {"email": "dan@x.example", "first_name": "Dan"})
    assert rows[3] == (5, {"email": "eve@x.example", "first_name": "Eve"})


def test_a_value_that_truly_spans_lines_is_kept(tmp_path: Path) -> None:
    path = tmp_path / "leads.csv"
    path.write_text('email,notes\nann@x.example,"Met at the fair,\nbooth 5, hall 2"\nbob@x.example,\n')
    assert list(read_rows(path)) == [
        (2, {"email": "ann@x.example", "notes": "Met at the fair,\nbooth 5, hall 2"}),
        (4, {"email": "bob@x.example", "notes": ""}),
    ]
