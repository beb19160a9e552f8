"""Hostile content: what a lead's data, a template or a link can try, and what stops it.

- The Jinja2 sandbox escapes published in 2024–2025, in a template file and in a subject:
  each fails the render with nurture's TemplateError and leaks nothing.
- CR, LF and the other line breaks in a lead's name or company (or a subject) cannot add a
  header, in the outbox's `.eml` or in the body the real `sendgrid` client sends.
- HTML in lead fields is escaped in the HTML part and kept as written in the text part.
- Unsubscribe tokens cannot be forged, and one lead's token never unsubscribes another.

Examples per property: the `default` profile (``make test``) or ``HYPOTHESIS_PROFILE=full``
(see docs/reliability.md).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from email import policy
from email.parser import Parser
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, reject, settings
from hypothesis import strategies as st
from markupsafe import escape
from sqlalchemy import Engine, select
from sqlmodel import col

from db.engine import session_scope
from db.imports import import_file
from db.inbound import forget_lead
from db.models import Suppression
from nurture.errors import PermanentDeliveryError, TemplateError
from nurture.importing import normalise_email
from nurture.playbook import Playbook, load_playbook
from nurture.privacy import email_hash
from nurture.rendering import EmailRenderer, sample_context
from nurture.transports import FileOutboxTransport, OutgoingEmail
from nurture.transports.outbox import build_mime
from nurture.transports.sendgrid_v3 import SendGridTransport, request_body
from nurture.unsubscribe import make_unsubscribe_token, read_unsubscribe_token, unsubscribe_url
from tests.api.conftest import NOW
from tests.conftest import PLAYBOOK_PATH, T0, TEMPLATES_DIR
from tests.db.world import SENDER, World
from tests.fakes.fake_sendgrid import FakeSendGrid

CANARY = "canary-5ecret-d0-not-leak"
# Runs on the suites' shared fixtures (one database, one fake) across examples: each example
# uses its own addresses, so what one stores cannot decide another's outcome.
SHARED = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture
def secret_in_environment(monkeypatch: pytest.MonkeyPatch) -> str:
    """A secret where an escape would look first: the process environment."""
    monkeypatch.setenv("NURTURE_SECRET_KEY", CANARY)
    return CANARY


@pytest.fixture
def templates(tmp_path: Path) -> Path:
    """A copy of the shipped templates a test may add hostile ones to."""
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, target)
    return target


def _context(playbook: Playbook, **lead: Any) -> dict[str, Any]:
    context = sample_context(playbook)
    context["lead"] |= lead
    return context


def _with_template(templates: Path, name: str, html: str) -> EmailRenderer:
    (templates / f"{name}.html").write_text(html, encoding="utf-8")
    (templates / f"{name}.txt").write_text("{{ unsubscribe_url }} {{ postal_address }}\n", encoding="utf-8")
    return EmailRenderer(templates)


# ---------------------------------------------------------------------------------------------
# The Jinja2 sandbox escapes of 2024–2025. Each payload reads the process environment (where
# NURTURE_SECRET_KEY lives) through `lipsum`'s module globals. With jinja2 3.1.5 the |attr ones
# print the secret; 3.1.6 (uv.lock) refuses them.

ESCAPES = [
    (
        "CVE-2025-27516: |attr hands out str.format",
        '{{ "{0.__globals__[os].environ[NURTURE_SECRET_KEY]}"|attr("format")(lipsum) }}',
    ),
    (
        "CVE-2025-27516: |attr hands out str.format_map",
        '{{ "{x.__globals__[os].environ[NURTURE_SECRET_KEY]}"|attr("format_map")({"x": lipsum}) }}',
    ),
    (
        "CVE-2025-27516: a stored |attr reference, called later",
        '{% set f = "{0.__globals__[os].environ[NURTURE_SECRET_KEY]}"|attr("format") %}{{ f(lipsum) }}',
    ),
    (
        "CVE-2024-56326: a stored reference to str.format",
        '{% set f = "{0.__globals__[os].environ[NURTURE_SECRET_KEY]}".format %}{{ f(lipsum) }}',
    ),
    (
        "CVE-2024-56326: str.format kept in a namespace, called later",
        '{% set ns = namespace(f="{0.__globals__[os].environ[NURTURE_SECRET_KEY]}".format) %}{{ ns.f(lipsum) }}',
    ),
    ("the classic: a function's globals", "{{ lipsum.__globals__.os.environ.NURTURE_SECRET_KEY }}"),
    ("the classic: object's subclasses", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("the classic: cycler's globals", "{{ cycler.__init__.__globals__.os.environ }}"),
]


@pytest.mark.usefixtures("secret_in_environment")
@pytest.mark.parametrize("payload", [p for _, p in ESCAPES], ids=[name for name, _ in ESCAPES])
def test_a_sandbox_escape_in_a_template_fails_the_render_and_leaks_nothing(
    playbook: Playbook, templates: Path, payload: str
) -> None:
    renderer = _with_template(
        templates, "escape", "{% extends '_layout.html' %}{% block body %}" + payload + "{% endblock %}"
    )
    with pytest.raises(TemplateError) as caught:
        renderer.render(template="escape", subject="Hello", context=_context(playbook))
    message = str(caught.value)
    assert message.startswith("escape.html: ")
    assert "unsafe" in message
    assert CANARY not in message


@pytest.mark.usefixtures("secret_in_environment")
@pytest.mark.parametrize("payload", [p for _, p in ESCAPES], ids=[name for name, _ in ESCAPES])
def test_a_sandbox_escape_in_a_subject_fails_the_render_and_leaks_nothing(
    playbook: Playbook, renderer: EmailRenderer, payload: str
) -> None:
    with pytest.raises(TemplateError) as caught:
        renderer.render(template="welcome", subject=payload, context=_context(playbook))
    assert str(caught.value).startswith("subject of welcome: ")
    assert CANARY not in str(caught.value)


def test_the_sandbox_has_no_filter_or_global_of_its_own(renderer: EmailRenderer) -> None:
    """CVE-2024-56326 needs a filter that calls what it is given; Jinja ships none. A filter, test
    or global added to nurture's environment must be reviewed for that, so this test names them."""
    from jinja2.sandbox import SandboxedEnvironment

    stock = SandboxedEnvironment()
    env = renderer._env
    assert (set(env.filters), set(env.tests), set(env.globals)) == (
        set(stock.filters),
        set(stock.tests),
        set(stock.globals),
    )


XMLATTR_KEYS = [
    "onclick=alert(1) x",  # CVE-2024-22195: a space
    "a/onclick",  # CVE-2024-34064: a slash
    "a><script>alert(1)</script",  # CVE-2024-34064: >
    "a=1 onmouseover",  # CVE-2024-34064: =
    "a\tonclick",
]


@pytest.mark.parametrize("key", XMLATTR_KEYS)
def test_xmlattr_refuses_a_lead_attribute_that_would_inject_an_attribute(
    playbook: Playbook, templates: Path, key: str
) -> None:
    """Lead attributes come from import columns, so their names are the importer's to choose."""
    renderer = _with_template(
        templates,
        "profile",
        "{% extends '_layout.html' %}{% block body %}<p{{ lead.attributes|xmlattr }}>x</p>{% endblock %}",
    )
    with pytest.raises(TemplateError, match=r"profile\.html: .*Invalid character in attribute name"):
        renderer.render(template="profile", subject="Hi", context=_context(playbook, attributes={key: "1"}))
    good = renderer.render(
        template="profile", subject="Hi", context=_context(playbook, attributes={"data-plan": '"><script>'})
    )
    assert '<p data-plan="&#34;&gt;&lt;script&gt;">' in good.html


# CVE-2024-56201: a template *file name* with braces ran code when a template importing a missing
# name was compiled (jinja2 < 3.1.5). The payload sets an environment variable when it runs.
RAN = "NURTURE_TEMPLATE_NAME_RAN"
HOSTILE_NAME = (
    "{__import__(bytes([111,115]).decode()).environ.setdefault("
    + "bytes(["
    + ",".join(str(b) for b in RAN.encode())
    + "]).decode(),bytes([89]).decode())}"
)


@pytest.mark.parametrize("route", ["named by the playbook", "included by a template"])
def test_a_template_file_name_cannot_run_code(playbook: Playbook, templates: Path, route: str) -> None:
    (templates / f"{HOSTILE_NAME}.html").write_text('{% from "_layout.html" import missing %}{{ missing }}')
    (templates / f"{HOSTILE_NAME}.txt").write_text("x")
    renderer = _with_template(templates, "includer", '{% include "' + HOSTILE_NAME + '.html" %}')
    template = HOSTILE_NAME if route == "named by the playbook" else "includer"
    assert RAN not in os.environ
    try:
        with pytest.raises(TemplateError, match="is refused: only letters, digits"):
            renderer.render(template=template, subject="Hi", context=_context(playbook))
        assert RAN not in os.environ
    finally:
        os.environ.pop(RAN, None)


def _nurture(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The real command, as a user runs it (``main`` included, which turns errors into messages)."""
    return subprocess.run(
        [sys.executable, "-m", "nurture.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", **env},
        timeout=300,
        check=False,
    )


def test_nurture_validate_names_the_template_that_tries_an_escape(templates: Path, tmp_path: Path) -> None:
    payload = ESCAPES[0][1]
    (templates / "welcome.html").write_text(
        "{% extends '_layout.html' %}{% block body %}<p>Hi</p>" + payload + "{% endblock %}"
    )
    result = _nurture(
        "validate",
        env={"NURTURE_PLAYBOOK": str(PLAYBOOK_PATH), "NURTURE_TEMPLATES": str(templates), "NURTURE_SECRET_KEY": CANARY},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    assert f"{templates}/welcome.html:1: access to attribute '__globals__'" in output
    assert CANARY not in output


# ---------------------------------------------------------------------------------------------
# Hostile templates: what an outside tester put in the templates folder, as written. Each one
# fails the render (and `nurture validate`) with the file, the line and what it asked for; none
# hangs, none allocates more than the render budget (RenderLimits) lets it.

TESTER_TEMPLATES = [
    (
        "nested loops of range(100000)",
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}",
        r"runs more than 100,000 steps \(each loop iteration, call and include is one\) \(line 1\)$",
    ),
    ("a 300 MB string", "{{ 'a' * 300000000 }}", r"the \* operator would produce 300,000,000 characters"),
    (
        "a 50,000-character string printed over and over",
        "{% set s = 'x' * 50000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
        r"the output is longer than 1,000,000 characters$",
    ),
    (
        "a string doubled with ~ in a loop",
        "{% set ns = namespace(s='x' * 50000) %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        r"the ~ operator would produce 1,600,000 characters \(at most 1,000,000\) \(line 1\)$",
    ),
    (
        "a string doubled in a captured block",
        "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set s %}{{ ns.s }}{{ ns.s }}{% endset %}"
        "{% set ns.s = s %}{% endfor %}",
        r"a captured block or macro would produce 1,048,576 characters",
    ),
    (
        "a macro that calls itself twice, 60 deep",
        "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(60) }}",
        r"runs more than 100,000 steps",
    ),
    (
        "a width of a billion",
        "{{ lead.first_name|center(1000000000) }}",
        r"\|center would produce 1,000,000,000 characters",
    ),
    (
        "a power of ten million",
        "{{ 10 ** 10000000 }}",
        r"the \*\* operator would produce a number of more than 4,300 digits",
    ),
]


@pytest.mark.parametrize(("body", "refusal"), [t[1:] for t in TESTER_TEMPLATES], ids=[t[0] for t in TESTER_TEMPLATES])
def test_a_template_that_would_hang_or_exhaust_the_machine_fails_with_its_line(
    playbook: Playbook, templates: Path, body: str, refusal: str
) -> None:
    renderer = _with_template(
        templates, "greedy", "{% extends '_layout.html' %}{% block body %}" + body + "{% endblock %}"
    )
    with pytest.raises(TemplateError, match=r"^greedy\.html: ") as caught:
        renderer.render(template="greedy", subject="Hello", context=_context(playbook))
    assert re.search(refusal, str(caught.value)), caught.value


def test_nurture_validate_names_a_link_that_leads_out_of_the_templates_folder(templates: Path) -> None:
    """git stores symbolic links: one to the process environment would mail the secrets to every lead."""
    (templates / "env.txt").symlink_to("/proc/self/environ" if Path("/proc/self/environ").exists() else "/etc/hostname")
    (templates / "welcome.html").write_text(
        "{% extends '_layout.html' %}{% block body %}<p>Hi</p>\n{% include 'env.txt' %}{% endblock %}"
    )
    result = _nurture(
        "validate",
        env={"NURTURE_PLAYBOOK": str(PLAYBOOK_PATH), "NURTURE_TEMPLATES": str(templates), "NURTURE_SECRET_KEY": CANARY},
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output
    flat = " ".join(output.split())
    assert f"{templates.resolve() / 'welcome.html'}:2: template 'env.txt' is refused: it leads to /" in flat
    assert f"outside the templates folder {templates.resolve()}; only files inside it can be used" in flat
    assert CANARY not in output


# ---------------------------------------------------------------------------------------------
# Header injection. What a lead's fields can carry into a subject: line breaks of every kind
# mail software knows, and text shaped like headers.

BREAKS = ["\r\n", "\n", "\r", "\u2028", "\u2029", "\x85", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x1f", "\t"]
# RFC 2047 encoded words: Python's email package decodes them as a value is set, CR LF included.
ENCODED_BREAKS = ["=?utf-8?q?x=0D=0ABcc:_victim@evil.example?=", "=?utf-8?b?eA0KQmNjOiB2aWN0aW1AZXZpbC5leGFtcGxl?="]
HEADERISH = [
    "Bcc: victim@evil.example",
    "X-Injected: yes",
    "Subject: spoofed",
    "Content-Type: text/html",
    ": ",
    *ENCODED_BREAKS,
    "=?",
]
STORABLE = st.characters(exclude_categories=("Cs",), exclude_characters="\x00")  # what an import keeps
hostile_fields = st.lists(
    st.one_of(st.sampled_from(BREAKS), st.sampled_from(HEADERISH), st.text(STORABLE, max_size=6)),
    min_size=1,
    max_size=10,
).map("".join)
# The steps whose subjects show a lead's field.
FIELD_SUBJECTS = [
    (name, step)
    for name, sequence in load_playbook(PLAYBOOK_PATH).sequences.items()
    for step in sequence.steps
    if "lead." in step.subject
]


def _outgoing(playbook: Playbook, renderer: EmailRenderer, sequence: str, step: Any, **lead: Any) -> OutgoingEmail:
    """An email as dispatch builds it, for a lead with these fields."""
    link = unsubscribe_url(
        SENDER.public_url, 41, email=lead.get("email", "ann@northwind.example"), now=T0, secret=SENDER.secret_key
    )
    context = _context(playbook, **lead)
    context["unsubscribe_url"] = link
    rendered = renderer.render(template=step.template, subject=step.subject, context=context)
    return OutgoingEmail(
        message_id=7,
        idempotency_key=f"lead-41/{sequence}/transition-1/step-0",
        to_email=lead.get("email", "ann@northwind.example"),
        from_email=SENDER.from_email,
        subject=rendered.subject,
        html=rendered.html,
        text=rendered.text,
        unsubscribe_url=link,
        category=sequence,
        date=T0,
        custom_args={"nurture_message_id": "7"},
    )


def _visible(text: str) -> str:
    """Text as a reader sees it: the email package may move a space next to an encoded word,
    and the invisible WORD JOINER that keeps ``=?`` from being decoded is not seen."""
    return "".join(text.replace("\u2060", "").split())


def _header_block(raw: bytes) -> list[str]:
    """The header lines of a written email, unfolded: one entry per header."""
    head = raw.decode("utf-8").split("\n\n", 1)[0]
    headers: list[str] = []
    for line in head.split("\n"):
        if line[:1] in (" ", "\t") and headers:
            headers[-1] += line
        else:
            headers.append(line)
    return headers


def _header_names(raw: bytes) -> list[str]:
    """The names of the headers of a written email, sorted (a header given twice shows twice)."""
    return sorted(line.split(":", 1)[0] for line in _header_block(raw))


EXPECTED_HEADERS = sorted(
    [
        "From",
        "To",
        "Subject",
        "Date",
        "Message-ID",
        "List-Unsubscribe",
        "List-Unsubscribe-Post",
        "X-Nurture-Message-Id",
        "X-Nurture-Category",
        "Content-Type",
        "MIME-Version",
    ]
)


@pytest.fixture(scope="module")
def fake_sendgrid() -> Iterator[FakeSendGrid]:
    with FakeSendGrid() as fake:
        yield fake


@SHARED
@given(
    target=st.sampled_from(FIELD_SUBJECTS),
    first_name=hostile_fields,
    company=hostile_fields,
)
def test_line_breaks_in_a_lead_field_add_no_header(
    playbook: Playbook, renderer: EmailRenderer, fake_sendgrid: FakeSendGrid, target: Any, first_name: str, company: str
) -> None:
    sequence, step = target
    email = _outgoing(playbook, renderer, sequence, step, first_name=first_name, company=company)
    assert not any(mark in email.subject for mark in BREAKS if mark != "\t")
    # The outbox: exactly the headers of any email, each on its own line.
    raw = bytes(build_mime(email))
    assert _header_names(raw) == EXPECTED_HEADERS
    written = Parser(policy=policy.default).parsestr(raw.decode("utf-8"))
    assert _visible(str(written["Subject"])) == _visible(email.subject)  # what the recipient reads
    # SendGrid: the body the real client sends passes the official schema; no header was added.
    before = len(fake_sendgrid.accepted)
    SendGridTransport(api_key=fake_sendgrid.api_key, host=fake_sendgrid.url).send(email)
    assert fake_sendgrid.schema_errors == []
    body = fake_sendgrid.accepted[before]
    assert _visible(body["subject"]) == _visible(email.subject)
    assert "=?" not in body["subject"]
    assert set(body["headers"]) == {"List-Unsubscribe", "List-Unsubscribe-Post"}
    assert body["personalizations"] == [{"to": [{"email": "ann@northwind.example"}]}]


@pytest.mark.parametrize("field", ["subject", "category", "unsubscribe_url", "from_email"])
@pytest.mark.parametrize("brk", ["\r\n", "\n", "\r", "\u2028", "\x85"])
def test_a_transport_puts_every_header_value_on_one_line(field: str, brk: str) -> None:
    """The renderer collapses a subject's whitespace; the transports do not count on it."""
    values = {
        "subject": "Hi",
        "category": "welcome",
        "unsubscribe_url": "https://nurture.acme.example/unsubscribe/abc.def",
        "from_email": SENDER.from_email,
    }
    values[field] += f"{brk}Bcc: victim@evil.example{brk}X-Injected: yes"
    email = OutgoingEmail(
        message_id=7,
        idempotency_key="lead-41/welcome/transition-1/step-0",
        to_email="ann@northwind.example",
        html="<p>x</p>",
        text="x",
        date=T0,
        custom_args={"nurture_message_id": "7"},
        **values,
    )
    assert _header_names(bytes(build_mime(email))) == EXPECTED_HEADERS
    body = request_body(email)
    assert set(body["headers"]) == {"List-Unsubscribe", "List-Unsubscribe-Post"}
    assert all(brk not in str(value) for value in (body["subject"], body["categories"], body["headers"], body["from"]))


@pytest.mark.parametrize("word", ENCODED_BREAKS)
def test_an_encoded_word_in_a_subject_is_shown_as_typed_and_adds_no_header(word: str) -> None:
    """Python's email package decoded it while setting the Subject, then wrote the CR LF it
    found: the outbox file had a Bcc header."""
    subject = f"Hi {word} there"
    email = OutgoingEmail(
        message_id=7,
        idempotency_key="lead-41/welcome/transition-1/step-0",
        to_email="ann@northwind.example",
        from_email=SENDER.from_email,
        subject=subject,
        html="<p>x</p>",
        text="x",
        unsubscribe_url="https://nurture.acme.example/unsubscribe/abc.def",
        category=f"welcome {word}",
        date=T0,
        custom_args={"nurture_message_id": "7"},
    )
    raw = bytes(build_mime(email))
    assert _header_names(raw) == EXPECTED_HEADERS
    written = Parser(policy=policy.default).parsestr(raw.decode("utf-8"))
    assert str(written["Subject"]).replace("\u2060", "") == subject
    assert "\n" not in str(written["X-Nurture-Category"])
    assert request_body(email)["subject"].replace("\u2060", "") == subject
    assert "=?" not in request_body(email)["subject"]


def test_a_name_with_crlf_from_an_import_file_reaches_the_outbox_as_one_subject_line(
    engine: Engine, playbook: Playbook, tmp_path: Path
) -> None:
    """The whole way: a CSV row, the cycle, the renderer, the outbox file."""
    leads = tmp_path / "leads.csv"
    leads.write_text(
        'email,first_name,company\r\nann@northwind.example,"Ann\r\nBcc: victim@evil.example",'
        '"Northwind\u2028X-Injected: yes"\r\n',
        encoding="utf-8",
    )
    assert import_file(engine=engine, path=leads, kind="leads", now=T0).problems == []
    world = World(engine, playbook, transport=FileOutboxTransport(tmp_path / "outbox"))
    world.events("ann@northwind.example", ("purchase", T0))  # customer: the onboarding welcome, at once
    world.advance(T0 + timedelta(minutes=1))
    assert world.dispatch(T0 + timedelta(minutes=1)).by_status == {"sent": 1}
    (eml,) = (tmp_path / "outbox").glob("*.eml")
    raw = eml.read_bytes()
    assert _header_names(raw) == EXPECTED_HEADERS
    written = Parser(policy=policy.default).parsestr(raw.decode("utf-8"))
    assert written["Subject"] == "Welcome aboard, Ann Bcc: victim@evil.example: your first steps"
    assert written["To"] == "ann@northwind.example"
    assert "X-Injected" not in written


# Addresses nurture accepts: letters of any script, digits and the specials RFC 5322 allows.
ADDRESS_CHARS = st.one_of(
    st.characters(categories=("L", "N")),
    st.sampled_from("!#$%&*+-/=?^_`{|}~."),
)


@SHARED
@given(
    local=st.text(ADDRESS_CHARS, min_size=1, max_size=12),
    domain=st.text(ADDRESS_CHARS, min_size=1, max_size=12),
    tld=st.text(st.characters(categories=("L",)), min_size=1, max_size=6),
)
def test_an_address_nurture_accepts_is_the_one_the_mail_goes_to(
    fake_sendgrid: FakeSendGrid, local: str, domain: str, tld: str
) -> None:
    """Mail libraries read ``a:b@x`` as b@x and ``a(b)@x`` as a@x; an accepted address must not move."""
    try:
        address = normalise_email(f"{local}@{domain}.{tld}")
    except ValueError:
        reject()
    email = OutgoingEmail(
        message_id=7,
        idempotency_key="lead-41/welcome/transition-1/step-0",
        to_email=address,
        from_email=SENDER.from_email,
        subject="Hi",
        html="<p>x</p>",
        text="x",
        unsubscribe_url="https://nurture.acme.example/unsubscribe/abc.def",
        category="welcome",
    )
    written = Parser(policy=policy.default).parsestr(bytes(build_mime(email)).decode("utf-8"))
    assert [a.addr_spec for a in written["To"].addresses] == [address]
    assert request_body(email)["personalizations"] == [{"to": [{"email": address}]}]


def test_an_email_the_mail_libraries_cannot_write_fails_as_permanent_not_as_a_crash() -> None:
    """Such an address can only be in a database from before the import's checks: it fails its
    message instead of stopping the dispatch."""
    email = OutgoingEmail(
        message_id=7,
        idempotency_key="k",
        to_email="a[b@x.example",
        from_email=SENDER.from_email,
        subject="Hi",
        html="x",
        text="x",
        unsubscribe_url="https://nurture.acme.example/unsubscribe/abc.def",
        category="welcome",
    )
    with pytest.raises(PermanentDeliveryError, match="cannot build the SendGrid request"):
        request_body(email)


# ---------------------------------------------------------------------------------------------
# HTML in lead fields.

MARKUP = ["<script>alert(1)</script>", '"><img src=x onerror=alert(1)>', "' onmouseover='x", "&amp;", "</p><p>"]
markup_fields = st.lists(st.one_of(st.sampled_from(MARKUP), st.text(STORABLE, max_size=5)), min_size=1, max_size=6).map(
    "".join
)
# Templates that show both first_name and company.
BOTH_FIELDS = ["onboarding_welcome", "demo_offer", "sales_handoff", "case_study"]


@given(template=st.sampled_from(BOTH_FIELDS), first_name=markup_fields, company=markup_fields)
def test_html_in_a_lead_field_is_escaped_in_html_and_kept_in_text(
    playbook: Playbook, renderer: EmailRenderer, template: str, first_name: str, company: str
) -> None:
    email = renderer.render(
        template=template, subject="Hi", context=_context(playbook, first_name=first_name, company=company)
    )
    for value in (first_name, company):
        assert str(escape(value)) in email.html
        assert value in email.text
    for attack in ("<script", "<img", "' onmouseover"):
        if attack in first_name + company:
            assert attack not in email.html


# ---------------------------------------------------------------------------------------------
# Unsubscribe tokens.


def _suppressed(engine: Engine) -> set[str]:
    with session_scope(engine) as session:
        return set(session.scalars(select(col(Suppression.email_hash))))


ANN, BOB = "ann@northwind.example", "bob@northwind.example"


def _token(lead_id: int, email: str = ANN, secret: str = SENDER.secret_key) -> str:
    return make_unsubscribe_token(lead_id, email=email, now=NOW, secret=secret)


def _read(token: str, email: str = ANN) -> int | None:
    link = read_unsubscribe_token(token, email=email, keys=(SENDER.secret_key,), now=NOW, link_days=400)
    return None if link is None else link.lead_id


def _payload(token: str) -> str:
    """What the MAC covers, as the token carries it: ``2.<lead id>.<day>``."""
    return token.rpartition(".")[0]


def _forgeries(a: int, b: int) -> list[tuple[str, str]]:
    token_a, token_b = _token(a, ANN), _token(b, BOB)
    mac_a = token_a.rpartition(".")[2]
    lead, day = _payload(token_a).split(".")[1:]
    return [
        ("B's id under A's MAC", f"{_payload(token_b)}.{mac_a}"),
        ("A's token with its MAC cut short", token_a[:-3]),
        ("A's token without its MAC", _payload(token_a) + "."),
        ("A's id signed with another secret", _token(a, secret="a guessed secret")),
        ("A's id signed for B's address", _token(a, BOB)),
        ("A's token dated a day later", f"2.{lead}.{int(day) + 1}.{mac_a}"),
        ("A's token as another version", f"3.{lead}.{day}.{mac_a}"),
        ("A's token with a leading zero", f"2.0{lead}.{day}.{mac_a}"),
        ("A's id padded", _payload(token_a) + "==." + mac_a),
        ("A's token twice", f"{token_a}.{mac_a}"),
        ("garbage", "not-a-token"),
        ("5,000 characters", "A" * 5000 + "." + mac_a),
        ("a NUL", _payload(token_a) + "%00." + mac_a),
        ("non-ASCII", "\u00e9." + mac_a),
    ]


def test_a_forged_unsubscribe_token_is_refused_and_suppresses_nobody(client: TestClient, world: World) -> None:
    ann, bob = world.mailed_hot_lead(ANN, at=T0, now=NOW), world.mailed_hot_lead(BOB, at=T0, now=NOW)
    for what, token in _forgeries(ann, bob):
        for method in (client.get, client.post):
            answer = method(f"/unsubscribe/{token}")
            assert answer.status_code == 404, f"{what}: {answer.status_code}"
            assert "not valid" in answer.text, what
    assert _suppressed(world.engine) == set()
    for email in (ANN, BOB):
        assert [m.status for m in world.messages(email)] == ["sent", "queued"]


def test_a_token_unsubscribes_its_own_lead_and_no_other(client: TestClient, world: World) -> None:
    ann, _bob = world.mailed_hot_lead(ANN, at=T0, now=NOW), world.mailed_hot_lead(BOB, at=T0, now=NOW)
    assert client.post(f"/unsubscribe/{_token(ann)}").status_code == 200
    assert _suppressed(world.engine) == {email_hash(ANN)}
    assert [m.status for m in world.messages(ANN)] == ["sent", "cancelled"]
    assert [m.status for m in world.messages(BOB)] == ["sent", "queued"]


@given(
    lead_id=st.integers(min_value=1, max_value=2**63 - 1),
    cut=st.integers(min_value=0, max_value=80),
    insert=st.text(st.characters(codec="ascii"), max_size=3),
    drop=st.integers(min_value=0, max_value=3),
)
def test_any_change_to_a_token_makes_it_invalid(lead_id: int, cut: int, insert: str, drop: int) -> None:
    token = _token(lead_id)
    at = cut % (len(token) + 1)
    changed = token[:at] + insert + token[at + drop :]
    if changed == token:
        reject()
    assert _read(token) == lead_id
    assert _read(changed) is None


def test_a_forgotten_leads_token_does_not_unsubscribe_the_next_lead(client: TestClient, world: World) -> None:
    """SQLite used to give a new row the highest id plus one (no AUTOINCREMENT before migration 0004): once the
    newest lead was forgotten, the next lead got its id, and the forgotten person's old link stopped the new one's."""
    ann = world.mailed_hot_lead(ANN, at=T0, now=NOW)
    old_link = _token(ann)
    with session_scope(world.engine) as session:
        forget_lead(session=session, email=ANN, now=NOW)
    cara = world.mailed_hot_lead("cara@northwind.example", at=T0, now=NOW)
    client.post(f"/unsubscribe/{old_link}")
    assert email_hash("cara@northwind.example") not in _suppressed(world.engine), f"ids {ann} and {cara}"
    assert [m.status for m in world.messages("cara@northwind.example")] == ["sent", "queued"]
