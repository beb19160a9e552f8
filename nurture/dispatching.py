"""What becomes of each claimed message now: sent (with which content), held, suppressed or cancelled.

The dispatcher's planner. A message is a step decided earlier; what it sends is
taken from the playbook as it is now, so an edited step sends its new template
and subject, and a step (or a sequence) removed since is cancelled, never sent.
Then suppression, the send window, quiet hours and the frequency cap
(``nurture.contact``) decide whether it goes out now.

Pure: no clock, no database.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from nurture.contact import DueEmail, decide
from nurture.delivery import ClaimedMessage
from nurture.playbook import Playbook
from nurture.sequences import assign_variant, step_now


class Verdict(StrEnum):
    send = "send"
    wait = "wait"
    suppress = "suppress"
    cancel = "cancel"


@dataclass(frozen=True, slots=True)
class Triage:
    """One message's verdict: for ``send`` the template, subject and preheader to render now (and
    the split test's variant they are); for ``wait`` until when; for the others, why."""

    message: ClaimedMessage
    verdict: Verdict
    template: str = ""
    subject: str = ""
    variant: str | None = None
    preheader: str = ""
    until: datetime | None = None
    reason: str | None = None


def triage(
    messages: Sequence[ClaimedMessage],
    *,
    playbook: Playbook,
    recent_sends: Mapping[int, Iterable[datetime]],
    now: datetime,
) -> list[Triage]:
    """The verdict on each message, in the order given."""
    steps = {m.id: step_now(playbook, m.sequence, m.step_id) for m in messages}
    due = [
        DueEmail(
            m.id,
            m.lead_id,
            playbook.sequences[m.sequence].priority,
            m.due_at,
            m.timezone,
            send_window=playbook.send_window_for(m.sequence),
        )
        for m in messages
        if not m.suppressed and steps[m.id] is not None
    ]
    waits = decide(due, policy=playbook.contact_policy, recent_sends=recent_sends, now=now)
    verdicts: list[Triage] = []
    for message in messages:
        step = steps[message.id]
        if message.suppressed:
            verdicts.append(Triage(message, Verdict.suppress, reason=f"address suppressed: {message.suppressed}"))
        elif step is None:
            gone = "step" if message.sequence in playbook.sequences else "sequence"
            verdicts.append(
                Triage(message, Verdict.cancel, reason=f"{gone} removed from the playbook before it was sent")
            )
        elif (wait := waits.get(message.id)) is not None:
            verdicts.append(Triage(message, Verdict.wait, until=wait[0], reason=f"waiting for {wait[1]}"))
        else:
            # The variant decided with the step, while the test still sends it (weight 0 turns it off);
            # else the one the lead gets now.
            decided = step.variant(message.variant)
            variant = (
                decided
                if decided is not None and decided.weight > 0
                else assign_variant(step, lead_id=message.lead_id, sequence=message.sequence)
            )
            template, subject = step.content_of(variant)
            verdicts.append(
                Triage(
                    message,
                    Verdict.send,
                    template=template,
                    subject=subject,
                    variant=variant.id if variant else None,
                    preheader=step.preheader_of(variant),
                )
            )
    return verdicts
