"""`nurture preview`: one email rendered for a real or the sample lead, written as files, sent as a test.

The email is built by the dispatcher's own ``compose_email`` (flows/sending.py): same
context, same unsubscribe link, same headers, so a preview for ``--lead`` is the email
that lead would get. The lead is read, never written.

A test send (``--send-test ADDRESS``) goes through the configured transport, marked as a
test: ``[TEST] `` before the subject, an ``X-Nurture-Test: true`` header, the SendGrid
custom arg ``nurture_test`` (and no message id, so the Event Webhook ignores its opens,
clicks and bounces) and the category ``nurture-test``. It is no lead's message: no message
row, no enrollment change, no frequency-cap slot. Its unsubscribe link unsubscribes no one,
so a click in the test inbox (or the mail client's one-click button) cannot unsubscribe the
lead it was rendered for. The suppression list is not consulted: the address is the
marketer's own inbox.

No Prefect here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path

from sqlalchemy import Engine

from db.dispatch import LeadForEmail, load_lead_for_email
from db.engine import ensure_current_schema, get_engine, session_scope
from flows.sending import Sender, compose_email
from nurture.errors import DeliveryError, NurtureError, UnknownNameError
from nurture.inbound import TEST_SEND_ARG
from nurture.playbook import Playbook, Step, Variant, load_playbook
from nurture.preview import PREVIEW_LINK_PATH, SAMPLE_LINK_PATH, TEST_LINK_PATH, PreviewTarget, resolve, template_files
from nurture.rendering import EmailRenderer, sample_context
from nurture.sequences import assign_variant
from nurture.settings import Settings
from nurture.transports import EmailTransport, FileOutboxTransport, transport_from_settings
from nurture.transports.base import OutgoingEmail
from nurture.transports.outbox import build_mime

TEST_SUBJECT_PREFIX = "[TEST] "
TEST_HEADER = "X-Nurture-Test"
TEST_CATEGORY = "nurture-test"


@dataclass(frozen=True, slots=True)
class Preview:
    """One rendered email and who it was rendered for."""

    target: PreviewTarget
    email: OutgoingEmail
    # "the sample lead" or the lead's address.
    rendered_for: str
    # Why the lead's address is not mailed (unsubscribed, bounced...), or None.
    suppressed: str | None = None


@dataclass(frozen=True, slots=True)
class PreviewFiles:
    directory: Path
    subject: Path
    html: Path
    text: Path
    eml: Path


@dataclass(frozen=True, slots=True)
class Previewer:
    """What a preview needs, from the settings: the playbook, the renderer and the sender."""

    playbook: Playbook
    renderer: EmailRenderer
    sender: Sender
    templates_dir: Path

    def targets(self, name: str, *, lead: LeadForEmail | None) -> list[PreviewTarget]:
        """The emails ``name`` stands for; for a real lead, a split test's variant is the lead's own."""

        def lead_variant(sequence: str, step: Step) -> Variant | None:
            assert lead is not None
            return assign_variant(step, lead_id=lead.lead_id, sequence=sequence)

        variant_for = lead_variant if lead is not None else None
        return resolve(self.playbook, name, templates=template_files(self.templates_dir), variant_for=variant_for)

    def render(self, target: PreviewTarget, *, lead: LeadForEmail | None, now: datetime, test: bool = False) -> Preview:
        """The email ``target`` sends to ``lead`` (None: the sample lead), composed as the dispatcher composes it,
        with an unsubscribe link that unsubscribes no one in place of the lead's.

        ``test``: with the link of a test send. Raises ``TemplateError``.
        """
        public = self.sender.public_url.rstrip("/")
        if lead is None:
            fields = sample_context(self.playbook)["lead"]
            to_email, rendered_for = str(fields["email"]), "the sample lead"
            link = f"{public}/unsubscribe/{SAMPLE_LINK_PATH}"
        else:
            fields, to_email, rendered_for = lead.fields, lead.email, lead.email
            link = f"{public}/unsubscribe/{PREVIEW_LINK_PATH}"
        if test:
            link = f"{public}/unsubscribe/{TEST_LINK_PATH}"
        email = compose_email(
            playbook=self.playbook,
            renderer=self.renderer,
            sender=self.sender,
            lead=fields,
            to_email=to_email,
            unsubscribe_link=link,
            sequence=target.sequence,
            position=target.position,
            template=target.template,
            subject=target.subject,
            message_id=0,
            idempotency_key=f"preview/{target.name}",
            now=now,
            preheader=target.preheader,
        )
        # No message row stands behind a preview: no message id in its headers.
        suppressed = lead.suppressed if lead is not None else None
        return Preview(target, replace(email, custom_args={}), rendered_for, suppressed)


def load_lead(engine: Engine, email: str) -> LeadForEmail:
    """The lead to render for (read only); ``UnknownNameError`` when no lead has the address."""
    ensure_current_schema(engine)
    with session_scope(engine) as session:
        lead = load_lead_for_email(session=session, email=email)
    if lead is None:
        raise UnknownNameError(f"no lead with the email {email}")
    return lead


def write_preview(preview: Preview, directory: Path) -> PreviewFiles:
    """``subject.txt``, ``email.html``, ``email.txt`` and ``email.eml`` (the MIME message a send carries)."""
    email = preview.email
    files = PreviewFiles(
        directory=directory,
        subject=directory / "subject.txt",
        html=directory / "email.html",
        text=directory / "email.txt",
        eml=directory / "email.eml",
    )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        files.subject.write_text(email.subject + "\n", encoding="utf-8")
        files.html.write_text(email.html, encoding="utf-8")
        files.text.write_text(email.text, encoding="utf-8")
        files.eml.write_bytes(bytes(build_mime(email)))
    except OSError as exc:
        raise NurtureError(f"cannot write the preview to {directory}: {exc.strerror}") from exc
    return files


def as_test(email: OutgoingEmail, *, to: str, name: str, now: datetime, lead_id: int | None = None) -> OutgoingEmail:
    """The email marked as a test and addressed to ``to``: subject prefix, header, custom arg, category.

    It carries no message id, so no provider event of it can be counted for a lead. Rendered for a
    real lead, its outbox file is named after the lead (``lead-ID``) as the lead's own emails are,
    so `nurture forget` removes it with them.
    """
    owner = f"lead-{lead_id}/" if lead_id is not None else ""
    return replace(
        email,
        to_email=to,
        subject=TEST_SUBJECT_PREFIX + email.subject,
        headers={**email.headers, TEST_HEADER: "true"},
        custom_args={TEST_SEND_ARG: "true"},
        category=TEST_CATEGORY,
        # A new outbox file for every test send.
        idempotency_key=f"test/{owner}{name}/{now:%Y%m%dT%H%M%S%f}",
        date=now,
    )


def send_test_email(email: OutgoingEmail, transport: EmailTransport) -> str:
    """Hand a test email to the transport once (no retries: the marketer sees the error and tries again);
    returns where it went, in words: the outbox file, or the provider's message id."""
    try:
        provider_id = transport.send(email)
    except DeliveryError as exc:
        raise DeliveryError(f"the test email to {email.to_email} was not sent: {exc}") from exc
    finally:
        close = getattr(transport, "close", None)
        if callable(close):
            close()
    if isinstance(transport, FileOutboxTransport):
        return f"written to {transport.directory / provider_id.removeprefix('outbox:')}"
    return f"accepted as {provider_id}" if provider_id else "accepted"


def default_directory(target: PreviewTarget, *, out: Path | None, many: bool) -> Path:
    """``./preview/NAME/`` by default; under ``--out``, the folder itself, or one folder per variant."""
    if out is None:
        return Path("preview", *target.name.split("/"))
    if many:
        return out / re.sub(r"[^A-Za-z0-9_.-]+", "_", target.variant or target.name)
    return out


@dataclass(frozen=True, slots=True)
class PreviewResult:
    """What `nurture preview` did for one email: the preview, its files, and the test send if any."""

    preview: Preview
    files: PreviewFiles
    # The transport's id of the test email (an outbox file, SendGrid's message id), when one was sent.
    test_sent: str | None = None


def run_preview(
    settings: Settings, name: str, *, lead_email: str | None, out: Path | None, test_to: str | None, now: datetime
) -> list[PreviewResult]:
    """Render ``name`` for the lead with ``lead_email`` (None: the sample lead), write the files, send the tests."""
    playbook = load_playbook(settings.nurture_playbook, templates_dir=settings.nurture_templates)
    previewer = Previewer(
        playbook=playbook,
        renderer=EmailRenderer(settings.nurture_templates),
        sender=Sender.from_settings(settings),
        templates_dir=settings.nurture_templates,
    )
    lead = load_lead(get_engine(settings.database_url), lead_email) if lead_email is not None else None
    targets = previewer.targets(name, lead=lead)
    results = []
    for target in targets:
        shown = previewer.render(target, lead=lead, now=now)
        files = write_preview(shown, default_directory(target, out=out, many=len(targets) > 1))
        sent = None
        if test_to is not None:
            rendered = previewer.render(target, lead=lead, now=now, test=True).email
            lead_id = lead.lead_id if lead is not None else None
            test = as_test(rendered, to=test_to, name=target.name, now=now, lead_id=lead_id)
            sent = send_test_email(test, transport_from_settings(settings))
        results.append(PreviewResult(shown, files, sent))
    return results
