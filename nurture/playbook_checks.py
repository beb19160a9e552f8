"""What ``nurture validate`` finds in a playbook that loads but cannot do what it says.

The loader (nurture/playbook.py) refuses what cannot be read: wrong types, unknown keys,
keys given twice, branches that go backwards. These checks find what reads well and
still fails silently in production: an event kind nothing sends (``on_events: [purchse]``:
nobody ever becomes a customer), a fit rule on a field leads do not have, a step no path
reaches, thresholds without a margin, a send window that lies inside quiet hours.

Which event kinds exist: the website's usual kinds (``WEBSITE_EVENT_KINDS``), the kinds
nurture itself stores from SendGrid's events (``PROVIDER_EVENT_KINDS``), the playbook's own
``known_events`` list, and (``nurture validate --database``) the kinds already stored.
Pure: the stored kinds are a parameter.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import time

from nurture.diagnostics import Problem, closest, did_you_mean
from nurture.importing import LEAD_COLUMNS
from nurture.inbound import MACHINE_OPEN, SCORED
from nurture.playbook import END, Playbook, QuietHours, SendWindow, Sequence
from nurture.webhooks import DEFAULT_SECRET_ENV

# Kinds a website usually sends to the events API (docs/api.md); others go in the playbook's known_events.
WEBSITE_EVENT_KINDS = frozenset(
    {
        "page_view",
        "pricing_view",
        "form_submit",
        "content_download",
        "webinar_registered",
        "webinar_attended",
        "trial_started",
        "demo_request",
        "purchase",
    }
)
# Kinds nurture stores from SendGrid's Event Webhook (nurture/inbound.py).
PROVIDER_EVENT_KINDS = frozenset(SCORED.values()) | {MACHINE_OPEN}
# A fit rule may name these, or ``attributes.<name>`` (any column imported with the lead).
FIT_FIELDS = LEAD_COLUMNS
ATTRIBUTES = "attributes"


class _Locator:
    """File and line of a key path, from the line map the loader kept."""

    def __init__(self, playbook: Playbook) -> None:
        self.file = playbook.source.path or "nurture.yaml"
        self.lines = playbook.source.lines

    def problem(self, loc: tuple[str, ...], message: str, suggestion: str | None = None) -> Problem:
        line = next((self.lines[loc[:end]] for end in range(len(loc), -1, -1) if loc[:end] in self.lines), None)
        return Problem(self.file, line, message, key=".".join(loc) or None, suggestion=suggestion)


def check_playbook(
    playbook: Playbook, *, stored_event_kinds: Iterable[str] = (), environment: Mapping[str, str] | None = None
) -> list[Problem]:
    """Every problem of a loaded playbook that the loader lets through, each at its key's line.

    With ``environment`` (the variables set where it runs), webhooks whose signing secret is
    not set are problems too: nurture never sends one unsigned.
    """
    at = _Locator(playbook)
    return [
        *_event_kinds(playbook, at, frozenset(stored_event_kinds)),
        *_fit_fields(playbook, at),
        *_thresholds(playbook, at),
        *_unreachable(playbook, at),
        *_windows(playbook, at),
        *(_webhook_secrets(playbook, at, environment) if environment is not None else []),
    ]


def _webhook_secrets(playbook: Playbook, at: _Locator, environment: Mapping[str, str]) -> list[Problem]:
    problems = []
    for i, hook in enumerate(playbook.webhooks):
        env = hook.secret_env or DEFAULT_SECRET_ENV
        if not (environment.get(env) or "").strip():
            loc = ("webhooks", str(i), "secret_env" if hook.secret_env else "url")
            problems.append(
                at.problem(
                    loc,
                    f"{env} is not set: this webhook would never be sent (nurture sends none unsigned); "
                    f"set {env} to the secret its receiver verifies with (docs/webhooks.md)",
                )
            )
    return problems


def sent_event_kinds(playbook: Playbook, stored: Iterable[str] = ()) -> frozenset[str]:
    """The event kinds something sends: the website's usual ones, SendGrid's, the playbook's known_events."""
    return WEBSITE_EVENT_KINDS | PROVIDER_EVENT_KINDS | set(playbook.known_events) | set(stored)


def _unknown_kind(at: _Locator, loc: tuple[str, ...], kind: str, known: frozenset[str]) -> Problem:
    suggestion = closest(kind, known)
    hint = did_you_mean(suggestion) or (
        "; if your website or imports send it, add it to known_events at the top of the playbook"
    )
    return at.problem(loc, f"{kind!r} is not an event kind anything sends{hint}", suggestion)


def _event_kinds(playbook: Playbook, at: _Locator, stored: frozenset[str]) -> list[Problem]:
    sent = sent_event_kinds(playbook, stored)
    scored = set(playbook.scoring.events)
    problems = [
        _unknown_kind(at, ("scoring", "events", kind), kind, sent | (scored - {kind}))
        for kind in playbook.scoring.events
        if kind not in sent
    ]
    # A kind the playbook scores is reported once, at its weight.
    known = sent | scored
    references: list[tuple[tuple[str, ...], str]] = [
        (("stages", "customer", "on_events", str(i)), kind) for i, kind in enumerate(playbook.stages.customer.on_events)
    ]
    for name, sequence in playbook.sequences.items():
        if sequence.goal is not None:
            goal = sequence.goal.events
            references += [(("sequences", name, "goal", "events", str(i)), kind) for i, kind in enumerate(goal)]
        for i, step in enumerate(sequence.steps):
            for key in ("unless", "only_if", "wait_for"):
                condition = getattr(step, key)
                if condition is not None and condition.event is not None:
                    references.append((("sequences", name, "steps", str(i), key, "event"), condition.event))
    problems += [_unknown_kind(at, loc, kind, known) for loc, kind in references if kind not in known]
    return problems


def _fit_fields(playbook: Playbook, at: _Locator) -> list[Problem]:
    problems = []
    for i, rule in enumerate(playbook.scoring.fit):
        name, dot, attribute = rule.field.partition(".")
        if (name == ATTRIBUTES and dot and attribute and "." not in attribute) or rule.field in FIT_FIELDS:
            continue
        loc = ("scoring", "fit", str(i), "field")
        if name == ATTRIBUTES:
            problems.append(at.problem(loc, "write attributes.<name> for an imported column, e.g. attributes.industry"))
            continue
        suggestion = closest(rule.field, FIT_FIELDS)
        hint = did_you_mean(suggestion) or f"; a column imported with the lead is attributes.{rule.field}"
        problems.append(
            at.problem(loc, f"lead has no field {rule.field!r}, so this rule never matches{hint}", suggestion)
        )
    return problems


def _thresholds(playbook: Playbook, at: _Locator) -> list[Problem]:
    """What the loader allows but no marketer means: no margin, a stage everyone starts in."""
    stages = playbook.stages
    problems = []
    for name, threshold in (("warm", stages.warm), ("hot", stages.hot)):
        if threshold.leave_below == threshold.enter_at:
            problems.append(
                at.problem(
                    ("stages", name, "leave_below"),
                    f"equals enter_at ({threshold.enter_at:g}): with no margin a lead whose score hovers around "
                    f"{threshold.enter_at:g} moves in and out of {name} and is enrolled again each time; "
                    "put leave_below below enter_at",
                )
            )
    if stages.warm.enter_at <= 0:
        problems.append(
            at.problem(
                ("stages", "warm", "enter_at"),
                f"{stages.warm.enter_at:g} is not above 0: every new lead (score 0) is warm at once and cold "
                "means nothing; enter warm above 0",
            )
        )
    if stages.hot.leave_below < stages.warm.enter_at:
        problems.append(
            at.problem(
                ("stages", "hot", "leave_below"),
                f"{stages.hot.leave_below:g} is below warm.enter_at ({stages.warm.enter_at:g}): a hot lead would "
                "stay hot at a score where a new lead is not even warm; leave hot at or above warm.enter_at",
            )
        )
    if not stages.customer.on_events:
        problems.append(
            at.problem(
                ("stages", "customer", "on_events"),
                "is empty: no lead can ever become a customer; list the event that makes one, e.g. [purchase]",
                "purchase",
            )
        )
    return problems


def _unreachable(playbook: Playbook, at: _Locator) -> list[Problem]:
    problems = []
    for name, sequence in playbook.sequences.items():
        if any(t.to == "customer" for t in sequence.triggers) and not playbook.stages.customer.on_events:
            problems.append(
                at.problem(
                    ("sequences", name, "triggers"),
                    "never starts: it waits for a lead to become a customer, and stages.customer.on_events is empty",
                )
            )
        reached = reachable_steps(sequence)
        for index, step in enumerate(sequence.steps):
            if index not in reached:
                problems.append(
                    at.problem(
                        ("sequences", name, "steps", str(index)),
                        f"step {step.id!r} is never sent: {_jumped_over(sequence, index)} jumps past it and no "
                        "other step leads to it; point a then/else at it, or remove it",
                    )
                )
    return problems


def reachable_steps(sequence: Sequence) -> set[int]:
    """The positions an enrollment can walk to from the first step, as nurture/sequences.py walks.

    After a step comes the next one in order, unless it waits (``wait_for``): then its ``then``
    and ``else`` (each the next step when not given, nothing for ``end``). A step skipped by
    its condition goes on to the next one in order.
    """
    position = {step.id: i for i, step in enumerate(sequence.steps)}
    reached: set[int] = set()
    pending = [0]
    while pending:
        index = pending.pop()
        if index in reached or index >= len(sequence.steps):
            continue
        reached.add(index)
        step = sequence.steps[index]
        following: set[int] = set()
        if step.wait_for is None or step.unless is not None or step.only_if is not None:
            following.add(index + 1)
        if step.wait_for is not None:
            for target in (step.then, step.else_):
                if target is None:
                    following.add(index + 1)
                elif target != END:
                    following.add(position[target])
        pending.extend(following)
    return reached


def _jumped_over(sequence: Sequence, index: int) -> str:
    """The step whose branches go past the step at ``index``, as the marketer wrote them."""
    for earlier in range(index - 1, -1, -1):
        step = sequence.steps[earlier]
        if step.wait_for is not None:
            return f"step {step.id!r} (then: {step.then or 'next'}, else: {step.else_ or 'next'})"
    return "the step before it"


def _open_minutes(window: SendWindow, quiet: QuietHours | None) -> int:
    """How many minutes of the window's day quiet hours leave open."""

    def minute(clock: time) -> int:
        return clock.hour * 60 + clock.minute

    start, end = (minute(t) for t in window.between)
    if quiet is None:
        return end - start
    q_start, q_end = minute(quiet.start), minute(quiet.end)

    def is_quiet(m: int) -> bool:
        return (m >= q_start or m < q_end) if q_start > q_end else q_start <= m < q_end

    return sum(1 for m in range(start, end) if not is_quiet(m))


def _windows(playbook: Playbook, at: _Locator) -> list[Problem]:
    quiet = playbook.contact_policy.quiet_hours
    if quiet is None:
        return []
    windows: Mapping[tuple[str, ...], SendWindow | None] = {
        ("contact_policy", "send_window", "between"): playbook.contact_policy.send_window,
        **{("sequences", n, "send_window", "between"): s.send_window for n, s in playbook.sequences.items()},
    }
    problems = []
    for loc, window in windows.items():
        if window is not None and _open_minutes(window, quiet) == 0:
            problems.append(
                at.problem(
                    loc,
                    f"the window {window.between[0]:%H:%M}–{window.between[1]:%H:%M} lies inside quiet hours "
                    f"({quiet.start:%H:%M}–{quiet.end:%H:%M}): no email that uses it is ever sent; "
                    "widen the window or shorten quiet hours",
                )
            )
    return problems
