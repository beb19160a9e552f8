"""The file outbox writes real, parseable emails, once per message."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from nurture.transports import FileOutboxTransport, OutgoingEmail
from nurture.transports.base import header_text
from tests.conftest import T0


def _email(**overrides: object) -> OutgoingEmail:
    values: dict[str, object] = {
        "message_id": 7,
        "idempotency_key": "lead-1/welcome/transition-3/step-0",
        "to_email": "ann@northwind.example",
        "from_email": "Acme <hello@acme.example>",
        "subject": "Welcome, Ann",
        "html": "<p>Hi &lt;Ann&gt;</p>",
        "text": "Hi <Ann>",
        "unsubscribe_url": "https://nurture.acme.example/unsubscribe/abc.def",
        "category": "welcome",
        "date": T0,
        "custom_args": {"nurture_message_id": "7"},
    }
    values.update(overrides)
    return OutgoingEmail(**values)  # type: ignore[arg-type]


def test_eml_has_both_parts_and_one_click_unsubscribe(tmp_path: Path) -> None:
    provider_id = FileOutboxTransport(tmp_path).send(_email())
    (path,) = tmp_path.glob("*.eml")
    assert provider_id == f"outbox:{path.name}"
    message = BytesParser(policy=policy.default).parse(path.open("rb"))
    assert message["To"] == "ann@northwind.example"
    assert message["Subject"] == "Welcome, Ann"
    assert message["List-Unsubscribe"] == "<https://nurture.acme.example/unsubscribe/abc.def>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert message.get_content_type() == "multipart/alternative"
    assert message.get_body(("plain",)).get_content().strip() == "Hi <Ann>"
    assert message.get_body(("html",)).get_content().strip() == "<p>Hi &lt;Ann&gt;</p>"


def test_sending_the_same_message_twice_leaves_one_file(tmp_path: Path) -> None:
    transport = FileOutboxTransport(tmp_path / "outbox")
    transport.send(_email())
    transport.send(_email())
    transport.send(_email(message_id=8, idempotency_key="lead-1/welcome/transition-3/step-1"))
    assert len(list((tmp_path / "outbox").glob("*.eml"))) == 2
    assert not list((tmp_path / "outbox").glob(".sending-*"))


_SUBJECT_PIECES = ["=?", "?=", "é", "日本", " ", "\t", "a" * 80, '"', "(", ")", ";", ":", "Ann"]


@given(
    subject=st.lists(st.sampled_from(_SUBJECT_PIECES), min_size=1, max_size=40).map("".join)
    | st.text(st.characters(codec="utf-8"), min_size=1, max_size=300),
    to_email=st.sampled_from(["ann@northwind.example", "jörg@northwind.example"]),
)
@example(subject=")" + "a" * 80 + "=?\u2060" + "a" * 80 + " " + "a" * 80, to_email="ann@northwind.example")
@example(subject=":" + "a" * 80 + "\u2060)" + "a" * 80 + ")\t" + "a" * 80 + " é", to_email="jörg@northwind.example")
def test_the_subject_in_the_file_is_the_subject_rendered(
    tmp_path_factory: pytest.TempPathFactory, subject: str, to_email: str
) -> None:
    """Folded at 78 characters as RFC 2047 words, a subject read back had lost or gained spaces
    (``aaa…) aaa…`` became ``aaa…)aaa…``): the .eml showed a subject that was never rendered."""
    expected = header_text(subject)
    assume(expected)
    directory = tmp_path_factory.mktemp("outbox")
    FileOutboxTransport(directory).send(_email(subject=subject, to_email=to_email))
    (path,) = directory.glob("*.eml")
    message = BytesParser(policy=policy.default).parse(path.open("rb"))
    assert message["Subject"] == expected
    assert all(len(line) <= 998 for line in path.read_bytes().splitlines()), "a line longer than RFC 5322 allows"
