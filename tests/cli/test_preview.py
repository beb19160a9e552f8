"""`nurture preview` as a marketer runs it: real processes, real files, a real database, the real sendgrid client."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from contextlib import closing
from email import policy
from email.message import EmailMessage
from email.parser import BytesParser
from pathlib import Path

import pytest

from tests.cli.runner import run_nurture
from tests.fakes.fake_sendgrid import FakeSendGrid

pytestmark = pytest.mark.usefixtures("nurture_env")

SECRET = "preview-test-secret-key-0123456789"


def nurture(
    *args: str, cwd: Path, env: dict[str, str] | None = None, expect: int = 0
) -> subprocess.CompletedProcess[str]:
    return run_nurture(*args, cwd=cwd, env={"NURTURE_SECRET_KEY": SECRET, **(env or {})}, expect=expect, timeout=120)


def read_eml(path: Path) -> EmailMessage:
    message = BytesParser(policy=policy.default).parsebytes(path.read_bytes())
    assert isinstance(message, EmailMessage)
    return message


def parts(message: EmailMessage) -> dict[str, str]:
    assert message.get_content_type() == "multipart/alternative"
    found = {}
    for part in message.iter_parts():
        assert isinstance(part, EmailMessage)
        found[part.get_content_type()] = part.get_content()
    return found


def database(env: dict[str, str]) -> str:
    return env["NURTURE_DATABASE_URL"].removeprefix("sqlite:///")


def counts(env: dict[str, str]) -> tuple[int, int]:
    with closing(sqlite3.connect(database(env))) as db:
        messages = db.execute("SELECT count(*) FROM message").fetchone()[0]
        enrollments = db.execute("SELECT count(*) FROM enrollment").fetchone()[0]
    return int(messages), int(enrollments)


@pytest.fixture
def with_lead(tmp_path: Path, nurture_env: dict[str, str]) -> dict[str, str]:
    """A database with one lead, Ann of Northwind."""
    nurture("db", "upgrade", cwd=tmp_path)
    leads = tmp_path / "leads.csv"
    leads.write_text(
        "email,first_name,last_name,company,job_title,timezone\n"
        "Ann@Northwind.example,Ann,Smith,Northwind,VP Data,Europe/Berlin\n"
    )
    nurture("import", "leads", str(leads), cwd=tmp_path)
    return nurture_env


def test_a_template_is_written_as_subject_html_text_and_a_mime_message(tmp_path: Path) -> None:
    result = nurture("preview", "case_study", cwd=tmp_path)
    folder = tmp_path / "preview" / "case_study"
    subject = (folder / "subject.txt").read_text().strip()
    # A template takes the subject of the first step that sends it.
    assert subject == "How Northwind cut time-to-insight by 60%"
    assert subject in result.stdout
    assert "the subject of welcome/case_study" in result.stdout
    assert "preview/case_study/" in result.stdout
    eml = read_eml(folder / "email.eml")
    assert eml["Subject"] == subject
    assert eml["To"] == "jordan.lee@example.com"  # the sample lead
    assert eml["From"] == "Acme Analytics <hello@acme-analytics.example>"
    assert eml["List-Unsubscribe"].startswith("<https://nurture.acme.example/unsubscribe/")
    assert eml["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert eml["Message-ID"]
    assert eml["Date"]
    assert eml["X-Nurture-Message-Id"] is None  # no message stands behind a preview
    by_type = parts(eml)
    assert set(by_type) == {"text/plain", "text/html"}
    assert by_type["text/html"] == (folder / "email.html").read_text()
    assert by_type["text/plain"] == (folder / "email.txt").read_text()
    assert "Hi Jordan" in by_type["text/plain"]
    assert "Example Corp" in by_type["text/plain"]
    assert "Acme Analytics Inc., 100 Market Street" in by_type["text/html"]  # the configured postal address


def test_a_split_test_step_previews_each_variant_and_one_variant_by_name(tmp_path: Path) -> None:
    nurture("preview", "welcome/welcome", "--out", "out", cwd=tmp_path)
    subjects = {v: (tmp_path / "out" / v / "subject.txt").read_text().strip() for v in ("a", "b")}
    assert subjects == {
        "a": "Jordan, here is how teams get started with Acme Analytics",
        "b": "Jordan, your first Acme Analytics dashboard takes an afternoon",
    }
    nurture("preview", "welcome/welcome/b", cwd=tmp_path)
    only = tmp_path / "preview" / "welcome" / "welcome" / "b"
    assert (only / "subject.txt").read_text().strip() == subjects["b"]
    assert not (tmp_path / "preview" / "welcome" / "welcome" / "a").exists()


def test_an_unknown_name_gets_a_suggestion_and_the_valid_names(tmp_path: Path) -> None:
    result = nurture("preview", "demo_offer/sales_handof", cwd=tmp_path, expect=1)
    assert "no template or step named 'demo_offer/sales_handof'; did you mean demo_offer/sales_handoff" in result.stderr
    assert "welcome/welcome/a" in result.stderr
    assert "win_back_last" in result.stderr
    assert "did you mean welcome" in nurture("preview", "welcom", cwd=tmp_path, expect=1).stderr
    assert not (tmp_path / "preview").exists()


def test_bad_addresses_and_unknown_leads_are_refused(tmp_path: Path, with_lead: dict[str, str]) -> None:
    result = nurture("preview", "welcome", "--send-test", "me@", cwd=tmp_path, expect=2)
    assert "'me@' is not an email address" in result.stderr
    result = nurture("preview", "welcome", "--lead", "nobody@northwind.example", cwd=tmp_path, expect=1)
    assert "no lead with the email nobody@northwind.example" in result.stderr
    both = nurture("preview", "welcome", "--lead", "ann@northwind.example", "--sample", cwd=tmp_path, expect=2)
    assert "not both" in both.stderr


def test_a_real_lead_gets_its_own_fields_and_variant_and_a_link_that_unsubscribes_no_one(
    tmp_path: Path, with_lead: dict[str, str]
) -> None:
    from nurture.playbook import load_playbook
    from nurture.sequences import assign_variant
    from tests.conftest import PLAYBOOK_PATH

    result = nurture("preview", "demo_offer/sales_handoff", "--lead", "ANN@northwind.example", cwd=tmp_path)
    assert "for ann@northwind.example" in result.stdout
    eml = read_eml(tmp_path / "preview" / "demo_offer" / "sales_handoff" / "email.eml")
    assert eml["To"] == "ann@northwind.example"
    assert eml["Subject"] == "Your Acme Analytics contact for Northwind"
    assert "Hi Ann" in parts(eml)["text/plain"]
    # Not the lead's signed link: a marketer clicking it, or a mail program's one-click button on the
    # .eml, must not unsubscribe the customer.
    assert eml["List-Unsubscribe"] == "<https://nurture.acme.example/unsubscribe/preview>"
    files = parts(eml)["text/html"] + parts(eml)["text/plain"]
    assert "/unsubscribe/2." not in files

    # A split test previews the variant this lead is assigned, and only that one.
    step = load_playbook(PLAYBOOK_PATH).sequences["welcome"].steps[0]
    variant = assign_variant(step, lead_id=1, sequence="welcome")
    assert variant is not None
    result = nurture("preview", "welcome/welcome", "--lead", "ann@northwind.example", cwd=tmp_path)
    assert f"welcome/welcome/{variant.id} for ann@northwind.example" in result.stdout
    assert [p.name for p in (tmp_path / "preview" / "welcome" / "welcome").iterdir()] == [variant.id]
    assert counts(with_lead) == (0, 0)


def test_a_test_send_goes_to_the_outbox_marked_and_is_no_lead_s_message(
    tmp_path: Path, with_lead: dict[str, str]
) -> None:
    outbox = Path(with_lead["NURTURE_OUTBOX_DIR"])
    result = nurture(
        "preview", "win_back", "--lead", "ann@northwind.example", "--send-test", "Me@Acme.example", cwd=tmp_path
    )
    sent = list(outbox.glob("*.eml"))
    assert len(sent) == 1, sent
    assert f"test sent to me@acme.example: written to {sent[0]}" in result.stdout
    eml = read_eml(sent[0])
    assert eml["To"] == "me@acme.example"
    assert eml["Subject"] == "[TEST] What changed since you last looked at Acme Analytics"
    assert eml.get_all("X-Nurture-Test") == ["true"]
    assert eml["X-Nurture-Message-Id"] is None
    # Its unsubscribe link unsubscribes no one: not the lead it was rendered for.
    assert eml["List-Unsubscribe"] == "<https://nurture.acme.example/unsubscribe/test-send>"
    assert "unsubscribe/test-send" in parts(eml)["text/html"]
    assert "Hi Ann" in parts(eml)["text/plain"]
    # Sent twice, two files; still no message, no enrollment.
    nurture("preview", "win_back", "--send-test", "me@acme.example", cwd=tmp_path)
    assert len(list(outbox.glob("*.eml"))) == 2
    assert counts(with_lead) == (0, 0)
    # Erasing the lead erases the test rendered for it (its name is in it), not the sample lead's.
    nurture("forget", "ann@northwind.example", "--yes", cwd=tmp_path)
    assert not sent[0].exists()
    assert len(list(outbox.glob("*.eml"))) == 1


def test_a_test_send_through_sendgrid_is_flagged_without_personal_data(
    tmp_path: Path, with_lead: dict[str, str]
) -> None:
    with FakeSendGrid() as fake:
        env = {
            "NURTURE_TRANSPORT": "sendgrid",
            "SENDGRID_API_KEY": fake.api_key,
            "SENDGRID_API_HOST": fake.url,
        }
        result = nurture(
            "preview",
            "demo_offer/demo_offer",
            "--lead",
            "ann@northwind.example",
            "--send-test",
            "me@acme.example",
            cwd=tmp_path,
            env=env,
        )
    assert fake.schema_errors == []
    assert len(fake.accepted) == 1
    body = fake.accepted[0]
    assert "test sent to me@acme.example: accepted as " in result.stdout
    assert body["personalizations"][0]["to"] == [{"email": "me@acme.example"}]
    assert body["subject"] == "[TEST] See Acme Analytics on your own data"
    assert body["headers"]["X-Nurture-Test"] == "true"
    assert body["custom_args"] == {"nurture_test": "true"}  # a flag; no address, no message id
    assert body["categories"] == ["nurture-test"]
    assert not (Path(with_lead["NURTURE_OUTBOX_DIR"])).exists()
    assert counts(with_lead) == (0, 0)


def test_open_hands_the_html_to_the_browser_and_prefect_is_never_imported(tmp_path: Path) -> None:
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser.sh"
    browser.write_text(f'#!/bin/sh\necho "$1" >> {opened}\n')
    browser.chmod(0o755)
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "nurture.cli", "preview", "check_in", "--open"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "BROWSER": str(browser), "COLUMNS": "200"},
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    html = tmp_path / "preview" / "check_in" / "email.html"
    assert opened.read_text().strip() == html.as_uri()
    imported = {line.rsplit("|", 1)[-1].strip().split(".")[0] for line in result.stderr.splitlines()}
    assert "nurture" in imported
    assert "prefect" not in imported


def test_a_suppressed_lead_is_previewed_with_a_note(tmp_path: Path, with_lead: dict[str, str]) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text(
        '{"email": "ann@northwind.example", "kind": "unsubscribe", "occurred_at": "2026-03-02T09:00:00Z"}\n'
    )
    nurture("import", "events", str(events), cwd=tmp_path)
    result = nurture("preview", "check_in", "--lead", "ann@northwind.example", cwd=tmp_path)
    assert "note: this address is suppressed (unsubscribe): nurture sends it nothing" in result.stdout
    assert "note:" not in nurture("preview", "check_in", cwd=tmp_path).stdout


def test_a_template_that_fails_for_the_lead_is_reported_with_its_file_and_line(
    tmp_path: Path, with_lead: dict[str, str]
) -> None:
    from tests.conftest import TEMPLATES_DIR

    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    (templates / "check_in.txt").write_text(
        '{% extends "_layout.txt" %}\n{% block body %}\nHi {{ lead.nickname }}\n{% endblock %}\n'
    )
    env = {"NURTURE_TEMPLATES": str(templates)}
    result = nurture("preview", "check_in", "--lead", "ann@northwind.example", cwd=tmp_path, env=env, expect=1)
    assert "check_in.txt" in result.stderr
    assert "nickname" in result.stderr
    assert "(line 3)" in result.stderr
