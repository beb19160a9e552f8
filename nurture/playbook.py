"""Load and validate the playbook (nurture.yaml) into typed, frozen models.

The playbook is what marketers edit: scoring rules, stage thresholds and the
nurture sequences bound to stage transitions. Everything is checked here, before
any run: unknown keys, impossible thresholds, bad durations and templates that do
not exist all fail with the key path and the line in the file.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import time, timedelta
from enum import StrEnum
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any
from urllib.parse import urlsplit

import yaml
from jinja2 import TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from nurture.diagnostics import closest, did_you_mean
from nurture.errors import PlaybookError


class Stage(StrEnum):
    """Lifecycle stages, coldest first."""

    cold = "cold"
    warm = "warm"
    hot = "hot"
    customer = "customer"


_DURATION = re.compile(r"^(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?$")
# Longer is a typo, and far longer overflows the calendar when a step's time is computed.
MAX_DURATION = timedelta(days=3650)
# Points and thresholds beyond this are typos; far beyond, sums overflow to infinity.
MAX_POINTS = 1_000_000.0
# Deeper than this, a YAML document is not a playbook (and PyYAML would recurse out of stack).
MAX_YAML_DEPTH = 64
# Template names are file names under templates/: no quotes, braces, spaces, "..", or absolute paths.
TEMPLATE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")
# Step ids are kept in idempotency keys and the database: the same characters, at most 100.
STEP_ID = re.compile(r"^(?=.{1,100}$)[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*$")


def parse_duration(value: object) -> timedelta:
    """Parse ``3d``, ``12h``, ``1d12h``, ``90m``, ``2w`` or ``0h`` into a timedelta."""
    if isinstance(value, timedelta):
        return value
    text = str(value).strip()
    match = _DURATION.match(text) if len(text) <= 40 else None
    if not text or match is None or not any(match.groups()):
        raise ValueError(f"{_shown(value)} is not a duration; write e.g. 0h, 90m, 3d, 1d12h or 2w")
    weeks, days, hours, minutes, seconds = (int(g) if g else 0 for g in match.groups())
    try:
        duration = timedelta(weeks=weeks, days=days, hours=hours, minutes=minutes, seconds=seconds)
    except OverflowError:
        duration = timedelta.max
    if duration > MAX_DURATION:
        raise ValueError(f"{_shown(value)} is longer than {MAX_DURATION.days}d (10 years)")
    return duration


def _shown(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class _Frozen(BaseModel):
    # No NaN or infinity: they pass every comparison check and poison every score they touch.
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True, allow_inf_nan=False)


# Smaller than this (but not 0) is a typo, and would underflow when decayed in the database.
MIN_POINTS = 1e-6


def _not_tiny(points: float) -> float:
    if points != 0 and abs(points) < MIN_POINTS:
        raise ValueError(f"{points!r} is too small: write 0, or at least {MIN_POINTS:g} either way")
    return points


Points = Annotated[float, Field(ge=-MAX_POINTS, le=MAX_POINTS), AfterValidator(_not_tiny)]


class EventRule(_Frozen):
    """Points one event of a kind is worth when it happens; ``max_per_day`` caps the count."""

    points: Points
    max_per_day: int | None = Field(default=None, ge=1)


def _event_rule(value: object) -> object:
    # A bare number is the common case: `page_view: 1`.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return {"points": value}
    return value


# The parser `re` itself uses (``sre_parse`` before Python 3.11); untyped, hence Any.
_sre: Any = importlib.import_module("re._parser")
_REPEATS = {_sre.MAX_REPEAT, _sre.MIN_REPEAT, _sre.POSSESSIVE_REPEAT}
# -1 in a set of first characters stands for "any": a class (\\w), a negation, a dot, a wide range.
_ANY = frozenset({-1})


def _starts(items: Any) -> tuple[frozenset[int], bool]:
    """The characters a parsed sequence can start with, and whether it can match the empty string."""
    first: frozenset[int] = frozenset()
    for op, av in items:
        nullable = False
        if op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
            continue  # zero-width
        if op == _sre.LITERAL:
            chars = _cased(range(av, av + 1))
        elif op == _sre.IN and all(_known_class(o, a) for o, a in av):
            chars = frozenset().union(*(_class_chars(o, a) for o, a in av))
        elif op in _REPEATS or op in (_sre.SUBPATTERN, _sre.ATOMIC_GROUP):
            chars, nullable = _starts(av if op == _sre.ATOMIC_GROUP else av[-1])
            nullable = nullable or (op in _REPEATS and av[0] == 0)
        elif op == _sre.BRANCH:
            parts = [_starts(alternative) for alternative in av[1]]
            chars, nullable = frozenset().union(*(c for c, _ in parts)), any(e for _, e in parts)
        else:
            chars = _ANY
        first |= chars
        if not nullable:
            return first, False
    return first, True


# \s, \d and \w as sets: their Latin-1 characters, and a token each for the rest of Unicode
# (other spaces, other digits, other letters), so that \s+ and \w+ are known not to overlap.
_OTHER_SPACES, _OTHER_DIGITS, _OTHER_LETTERS = -2, -3, -4
_LATIN1 = [chr(n) for n in range(256)]
_CATEGORIES = {
    _sre.CATEGORY_SPACE: frozenset([ord(c) for c in _LATIN1 if c.isspace()] + [_OTHER_SPACES]),
    _sre.CATEGORY_DIGIT: frozenset([ord(c) for c in "0123456789"] + [_OTHER_DIGITS]),
    _sre.CATEGORY_WORD: frozenset(
        [ord(c) for c in _LATIN1 if c.isalnum() or c == "_"] + [_OTHER_DIGITS, _OTHER_LETTERS]
    ),
}


def _known_class(op: Any, av: Any) -> bool:
    if op == _sre.RANGE:
        return bool(av[1] - av[0] < 256)
    if op == _sre.CATEGORY:
        return av in _CATEGORIES
    return bool(op == _sre.LITERAL)


def _class_chars(op: Any, av: Any) -> frozenset[int]:
    if op == _sre.CATEGORY:
        return _CATEGORIES[av]
    return _cased(range(av, av + 1) if op == _sre.LITERAL else range(av[0], av[1] + 1))


def _cased(*spans: range) -> frozenset[int]:
    """The characters of these spans in both cases: the pattern may be case-insensitive."""
    chars = {ch for span in spans for ch in span}
    return frozenset(chars | {ord(chr(ch).lower()[0]) for ch in chars} | {ord(chr(ch).upper()[0]) for ch in chars})


def _overlap(a: frozenset[int], b: frozenset[int]) -> bool:
    return bool(a & b) or (bool(a) and bool(b) and -1 in a | b)


def _backtracking_hazard(items: Any, loop: frozenset[int] | None = None) -> str | None:
    """Why matching this parsed regex can take exponential time, or None.

    ``loop`` is what the innermost enclosing repetition starts with (None outside one).
    Refused: a backreference; a repetition inside a repetition (``(a+)+``, ``(a*)*``,
    ``(\\w+\\s?)+``); and inside a repetition, alternatives that can start with the same
    character (``(ab|a.)*``) or both match the same text (``(a|a)*``), or an optional part
    that can start like the repetition itself (``(a|aa)*``, ``(aa?)+``). Single characters
    in alternation (``(a|\\w)+``) are one character class to ``re``, and safe. Also refused:
    repetitions side by side that can start with the same character (``\\s*\\s*``,
    ``\\d+\\w*``), whose time is polynomial: quadratic, cubic... in the field's length. Not
    covered: two optional parts in a row that can match the same character (``(ab?b?)+``).
    """
    # What the last repetition of this sequence can start with, while all after it can match nothing.
    previous: frozenset[int] | None = None
    for op, av in items:
        problem = None
        if op in (_sre.GROUPREF, _sre.GROUPREF_EXISTS):
            return "refers back to a group (\\1, (?P=name), (?(1)...)), which no matcher does in bounded time"
        if op in (_sre.AT, _sre.ASSERT, _sre.ASSERT_NOT):
            pass  # zero-width: two repetitions around it are still side by side
        elif op in _REPEATS and av[1] <= 1 and av[0] == 0:
            pass  # an optional part (x?) between two repetitions keeps them side by side
        elif op in _REPEATS:
            chars = _starts(av[2])[0]
            if previous is not None and _overlap(chars, previous):
                return (
                    "has repetitions side by side that can match the same characters, like \\s*\\s*, "
                    "whose matching time grows with a power of the field's length"
                )
            # One that can match nothing leaves the one before it side by side with the next.
            previous = chars | (previous or frozenset()) if av[0] == 0 else chars
        else:
            previous = None
        if op in _REPEATS:
            low, high, body = av
            chars, _ = _starts(body)
            if loop is not None and high > 1:
                return "repeats a group that itself repeats, like (a+)+"
            if loop is not None and low == 0 and _overlap(chars, loop):
                return "has an optional part inside a repetition that can start like the repetition, like (aa?)+"
            problem = _backtracking_hazard(body, chars if high > 1 else loop)
        elif op == _sre.BRANCH:
            problem = None if loop is None else _ambiguous([_starts(a) for a in av[1]], loop)
            for alternative in av[1]:
                problem = problem or _backtracking_hazard(alternative, loop)
        elif op in (_sre.SUBPATTERN, _sre.ASSERT, _sre.ASSERT_NOT, _sre.ATOMIC_GROUP):
            problem = _backtracking_hazard(av if op == _sre.ATOMIC_GROUP else av[-1], loop)
        if problem:
            return problem
    return None


def _ambiguous(alternatives: list[tuple[frozenset[int], bool]], loop: frozenset[int]) -> str | None:
    """Why alternatives inside a repetition can match one text in several ways, or None."""
    for index, (chars, _) in enumerate(alternatives):
        if any(_overlap(chars, other) for other, _ in alternatives[index + 1 :]):
            return "has alternatives inside a repetition that can start with the same character, like (ab|a.)*"
    if sum(empty for _, empty in alternatives) > 1:  # the parser writes (a|a) as a(|)
        return "has alternatives inside a repetition that match the same text, like (a|a)*"
    if any(empty for _, empty in alternatives) and any(_overlap(chars, loop) for chars, _ in alternatives):
        return "has an optional part inside a repetition that can start like the repetition, like (a|aa)*"
    return None


def regex_hazard(pattern: str) -> str | None:
    """Why ``pattern`` could take exponential time to match a long field (and hang a cycle), or None.

    A structural check of the parsed pattern (see :func:`_backtracking_hazard` for what it
    covers); it also refuses a few safe patterns, which can be written without nesting.
    """
    try:
        parsed = _sre.parse(pattern)
    except (re.error, RecursionError, OverflowError):
        return None  # FitRule reports a regex that does not compile
    try:
        return _backtracking_hazard(parsed)
    except RecursionError:
        return "is nested too deeply to check"


class FitRule(_Frozen):
    """Points for a profile field that matches; exactly one operator per rule."""

    field: str
    points: Points
    name: str | None = None
    equals: str | int | float | bool | None = None
    in_: tuple[str | int | float, ...] | None = Field(default=None, alias="in")
    regex: str | None = None
    gte: float | None = None
    lte: float | None = None

    @model_validator(mode="after")
    def _one_operator(self) -> FitRule:
        given = [op for op in ("equals", "in_", "regex", "gte", "lte") if getattr(self, op) is not None]
        if len(given) != 1:
            raise ValueError("a fit rule needs exactly one of: equals, in, regex, gte, lte")
        if self.regex is not None:
            try:
                re.compile(self.regex)
            except re.error as exc:
                raise ValueError(f"regex {_shown(self.regex)} does not compile: {exc}") from exc
            except (RecursionError, OverflowError) as exc:
                raise ValueError(f"regex {_shown(self.regex)} is too complex to compile") from exc
        return self

    @field_validator("regex")
    @classmethod
    def _matches_in_bounded_time(cls, pattern: str | None) -> str | None:
        hazard = None if pattern is None else regex_hazard(pattern)
        if hazard is not None:
            raise ValueError(
                f"{_shown(pattern)} {hazard}: matching it against a long field could take hours and stop "
                "scoring; write it without that (see Regexes in docs/playbook.md)"
            )
        return pattern

    @property
    def label(self) -> str:
        """The name shown in explanations and the ledger."""
        if self.name:
            return self.name
        for op, symbol in (("equals", "="), ("in_", "in"), ("regex", "~"), ("gte", ">="), ("lte", "<=")):
            value = getattr(self, op)
            if value is not None:
                shown = list(value) if isinstance(value, tuple) else value
                return f"{self.field} {symbol} {shown}"
        return self.field  # unreachable: the validator demands one operator


class Scoring(_Frozen):
    """How a lead's score is computed: profile fit plus decayed engagement."""

    half_life: Duration
    events: dict[str, Annotated[EventRule, BeforeValidator(_event_rule)]]
    fit: tuple[FitRule, ...] = ()

    @model_validator(mode="after")
    def _positive_half_life(self) -> Scoring:
        if self.half_life <= timedelta(0):
            raise ValueError("half_life must be longer than 0")
        return self


class Threshold(_Frozen):
    """Enter a stage at ``enter_at``; leave it only below ``leave_below`` (hysteresis)."""

    enter_at: Points
    leave_below: Points

    @model_validator(mode="after")
    def _leave_not_above_enter(self) -> Threshold:
        if self.leave_below > self.enter_at:
            raise ValueError("leave_below must not be above enter_at")
        return self


class CustomerRule(_Frozen):
    """A lead becomes a customer when one of these events happens; it is never left."""

    on_events: tuple[str, ...] = ("purchase",)


class Stages(_Frozen):
    warm: Threshold
    hot: Threshold
    customer: CustomerRule = CustomerRule()

    @model_validator(mode="after")
    def _ordered(self) -> Stages:
        if self.warm.enter_at >= self.hot.enter_at:
            raise ValueError(
                f"warm.enter_at ({self.warm.enter_at:g}) must be below hot.enter_at ({self.hot.enter_at:g})"
            )
        if self.warm.leave_below >= self.hot.leave_below:
            raise ValueError(
                f"warm.leave_below ({self.warm.leave_below:g}) must be below hot.leave_below ({self.hot.leave_below:g})"
            )
        return self


def _stage_list(value: object) -> object:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return value


class Trigger(_Frozen):
    """A transition a sequence is bound to; no ``from`` means from any stage."""

    from_: Annotated[tuple[Stage, ...], BeforeValidator(_stage_list)] = Field(default=(), alias="from")
    to: Stage

    @model_validator(mode="after")
    def _possible(self) -> Trigger:
        if Stage.customer in self.from_:
            raise ValueError("customer is final: no transition leaves it")
        if self.to in self.from_:
            raise ValueError(f"a lead cannot move from {self.to} to {self.to}")
        return self

    def matches(self, from_stage: Stage, to_stage: Stage) -> bool:
        return self.to == to_stage and (not self.from_ or from_stage in self.from_)


class Condition(_Frozen):
    """Something the lead did since enrolling: opened or clicked an earlier step's email, or an event."""

    opened: str | None = None
    clicked: str | None = None
    event: Annotated[str, Field(min_length=1, max_length=64)] | None = None

    @model_validator(mode="after")
    def _one(self) -> Condition:
        if sum(v is not None for v in (self.opened, self.clicked, self.event)) != 1:
            raise ValueError("a condition is exactly one of {opened: STEP_ID}, {clicked: STEP_ID}, {event: KIND}")
        return self

    @property
    def step(self) -> str | None:
        """The step whose email it is about (opened, clicked), or None (an event)."""
        return self.opened or self.clicked

    def describe(self) -> str:
        if self.opened:
            return f"opened {self.opened}"
        if self.clicked:
            return f"clicked {self.clicked}"
        return f"event {self.event}"


class WaitFor(Condition):
    """Wait, once the step has settled, up to ``within`` for the lead to do something: then the
    walk goes to the step's ``then`` if they did, to its ``else`` if the time ran out."""

    within: Duration

    @field_validator("within")
    @classmethod
    def _some_time(cls, within: timedelta) -> timedelta:
        if within <= timedelta(0):
            raise ValueError("wait for some time, e.g. within: 3d")
        return within


def _subject_template(subject: str) -> str:
    # Checked here, not only when templates are checked, so the error has the playbook's line.
    try:
        _SUBJECTS.parse(subject)
    except TemplateSyntaxError as exc:
        raise ValueError(f"not a valid template: {exc.message}") from exc
    return subject


def _template_name(template: str) -> str:
    if template and not TEMPLATE_NAME.match(template):  # empty: a step with variants (checked with the step)
        raise ValueError(f"{_shown(template)} is not a template name: letters, digits, _ . - and / between folders")
    return template


# Variant ids are kept on every message: short, like the ids of a split test ("a", "b", "short-subject").
VARIANT_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}$")
# Where a branch may go besides a later step: the enrollment completes.
END = "end"


class Variant(_Frozen):
    """One arm of a split test on a step: its own template and subject, sent to a share of the leads
    in proportion to ``weight``; its ``preheader`` (else the step's) is the inbox's preview text."""

    id: str
    template: Annotated[str, Field(min_length=1), AfterValidator(_template_name)]
    subject: Annotated[str, Field(min_length=1), AfterValidator(_subject_template)]
    preheader: Annotated[str, AfterValidator(_subject_template)] = ""
    weight: int = Field(default=1, ge=0, le=1_000_000)

    @field_validator("id")
    @classmethod
    def _short_id(cls, variant_id: str) -> str:
        if not VARIANT_ID.match(variant_id):
            raise ValueError(f"{_shown(variant_id)} is not a variant id: up to 32 letters, digits, _ . and -")
        return variant_id


class SplitMetric(StrEnum):
    """What decides a split test: emails a person opened (a subject line), clicked, or that converted."""

    opened = "opened"
    clicked = "clicked"
    converted = "converted"


class Step(_Frozen):
    """One email of a sequence, sent ``after`` the previous step was sent or skipped (the first:
    after the stage change). ``id`` (default: the template's name) is how an enrollment
    remembers the step, so steps can be added, removed, edited or reordered safely.
    ``unless`` / ``only_if``: skip the step when the lead did / did not do something since enrolling.
    ``wait_for`` with ``then`` / ``else``: the one branch (both default to the next step in order).
    ``variants``: a split test; then each variant has the template and subject, and the step's are empty
    (what a step sends is in :meth:`contents`). ``preheader``: the preview text inboxes show after the
    subject, a template string like ``subject`` (with variants: the default of those without their own).
    ``judged_on``: what decides the split test, chosen before it starts (default: clicked)."""

    id: str = ""
    after: Duration
    template: Annotated[str, AfterValidator(_template_name)] = ""
    subject: Annotated[str, AfterValidator(_subject_template)] = ""
    preheader: Annotated[str, AfterValidator(_subject_template)] = ""
    unless: Condition | None = None
    only_if: Condition | None = None
    wait_for: WaitFor | None = None
    then: str | None = None
    else_: str | None = Field(default=None, alias="else")
    variants: tuple[Variant, ...] = ()
    judged_on: SplitMetric | None = None

    @field_validator("id")
    @classmethod
    def _an_id(cls, step_id: str) -> str:
        if step_id and not STEP_ID.match(step_id):
            raise ValueError(f"{_shown(step_id)} is not a step id: up to 100 letters, digits, _ . - and /")
        return step_id

    @model_validator(mode="after")
    def _content_and_id(self) -> Step:
        if self.variants:
            if self.template or self.subject:
                raise ValueError("a step with variants takes its template and subject from each variant, not its own")
            if not self.id:
                raise ValueError("a step with variants needs its own `id:` (it cannot default to a template's name)")
            if len(self.variants) < 2:
                raise ValueError("a split test needs at least two variants")
            ids = [v.id for v in self.variants]
            if len(set(ids)) != len(ids):
                raise ValueError(f"variants need different ids (they are {', '.join(ids)})")
            if not any(v.weight for v in self.variants):
                raise ValueError("at least one variant needs a weight above 0")
        elif self.judged_on is not None:
            raise ValueError("judged_on says what decides a split test: it needs variants")
        elif not self.template or not self.subject:
            missing = " and ".join(k for k in ("template", "subject") if not getattr(self, k))
            raise ValueError(f"a step needs a template and a subject (missing: {missing}), or variants")
        if (self.then is not None or self.else_ is not None) and self.wait_for is None:
            raise ValueError("then / else say where to go after a wait_for: add one, or remove them")
        if not self.id:
            object.__setattr__(self, "id", self.template)
        if self.id == END:
            raise ValueError(f"{END!r} is kept for then / else (the enrollment completes): give the step another id")
        return self

    @property
    def split_metric(self) -> SplitMetric:
        """What the split test is judged on (clicks unless the step says)."""
        return self.judged_on or SplitMetric.clicked

    def contents(self) -> tuple[tuple[str | None, str, str], ...]:
        """Every (variant id, template, subject) the step can send; the variant id is None without a split test."""
        if self.variants:
            return tuple((v.id, v.template, v.subject) for v in self.variants)
        return ((None, self.template, self.subject),)

    def variant(self, variant_id: str | None) -> Variant | None:
        return next((v for v in self.variants if v.id == variant_id), None)

    def content_of(self, variant: Variant | None) -> tuple[str, str]:
        """The template and subject a lead given ``variant`` is sent (None: the step's own)."""
        return (variant.template, variant.subject) if variant is not None else (self.template, self.subject)

    def preheader_of(self, variant: Variant | None) -> str:
        """The preheader template a lead given ``variant`` is sent: the variant's own, else the step's ("" for none)."""
        return (variant.preheader if variant is not None else "") or self.preheader


# Parses subjects only (never renders them): the renderer's sandboxed environment renders.
_SUBJECTS = SandboxedEnvironment()


class ReentryRule(StrEnum):
    once = "once"
    always = "always"
    after = "after"


class Reentry(_Frozen):
    """Whether a lead who triggers a sequence again is enrolled again: ``once`` ever,
    ``always``, or ``{after: 30d}`` (not within 30 days of its last enrollment)."""

    rule: ReentryRule
    after: Duration | None = None

    @model_validator(mode="after")
    def _after_for_after(self) -> Reentry:
        if (self.rule == ReentryRule.after) != (self.after is not None):
            raise ValueError("write reentry as once, always, or {after: 30d}")
        return self

    def describe(self) -> str:
        return f"after {_duration_text(self.after)}" if self.after is not None else self.rule.value


def _reentry(value: object) -> object:
    if isinstance(value, str):
        if value not in ("once", "always"):
            raise ValueError(f"{_shown(value)} is not a reentry rule; write once, always, or {{after: 30d}}")
        return {"rule": value}
    if isinstance(value, dict) and "rule" not in value:  # "rule": a Reentry dumped and read back
        if set(value) != {"after"}:
            raise ValueError("write reentry as once, always, or {after: 30d}")
        return {"rule": "after", "after": value["after"]}
    return value


def _duration_text(duration: timedelta) -> str:
    if duration.seconds == 0:
        return f"{duration.days}d"
    return f"{int(duration.total_seconds() // 3600)}h" if duration.total_seconds() % 3600 == 0 else str(duration)


DEFAULT_REENTRY = Reentry(rule=ReentryRule.after, after=timedelta(days=30))


class Goal(_Frozen):
    """What the sequence is for: when the lead does one of these events after enrolling, the
    enrollment ends as ``converted`` and its remaining steps are not sent."""

    events: tuple[Annotated[str, Field(min_length=1, max_length=64)], ...] = Field(min_length=1)


class Sequence(_Frozen):
    """Emails a lead walks one step at a time after a transition; exited when the lead leaves the stage."""

    description: str = ""
    # When the frequency cap lets only some due emails out, lower numbers go first.
    priority: int = Field(default=100, ge=0)
    triggers: tuple[Trigger, ...] = Field(min_length=1)
    steps: tuple[Step, ...] = Field(min_length=1)
    reentry: Annotated[Reentry, BeforeValidator(_reentry)] = DEFAULT_REENTRY
    # None: the contact policy's send window (if any).
    send_window: SendWindow | None = None
    goal: Goal | None = None

    @model_validator(mode="after")
    def _one_target_stage(self) -> Sequence:
        targets = {t.to for t in self.triggers}
        if len(targets) != 1:
            raise ValueError("all triggers of a sequence must lead to the same stage")
        return self

    @field_validator("steps")
    @classmethod
    def _steps_fit_together(cls, steps: tuple[Step, ...]) -> tuple[Step, ...]:
        """Unique ids; conditions about earlier steps; branches that only go forward (no loops)."""
        first: dict[str, int] = {}
        for index, step in enumerate(steps):
            if step.id in first:
                raise ValueError(
                    f"steps {first[step.id]} and {index} have the same id {step.id!r} (an id defaults to the "
                    "template's name): give each step its own `id:`"
                )
            for key, condition in (("unless", step.unless), ("only_if", step.only_if)):
                if condition is not None and condition.step is not None and condition.step not in first:
                    earlier = ", ".join(first) or "none"
                    raise ValueError(
                        f"step {index} ({step.id}): {key}: {condition.describe()}: not a step before this one in "
                        f"the sequence (earlier steps: {earlier})"
                    )
            first[step.id] = index
            wait = step.wait_for
            if wait is not None and wait.step is not None and wait.step not in first:
                raise ValueError(
                    f"step {index} ({step.id}): wait_for: {wait.describe()}: not this step or one before it "
                    f"(steps so far: {', '.join(first)})"
                )
        for index, step in enumerate(steps):
            later = [s.id for s in steps[index + 1 :]]
            for key, target in (("then", step.then), ("else", step.else_)):
                if target is not None and target != END and target not in later:
                    raise ValueError(
                        f"step {index} ({step.id}): {key}: {target!r} is not a step after this one; a branch goes "
                        f"forward to one of: {', '.join([*later, END])}"
                    )
        return steps

    @property
    def stage(self) -> Stage:
        """The stage the lead is in while enrolled; leaving it exits the sequence."""
        return self.triggers[0].to

    def position(self, step_id: str) -> int | None:
        """Where the step with this id is in the sequence now (None: it was removed)."""
        return next((i for i, step in enumerate(self.steps) if step.id == step_id), None)


_CLOCK = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def _clock_time(value: object) -> time:
    if isinstance(value, time):
        return value
    match = _CLOCK.match(str(value).strip())
    if match is None:
        raise ValueError(f"{value!r} is not a time of day; write it as HH:MM, e.g. 08:00")
    return time(int(match.group(1)), int(match.group(2)))


ClockTime = Annotated[time, BeforeValidator(_clock_time)]


class QuietHours(_Frozen):
    """No email between ``start`` and ``end`` in the lead's own time zone (may span midnight)."""

    start: ClockTime
    end: ClockTime

    @model_validator(mode="after")
    def _not_empty(self) -> QuietHours:
        if self.start == self.end:
            raise ValueError("start and end must differ")
        return self


class FrequencyCap(_Frozen):
    """At most ``max_messages`` emails per lead in any rolling ``per`` period, across sequences."""

    max_messages: int = Field(ge=1)
    per: Duration


class Weekday(StrEnum):
    mon = "mon"
    tue = "tue"
    wed = "wed"
    thu = "thu"
    fri = "fri"
    sat = "sat"
    sun = "sun"

    @property
    def number(self) -> int:
        """Monday is 0, as ``datetime.weekday()``."""
        return list(Weekday).index(self)


class SendWindow(_Frozen):
    """Email goes out only on these weekdays between these times, in the lead's own time zone."""

    days: tuple[Weekday, ...] = Field(min_length=1)
    between: tuple[ClockTime, ClockTime]

    @field_validator("days")
    @classmethod
    def _each_once(cls, days: tuple[Weekday, ...]) -> tuple[Weekday, ...]:
        repeated = sorted({d.value for d in days if days.count(d) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} given more than once")
        return days

    @field_validator("between")
    @classmethod
    def _start_before_end(cls, between: tuple[time, time]) -> tuple[time, time]:
        if between[0] >= between[1]:
            raise ValueError(
                f"the window must open before it closes ({between[0]:%H:%M} is not before {between[1]:%H:%M}); "
                "a send window cannot span midnight"
            )
        return between


class ContactPolicy(_Frozen):
    """Checked when an email becomes due, not when it is queued."""

    quiet_hours: QuietHours | None = None
    frequency_cap: FrequencyCap | None = None
    # The default for sequences without their own.
    send_window: SendWindow | None = None


Sequence.model_rebuild()


class Brand(_Frozen):
    name: str
    website: str


# What the events API and imports accept as an event's kind (nurture/importing.py).
EVENT_KIND = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _event_kind(kind: str) -> str:
    if not EVENT_KIND.match(kind):
        raise ValueError(f"{_shown(kind)} is not an event kind: lower-case letters, digits and _ (e.g. trial_started)")
    return kind


class WebhookEvent(StrEnum):
    """What an outbound webhook can be told about (docs/webhooks.md)."""

    transitioned = "lead.transitioned"
    converted = "lead.converted"
    message_failed = "message.failed"


# An environment variable's name, as a webhook's ``secret_env`` names one.
ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]{0,99}$")
WEBHOOK_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$")
MAX_URL = 2000


def _did_you_mean(value: str, choices: Any) -> str:
    return did_you_mean(closest(value, [str(c) for c in choices]))


def _webhook_event(value: object) -> object:
    if isinstance(value, str) and value not in {e.value for e in WebhookEvent}:
        known = ", ".join(e.value for e in WebhookEvent)
        raise ValueError(f"{_shown(value)} is not a webhook event{_did_you_mean(value, WebhookEvent)}; one of: {known}")
    return value


def _webhook_stage(value: object) -> object:
    if isinstance(value, str) and value not in {s.value for s in Stage}:
        known = ", ".join(s.value for s in Stage)
        raise ValueError(f"{_shown(value)} is not a stage{_did_you_mean(value, Stage)}; one of: {known}")
    return value


def _webhook_url(url: str) -> str:
    problem = None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  (raises for a port that is not a number)
    except ValueError as exc:
        parts, problem = None, str(exc)
    if problem is None and (parts is None or parts.scheme not in ("http", "https")):
        problem = "it must start with https:// (or http://)"
    elif problem is None and parts is not None and not parts.hostname:
        problem = "it names no host"
    elif problem is None and parts is not None and (parts.username or parts.password):
        problem = "it carries a user name or password: receivers check the signature instead"
    elif problem is None and (len(url) > MAX_URL or any(c.isspace() for c in url)):
        problem = f"it is longer than {MAX_URL} characters or contains spaces"
    if problem:
        raise ValueError(f"{_shown(url, 80)} is not a webhook URL: {problem}")
    return url


class Webhook(_Frozen):
    """An outbound webhook: where nurture POSTs signed JSON about ``events`` (docs/webhooks.md)."""

    name: str | None = None
    url: Annotated[str, AfterValidator(_webhook_url)]
    events: tuple[Annotated[WebhookEvent, BeforeValidator(_webhook_event)], ...]
    # Only transitions into these stages (lead.transitioned); empty: every transition.
    to: Annotated[tuple[Annotated[Stage, BeforeValidator(_webhook_stage)], ...], BeforeValidator(_stage_list)] = ()
    # The environment variable holding this webhook's signing secret (default: NURTURE_WEBHOOK_SECRET).
    secret_env: str | None = None

    @field_validator("name")
    @classmethod
    def _name_fits(cls, name: str | None) -> str | None:
        if name is not None and not WEBHOOK_NAME.match(name):
            raise ValueError(f"{_shown(name)} is not a webhook name: up to 100 letters, digits, _ . and -")
        return name

    @field_validator("events")
    @classmethod
    def _some_events(cls, events: tuple[WebhookEvent, ...]) -> tuple[WebhookEvent, ...]:
        if not events:
            raise ValueError("lists no event: name at least one of " + ", ".join(e.value for e in WebhookEvent))
        return events

    @field_validator("secret_env")
    @classmethod
    def _env_name(cls, name: str | None) -> str | None:
        if name is not None and not ENV_NAME.match(name):
            raise ValueError(f"{_shown(name)} is not an environment variable name (e.g. SALES_WEBHOOK_SECRET)")
        return name

    def wants(self, event: WebhookEvent, to_stage: Stage | None = None) -> bool:
        """Whether this webhook is told about ``event`` (a transition: into ``to_stage``)."""
        if event not in self.events:
            return False
        return event != WebhookEvent.transitioned or not self.to or to_stage in self.to


@dataclass(frozen=True)
class PlaybookSource:
    """Where a loaded playbook came from: its file and the line of each key path.

    Not part of what the playbook says: two playbooks read from different files with the
    same text are equal (every field has ``compare=False``), and the version hashes the text.
    """

    path: str = field(default="", compare=False)
    lines: Mapping[tuple[str, ...], int] = field(default_factory=lambda: MappingProxyType({}), compare=False)

    def where(self, *loc: str) -> str:
        """``nurture.yaml:83: sequences.welcome.steps.0.subject`` (the key path alone if the file is unknown)."""
        key = ".".join(loc) or "(top level)"
        return f"{_where(self.path, self.lines, loc)}: {key}" if self.path else key


class Playbook(_Frozen):
    """The whole playbook; ``version`` is a hash of the file, recorded with every decision."""

    version: str = ""
    brand: Brand
    links: dict[str, str] = {}
    scoring: Scoring
    stages: Stages
    sequences: dict[str, Sequence]
    contact_policy: ContactPolicy = ContactPolicy()
    # Event kinds the website or imports send that no rule scores (e.g. for a goal): listed so that
    # `nurture validate` knows them and still catches a misspelt kind.
    known_events: tuple[Annotated[str, AfterValidator(_event_kind)], ...] = ()
    # Outbound webhooks: signed JSON to sales and other systems (docs/webhooks.md).
    webhooks: tuple[Webhook, ...] = ()
    # Set by parse_playbook, so later checks (the templates' subjects) can name the file and line.
    _source: PlaybookSource = PrivateAttr(default_factory=PlaybookSource)

    @property
    def source(self) -> PlaybookSource:
        """The file this playbook was read from and its key lines (empty if built in code)."""
        return self._source

    @field_validator("sequences")
    @classmethod
    def _names_fit(cls, sequences: dict[str, Sequence]) -> dict[str, Sequence]:
        # Stored with every enrollment, message and pause (100 characters) and in idempotency keys.
        for name in sequences:
            if not STEP_ID.match(name) or "/" in name:
                raise ValueError(f"{_shown(name)} is not a sequence name: up to 100 letters, digits, _ . and -")
        return sequences

    @field_validator("webhooks")
    @classmethod
    def _webhook_names_differ(cls, webhooks: tuple[Webhook, ...]) -> tuple[Webhook, ...]:
        seen: set[str] = set()
        for i, hook in enumerate(webhooks):
            name = webhook_name(hook, i)
            if name in seen:
                raise ValueError(f"two webhooks are named {name!r}: give each its own name")
            seen.add(name)
        return webhooks

    def named_webhooks(self) -> list[tuple[str, Webhook]]:
        """Each webhook with its name (``webhook-1``, ``webhook-2``, ... when the playbook gives none)."""
        return [(webhook_name(hook, i), hook) for i, hook in enumerate(self.webhooks)]

    def sequences_for(self, from_stage: Stage, to_stage: Stage) -> list[str]:
        """Names of the sequences a transition enrolls a lead in, in playbook order."""
        return [
            name for name, seq in self.sequences.items() if any(t.matches(from_stage, to_stage) for t in seq.triggers)
        ]

    def send_window_for(self, sequence: str) -> SendWindow | None:
        """The sequence's own send window, else the contact policy's (None: any time but quiet hours)."""
        own = self.sequences[sequence].send_window if sequence in self.sequences else None
        return own or self.contact_policy.send_window

    @property
    def scoring_version(self) -> str:
        """A hash of what scores and stages depend on (``scoring`` and ``stages``): when it changes,
        stored scores are stale until a rescore-all; an edit elsewhere (a sequence, a subject) leaves it."""
        rules = json.dumps(
            {"scoring": self.scoring.model_dump(mode="json"), "stages": self.stages.model_dump(mode="json")},
            sort_keys=True,
        )
        return hashlib.sha256(rules.encode()).hexdigest()[:12]

    def template_names(self) -> set[str]:
        return {
            template
            for seq in self.sequences.values()
            for step in seq.steps
            for _, template, _subject in step.contents()
        }


def webhook_name(hook: Webhook, index: int) -> str:
    """A webhook's name: its own, or ``webhook-N`` from its place in the list (1-based)."""
    return hook.name or f"webhook-{index + 1}"


def _read_nodes(root: yaml.Node, source: str) -> tuple[dict[tuple[str, ...], int], list[str]]:
    """Key paths → lines, and what YAML allows but a playbook must not have: a key given twice
    (YAML keeps the last one silently) and numbers too long to be read.

    A node reached again through an alias is not walked twice, so a small file of nested
    aliases (or an alias to itself) costs no more than its size.
    """
    lines: dict[tuple[str, ...], int] = {}
    problems: list[str] = []
    seen: set[int] = set()
    pending: list[tuple[yaml.Node, tuple[str, ...]]] = [(root, ())]
    while pending:
        node, path = pending.pop()
        lines.setdefault(path, node.start_mark.line + 1)
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.ScalarNode) and node.tag.endswith(_TYPED):
            problem = _unreadable(node)
            if problem:
                problems.append(f"{source}:{node.start_mark.line + 1}: {'.'.join(path) or '(top level)'}: {problem}")
        elif isinstance(node, yaml.MappingNode):
            first: dict[str, int] = {}
            for key, value in node.value:
                name = str(key.value)
                child = (*path, name)
                line = key.start_mark.line + 1
                if isinstance(key, yaml.ScalarNode) and key.tag.endswith(_TYPED) and (problem := _unreadable(key)):
                    problems.append(f"{source}:{line}: {'.'.join(child)}: the key {problem}")
                if name in first and isinstance(key, yaml.ScalarNode):
                    problems.append(
                        f"{source}:{line}: {'.'.join(child)}: given twice (first on line {first[name]}); keep one"
                    )
                first.setdefault(name, line)
                lines[child] = line
                pending.append((value, child))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, (*path, str(i))) for i, item in enumerate(node.value))
    return lines, problems


# Scalars PyYAML converts with Python's int(), float() or datetime(): they can fail with a
# ValueError that carries no line, so each is tried on its own first.
_TYPED = (":int", ":float", ":timestamp")


def _unreadable(node: yaml.ScalarNode) -> str | None:
    """Why a typed scalar cannot be read (``2026-13-01``, ``!!int abc``, a 5,000-digit number), or None."""
    kind = {"int": "whole number", "float": "number", "timestamp": "date"}[node.tag.rpartition(":")[2]]
    if len(node.value) > 100:
        return f"a {kind} of {len(node.value)} characters"
    try:
        yaml.SafeLoader("").construct_object(node)
    except (ValueError, OverflowError, yaml.YAMLError) as exc:
        return f"{_shown(node.value)} is not a valid {kind}: {exc}"
    return None


_OPENING = (
    yaml.BlockMappingStartToken,
    yaml.BlockSequenceStartToken,
    yaml.FlowMappingStartToken,
    yaml.FlowSequenceStartToken,
)
_CLOSING = (yaml.BlockEndToken, yaml.FlowMappingEndToken, yaml.FlowSequenceEndToken)


def _too_deep(text: str, source: str) -> str | None:
    """The line where the document nests deeper than ``MAX_YAML_DEPTH``, read token by token
    (the scanner does not recurse; PyYAML's composer would run out of stack)."""
    depth = 0
    for token in yaml.scan(text, Loader=yaml.SafeLoader):
        if isinstance(token, _OPENING):
            depth += 1
            if depth > MAX_YAML_DEPTH:
                return f"{source}:{token.start_mark.line + 1}: nested more than {MAX_YAML_DEPTH} levels deep"
        elif isinstance(token, _CLOSING):
            depth -= 1
    return None


def _yaml_problem(exc: yaml.YAMLError, text: str, source: str) -> str:
    """A YAML error as ``file:line: not valid YAML: what``."""
    mark = getattr(exc, "problem_mark", None)
    if mark is not None:
        where = f"{source}:{mark.line + 1}"
    elif isinstance(exc, yaml.reader.ReaderError):  # a character YAML does not allow (NUL, ...)
        where = f"{source}:{text.count(chr(10), 0, exc.position) + 1}"
    else:
        where = source
    what = getattr(exc, "problem", None) or getattr(exc, "reason", None) or exc
    return f"{where}: not valid YAML: {what}"


def _where(source: str, lines: Mapping[tuple[str, ...], int], loc: tuple[str, ...]) -> str:
    for end in range(len(loc), -1, -1):
        if loc[:end] in lines:
            return f"{source}:{lines[loc[:end]]}"
    return source


# "step 2 (welcome): then: ..." from Sequence's check of its steps, to locate the key it is about.
_STEP_PROBLEM = re.compile(r"^step (?P<index>\d+) \((?P<step>[^)]*)\): (?P<key>\w+): (?P<rest>.*)$", re.DOTALL)


# "warm.enter_at (80) must be below hot.enter_at (75)" from Stages' check: point at the first key it names.
_THRESHOLD_PROBLEM = re.compile(r"^(?P<stage>warm|hot)\.(?P<key>enter_at|leave_below) ")


def parse_playbook(text: str, *, source: str = "nurture.yaml") -> Playbook:
    """Validate playbook text; raises PlaybookError listing every problem with its line."""
    try:
        too_deep = _too_deep(text, source)
        if too_deep:
            raise PlaybookError([too_deep])
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        lines, problems = _read_nodes(root, source) if root is not None else ({}, [])
        if problems:
            raise PlaybookError(problems)
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PlaybookError([_yaml_problem(exc, text, source)]) from exc
    if not isinstance(document, dict):
        line = root.start_mark.line + 1 if root is not None else 1
        raise PlaybookError([f"{source}:{line}: the playbook must be a mapping of keys (brand, scoring, ...)"])
    document["version"] = hashlib.sha256(text.encode()).hexdigest()[:12]
    try:
        playbook = Playbook.model_validate(document)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(str(p) for p in error["loc"] if not str(p).startswith("function-"))
            loc = tuple(p for p in loc if p not in {"int", "float", "str", "bool"})
            key = ".".join(loc) or "(top level)"
            message = error["msg"].removeprefix("Value error, ")
            if error["type"] == "extra_forbidden":
                message = "unknown key (check its spelling)"
            if loc == ("stages",) and (threshold := _THRESHOLD_PROBLEM.match(message)):
                loc = (*loc, threshold["stage"], threshold["key"])  # the line of the first threshold named
                key = ".".join(loc)
            elif len(loc) == 2 and loc[0] == "stages" and message.startswith("leave_below "):
                loc = (*loc, "leave_below")
                key, message = ".".join(loc), message.removeprefix("leave_below ")
            if loc and loc[-1] == "steps" and (about := _STEP_PROBLEM.match(message)):
                # A problem between steps names one step's key: point at that key's line.
                loc = (*loc, about["index"], about["key"])
                key, message = ".".join(loc), f"{about['rest']} (step {about['step']})"
            problems.append(f"{_where(source, lines, loc)}: {key}: {message}")
        raise PlaybookError(problems) from exc
    playbook._source = PlaybookSource(path=source, lines=MappingProxyType(lines))
    return playbook


def load_playbook(path: Path, *, templates_dir: Path | None = None) -> Playbook:
    """Read, validate and (given the templates folder) check every template exists."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PlaybookError([f"{path}: cannot read the playbook: {exc.strerror}"]) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise PlaybookError([f"{path}:{line}: not UTF-8 text (byte {exc.start}); save the file as UTF-8"]) from exc
    playbook = parse_playbook(text, source=str(path))
    if templates_dir is not None:
        missing = missing_templates(playbook, templates_dir)
        if missing:
            raise PlaybookError([problem for _, problem in missing])
    return playbook


def missing_templates(playbook: Playbook, templates_dir: Path) -> list[tuple[str, str]]:
    """Each template a step names whose ``.html`` or ``.txt`` file is absent, with the problem at its line."""
    missing = []
    for name, seq in playbook.sequences.items():
        for i, step in enumerate(seq.steps):
            for v, (variant, template, _subject) in enumerate(step.contents()):
                absent = [
                    str(templates_dir / f"{template}{suffix}")
                    for suffix in (".html", ".txt")
                    if not (templates_dir / f"{template}{suffix}").is_file()
                ]
                where = ("variants", str(v), "template") if variant is not None else ("template",)
                if absent:
                    missing.append(
                        (
                            template,
                            f"{playbook.source.where('sequences', name, 'steps', str(i), *where)}: template "
                            f"{template!r} has no {' and no '.join(absent)}",
                        )
                    )
    return missing
