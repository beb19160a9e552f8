"""What a preview name stands for, and what keeps a test send from counting as a lead's email (pure, fast)."""

from __future__ import annotations

from email import policy
from email.parser import BytesParser
from pathlib import Path

import pytest

from nurture.errors import UnknownNameError
from nurture.inbound import TEST_SEND_ARG, parse_sendgrid_batch
from nurture.playbook import Playbook, parse_playbook
from nurture.preview import NO_SEQUENCE, resolve, step_names, template_files
from nurture.transports import FileOutboxTransport, OutgoingEmail
from tests.conftest import PLAYBOOK_PATH, T0, TEMPLATES_DIR

TEMPLATES = template_files(TEMPLATES_DIR)


def test_the_templates_on_disk_are_the_email_pairs_not_the_layout() -> None:
    assert "welcome" in TEMPLATES
    assert "win_back_last" in TEMPLATES
    assert not any(name.startswith("_") for name in TEMPLATES)


def test_a_step_is_found_by_sequence_and_id_with_its_position(playbook: Playbook) -> None:
    [target] = resolve(playbook, "welcome/case_study", templates=TEMPLATES)
    assert (target.template, target.sequence, target.position, target.step_id) == (
        "case_study",
        "welcome",
        2,
        "case_study",
    )
    assert target.subject == "How Northwind cut time-to-insight by 60%"


def test_a_split_test_gives_every_variant_or_the_one_asked_for(playbook: Playbook) -> None:
    targets = resolve(playbook, "welcome/welcome", templates=TEMPLATES)
    assert [t.name for t in targets] == ["welcome/welcome/a", "welcome/welcome/b"]
    [b] = resolve(playbook, "welcome/welcome/b", templates=TEMPLATES)
    assert b.variant == "b"
    assert "your first" in b.subject
    [chosen] = resolve(playbook, "welcome/welcome", templates=TEMPLATES, variant_for=lambda seq, step: step.variants[1])
    assert chosen.variant == "b"


def test_a_template_takes_the_subject_of_the_first_step_sending_it(playbook: Playbook) -> None:
    [welcome] = resolve(playbook, "welcome", templates=TEMPLATES)
    assert welcome.subject_from == "welcome/welcome/a"
    assert welcome.sequence == "welcome"
    [unused] = resolve(playbook, "spare", templates=[*TEMPLATES, "spare"])
    assert (unused.subject, unused.sequence, unused.subject_from) == ("spare", NO_SEQUENCE, None)


def test_a_step_id_with_a_slash_is_read_before_a_variant() -> None:
    text = PLAYBOOK_PATH.read_text().replace(
        "      - after: 2d\n        template: sales_handoff\n",
        "      - id: sales/handoff\n        after: 2d\n        template: sales_handoff\n",
    )
    playbook = parse_playbook(text)
    [target] = resolve(playbook, "demo_offer/sales/handoff", templates=TEMPLATES)
    assert target.step_id == "sales/handoff"
    assert target.template == "sales_handoff"
    assert "demo_offer/sales/handoff" in step_names(playbook)


@pytest.mark.parametrize(
    ("name", "suggested"),
    [
        ("welcom", "welcome"),
        ("demo_offer/sales_handof", "demo_offer/sales_handoff"),
        ("welcome/welcome/c", "welcome/welcome/b or welcome/welcome/a"),
    ],
)
def test_an_unknown_name_suggests_the_closest_and_lists_the_valid_ones(
    playbook: Playbook, name: str, suggested: str
) -> None:
    with pytest.raises(UnknownNameError) as caught:
        resolve(playbook, name, templates=TEMPLATES)
    message = str(caught.value)
    assert f"no template or step named {name!r}; did you mean {suggested}" in message
    assert "onboarding/onboarding_tips" in message
    assert "check_in" in message


def test_provider_events_of_a_test_send_are_ignored() -> None:
    event = {"event": "click", "email": "me@acme.example", "timestamp": 1_772_442_000, "sg_event_id": "e1"}
    assert len(parse_sendgrid_batch([event]).events) == 1
    for marked in ({**event, TEST_SEND_ARG: "true"}, {**event, "unique_args": {TEST_SEND_ARG: "true"}}):
        batch = parse_sendgrid_batch([marked])
        assert (batch.events, batch.ignored) == ([], 1)


def test_a_header_given_also_as_a_custom_arg_is_written_once(tmp_path: Path) -> None:
    email = OutgoingEmail(
        message_id=0,
        idempotency_key="test/welcome",
        to_email="me@acme.example",
        from_email="Acme <hello@acme.example>",
        subject="[TEST] Hi",
        html="<p>Hi</p>",
        text="Hi",
        unsubscribe_url="https://nurture.example/unsubscribe/test-send",
        category="nurture-test",
        date=T0,
        headers={"X-Nurture-Test": "true"},
        custom_args={"nurture_test": "true"},
    )
    FileOutboxTransport(tmp_path).send(email)
    [path] = tmp_path.glob("*.eml")
    message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    assert message.get_all("X-Nurture-Test") == ["true"]
