"""Split-test verdicts a marketer can act on: a winner only when the data says so, plainly.

Each variant is compared with the control (the step's first variant in the playbook) by a
two-proportion test that stays valid however often the report is read: a mixture sequential
probability ratio test (mSPRT, as in Johari et al., "Always valid inference", 2017). A
textbook z-test read every cycle crowns noise: at 95% and ten looks, about one A/A test in
five finds a "winner". This one keeps the 5% however many looks there are
(tests/core/test_verdicts.py replays A/A tests looked at twenty times). With more than one
challenger the 5% is split between them (Bonferroni). Before any test, each arm needs
``MIN_DELIVERED`` emails and ``MIN_EVENTS`` successes and failures (the normal approximation
is not trusted below that): until then the verdict says the sample is too small.

Pure: counts in, verdict out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

# Chance of calling a winner when there is none (two-sided, over every look), before splitting between challengers.
ALPHA = 0.05
# The spread of differences the test is tuned to find (in rate, 0.05 = 5 points): the mixture's prior.
TAU = 0.05
# Emails an arm needs before a test is tried, and successes (and failures) it needs.
MIN_DELIVERED = 100
MIN_EVENTS = 10


class Call(StrEnum):
    too_small = "too small to call"
    no_difference = "no clear difference"
    winner = "winner"


@dataclass(frozen=True, slots=True)
class Arm:
    """One variant's trials (emails delivered) and successes (leads who opened, clicked or converted)."""

    variant: str
    trials: int
    successes: int

    @property
    def rate(self) -> float | None:
        return self.successes / self.trials if self.trials else None


@dataclass(frozen=True, slots=True)
class Comparison:
    """A challenger against the control: the difference in rate, its test and its confidence interval."""

    challenger: str
    difference: float
    p_value: float
    low: float
    high: float


@dataclass(frozen=True, slots=True)
class Verdict:
    metric: str
    control: str
    arms: tuple[Arm, ...]
    call: Call
    winner: str | None
    comparisons: tuple[Comparison, ...]
    # One sentence for the report: what was decided and why.
    summary: str


def _variance(control: Arm, challenger: Arm, *, pooled: bool) -> float:
    """The variance of the difference in rates: pooled (as if equal, to test) or not (for an interval)."""
    if pooled:
        rate = (control.successes + challenger.successes) / (control.trials + challenger.trials)
        return rate * (1 - rate) * (1 / control.trials + 1 / challenger.trials)
    a, b = control.successes / control.trials, challenger.successes / challenger.trials
    return a * (1 - a) / control.trials + b * (1 - b) / challenger.trials


def always_valid_p_value(control: Arm, challenger: Arm, *, tau: float = TAU) -> float:
    """The mSPRT p-value of "the rates are equal": 1 / the mixture likelihood ratio, at most 1.

    Under equal rates the ratio is a martingale, so it reaches 1/alpha at any look with
    probability at most alpha (Ville's inequality): reading it every day is safe."""
    variance = _variance(control, challenger, pooled=True)
    if variance == 0:
        return 1.0
    difference = challenger.successes / challenger.trials - control.successes / control.trials
    spread = tau * tau
    exponent = difference * difference * spread / (2 * variance * (variance + spread))
    log_ratio = 0.5 * math.log(variance / (variance + spread)) + exponent
    return 1.0 if log_ratio <= 0 else math.exp(-log_ratio)


def always_valid_interval(control: Arm, challenger: Arm, *, alpha: float, tau: float = TAU) -> tuple[float, float]:
    """The differences in rate the data does not rule out at this alpha, valid at any look."""
    variance = max(_variance(control, challenger, pooled=False), 1e-12)
    spread = tau * tau
    half = math.sqrt(
        2
        * variance
        * (variance + spread)
        / spread
        * (math.log(1 / alpha) + 0.5 * math.log((variance + spread) / variance))
    )
    difference = challenger.successes / challenger.trials - control.successes / control.trials
    return difference - half, difference + half


def _too_small(arm: Arm) -> str | None:
    if arm.trials < MIN_DELIVERED:
        return f"{arm.variant} has {arm.trials} emails, {MIN_DELIVERED} needed"
    if arm.successes < MIN_EVENTS or arm.trials - arm.successes < MIN_EVENTS:
        return f"{arm.variant} has {arm.successes} of {arm.trials}, at least {MIN_EVENTS} either way needed"
    return None


def _points(value: float, *, sign: bool = False) -> str:
    """A difference of rates in percentage points: ``+15.4`` (12% → 27.4%)."""
    return f"{value * 100:+.1f}" if sign else f"{value * 100:.1f}"


def judge(arms: Sequence[Arm], *, metric: str, alpha: float = ALPHA) -> Verdict:
    """The verdict on a split test; ``arms[0]`` is the control."""
    if len(arms) < 2:
        raise ValueError("a split test needs at least two arms")
    control, challengers = arms[0], arms[1:]
    shortfalls = [why for arm in arms if (why := _too_small(arm))]
    if shortfalls:
        return Verdict(
            metric,
            control.variant,
            tuple(arms),
            Call.too_small,
            None,
            (),
            "too small to call: " + "; ".join(shortfalls),
        )
    per_test = alpha / len(challengers)
    comparisons = []
    for arm in challengers:
        difference = arm.successes / arm.trials - control.successes / control.trials
        low, high = always_valid_interval(control, arm, alpha=per_test)
        comparisons.append(Comparison(arm.variant, difference, always_valid_p_value(control, arm), low, high))
    confidence = f"{(1 - alpha) * 100:g}%"
    better = [c for c in comparisons if c.p_value < per_test and c.difference > 0]
    worse = [c for c in comparisons if c.p_value < per_test and c.difference < 0]
    if better:
        best = max(better, key=lambda c: c.difference)
        summary = (
            f"{best.challenger} beats {control.variant} on {metric}: {_points(best.difference, sign=True)} points "
            f"({confidence} interval {_points(best.low, sign=True)} to {_points(best.high, sign=True)}, "
            f"p={best.p_value:.2g})"
        )
        return Verdict(metric, control.variant, tuple(arms), Call.winner, best.challenger, tuple(comparisons), summary)
    if worse and len(worse) == len(comparisons):
        summary = (
            f"{control.variant} (the control) beats "
            + ", ".join(f"{c.challenger} by {_points(-c.difference)} points (p={c.p_value:.2g})" for c in worse)
            + f" on {metric}"
        )
        return Verdict(metric, control.variant, tuple(arms), Call.winner, control.variant, tuple(comparisons), summary)
    closest = min(comparisons, key=lambda c: c.p_value)
    summary = (
        f"no clear difference on {metric} at {confidence} confidence: {closest.challenger} vs {control.variant} "
        f"{_points(closest.difference, sign=True)} points (interval {_points(closest.low, sign=True)} to "
        f"{_points(closest.high, sign=True)}, p={closest.p_value:.2g})"
    )
    return Verdict(metric, control.variant, tuple(arms), Call.no_difference, None, tuple(comparisons), summary)
