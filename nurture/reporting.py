"""What each sequence's emails achieved: counts and rates per step and variant, and split-test verdicts.

The numbers come from ``db/analytics.py``; this module orders them the way the playbook
reads (sequences and steps in playbook order, a step no longer in the playbook after the
others), computes the rates and judges each split test. Pure.

Definitions (docs/reports.md says the same to marketers):

- *sent*: emails that left in the period; *delivered*: those SendGrid reported delivered.
- *opened*, *clicked*: emails opened or clicked at least once by a person. An open by a machine
  (Apple Mail Privacy Protection loads every image when the email arrives) is counted apart as
  *machine opened* and is not an open.
- *bounced*, *spam*, *unsubscribed*: emails that bounced, were reported as spam, or were the
  last email the lead got before unsubscribing.
- *converted*: emails whose lead did one of the sequence's goal events (a sequence without a goal:
  moved up to hot or customer) within the conversion window after the email was sent, even after
  the sequence ended. A conversion is credited to every email of the sequence sent in the window
  before it.
- Rates are per delivered email (per sent email for a step with no delivery reports, such
  as mail written to the file outbox without SendGrid's events).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import timedelta
from typing import Any

from nurture.playbook import Playbook, SplitMetric
from nurture.verdicts import Arm, Verdict, judge

# The counts of a row, in the order every output shows them.
COUNTS = (
    "sent",
    "delivered",
    "opened",
    "machine_opened",
    "clicked",
    "bounced",
    "unsubscribed",
    "spam",
    "converted",
)
# The counts shown as a rate of delivered (or sent) emails.
RATES = ("opened", "clicked", "bounced", "unsubscribed", "spam", "converted")
# What a split test is judged on when its step does not say (``judged_on``): a click is a person.
DEFAULT_METRIC = SplitMetric.clicked.value
METRICS = tuple(m.value for m in SplitMetric)


@dataclass(frozen=True, slots=True)
class StepCounts:
    """The emails of one step (and variant) sent in the period, and what became of them."""

    sequence: str
    step: str
    variant: str | None
    sent: int = 0
    delivered: int = 0
    opened: int = 0
    machine_opened: int = 0
    clicked: int = 0
    bounced: int = 0
    unsubscribed: int = 0
    spam: int = 0
    converted: int = 0

    @property
    def base(self) -> int:
        """What rates are per: delivered emails, or sent ones when no delivery was reported."""
        return self.delivered or self.sent

    def rate(self, count: str) -> float | None:
        return getattr(self, count) / self.base if self.base else None

    def plus(self, other: StepCounts) -> StepCounts:
        return StepCounts(
            self.sequence,
            self.step,
            self.variant,
            **{name: getattr(self, name) + getattr(other, name) for name in COUNTS},
        )


@dataclass(frozen=True, slots=True)
class StepReport:
    sequence: str
    step: str
    # False for a step the playbook no longer has (its emails were sent before it was removed).
    in_playbook: bool
    total: StepCounts
    variants: tuple[StepCounts, ...] = ()
    verdict: Verdict | None = None


@dataclass(frozen=True, slots=True)
class SequenceReport:
    sequence: str
    in_playbook: bool
    steps: tuple[StepReport, ...]
    total: StepCounts


@dataclass(frozen=True, slots=True)
class Report:
    sequences: tuple[SequenceReport, ...]
    # What every split test was judged on when asked (None: each step's own ``judged_on``).
    metric: str | None
    period: Mapping[str, str] = field(default_factory=dict)

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per step and per variant: what CSV and table artifacts carry."""
        out: list[dict[str, Any]] = []
        for sequence in self.sequences:
            for step in sequence.steps:
                for counts in (step.total, *step.variants):
                    out.append(_row(counts, step))
        return out


def _row(counts: StepCounts, step: StepReport) -> dict[str, Any]:
    row: dict[str, Any] = {
        "sequence": counts.sequence,
        "step": counts.step,
        "variant": counts.variant or ("(all)" if step.variants else ""),
    }
    row.update({name: getattr(counts, name) for name in COUNTS})
    for name in RATES:
        rate = counts.rate(name)
        row[f"{name}_rate"] = None if rate is None else round(rate, 4)
    row["verdict"] = step.verdict.summary if step.verdict and counts.variant is None else ""
    return row


def _playbook_order(
    playbook: Playbook | None,
) -> tuple[list[str], dict[str, list[str]], dict[str, list[str]], dict[str, str]]:
    """Sequences, their steps and each step's variants in the order the playbook lists them, and what
    each split test is judged on."""
    if playbook is None:
        return [], {}, {}, {}
    steps = {name: [step.id for step in sequence.steps] for name, sequence in playbook.sequences.items()}
    tests = [(f"{name}/{step.id}", step) for name, sequence in playbook.sequences.items() for step in sequence.steps]
    variants = {key: [variant.id for variant in step.variants] for key, step in tests if step.variants}
    judged_on = {key: step.split_metric.value for key, step in tests if step.variants}
    return list(playbook.sequences), steps, variants, judged_on


def _ordered(names: Iterable[str], known: Sequence[str]) -> list[str]:
    """``known`` first in its order, then the rest alphabetically."""
    present = set(names)
    return [n for n in known if n in present] + sorted(present - set(known))


def build_report(
    counts: Iterable[StepCounts],
    *,
    playbook: Playbook | None,
    metric: str | None = None,
    period: Mapping[str, str] | None = None,
) -> Report:
    """Group per-variant counts into sequences and steps in playbook order, with verdicts (judged on
    ``metric``, else on each step's ``judged_on``)."""
    if metric is not None and metric not in METRICS:
        raise ValueError(f"a split test is judged on one of {', '.join(METRICS)}, not {metric!r}")
    sequence_order, step_order, variant_order, judged_on = _playbook_order(playbook)
    by_step: dict[tuple[str, str], list[StepCounts]] = {}
    for row in counts:
        by_step.setdefault((row.sequence, row.step), []).append(row)
    reports = []
    for sequence in _ordered({s for s, _ in by_step}, sequence_order):
        known_steps = step_order.get(sequence, [])
        steps = []
        for step in _ordered({st for s, st in by_step if s == sequence}, known_steps):
            rows = by_step[(sequence, step)]
            total = StepCounts(sequence, step, None)
            for row in rows:
                total = total.plus(row)
            known_variants = variant_order.get(f"{sequence}/{step}", [])
            named = {row.variant: row for row in rows if row.variant}
            variants = tuple(named[v] for v in _ordered(named, known_variants))
            verdict = None
            if len(variants) >= 2:
                on = metric or judged_on.get(f"{sequence}/{step}", DEFAULT_METRIC)
                verdict = judge([Arm(v.variant or "", v.base, getattr(v, on)) for v in variants], metric=on)
            steps.append(StepReport(sequence, step, step in known_steps, total, variants, verdict))
        sequence_total = StepCounts(sequence, "(all steps)", None)
        for step_report in steps:
            sequence_total = sequence_total.plus(step_report.total)
        reports.append(SequenceReport(sequence, sequence in sequence_order, tuple(steps), sequence_total))
    return Report(tuple(reports), metric, dict(period or {}))


def report_json(report: Report) -> dict[str, Any]:
    """The report as JSON: per sequence, per step, per variant; counts, rates and the verdict."""

    def counts_json(counts: StepCounts) -> dict[str, Any]:
        data: dict[str, Any] = {name: getattr(counts, name) for name in COUNTS}
        data["rates"] = {name: counts.rate(name) for name in RATES}
        data["rate_base"] = "delivered" if counts.delivered else "sent"
        return data

    def verdict_json(verdict: Verdict | None) -> dict[str, Any] | None:
        if verdict is None:
            return None
        return {
            "metric": verdict.metric,
            "control": verdict.control,
            "call": verdict.call.value,
            "winner": verdict.winner,
            "summary": verdict.summary,
            "comparisons": [{f.name: getattr(c, f.name) for f in fields(c)} for c in verdict.comparisons],
        }

    return {
        "period": dict(report.period),
        "metric": report.metric,
        "sequences": [
            {
                "sequence": s.sequence,
                "in_playbook": s.in_playbook,
                **counts_json(s.total),
                "steps": [
                    {
                        "step": st.step,
                        "in_playbook": st.in_playbook,
                        **counts_json(st.total),
                        "variants": [{"variant": v.variant, **counts_json(v)} for v in st.variants],
                        "verdict": verdict_json(st.verdict),
                    }
                    for st in s.steps
                ],
            }
            for s in report.sequences
        ],
    }


def describe_duration(value: timedelta) -> str:
    """``14 days``, ``36 hours``: a window as people say it."""
    hours = value.total_seconds() / 3600
    if hours % 24 == 0:
        days = int(hours // 24)
        return f"{days} day" + ("" if days == 1 else "s")
    return f"{hours:g} hours"
