"""Split-test verdicts: a winner only from a real difference, however often the report is read."""

from __future__ import annotations

import math
import random

import pytest

from nurture.verdicts import ALPHA, Arm, Call, always_valid_interval, always_valid_p_value, judge


def _arm(rng: random.Random, name: str, trials: int, rate: float) -> Arm:
    return Arm(name, trials, sum(rng.random() < rate for _ in range(trials)))


def test_an_aa_test_read_twenty_times_rarely_crowns_a_winner() -> None:
    """Two identical variants, the report read after every 100 emails per arm up to 2,000:
    a test that is not safe to peek at (a z-test at 95%) calls a winner in about one A/A test
    in four; this one stays under its 5%."""
    rng = random.Random(20261124)
    crowned = naive = 0
    experiments = 300
    for _ in range(experiments):
        a = b = n = 0
        ever = naive_ever = False
        for _look in range(20):
            a += sum(rng.random() < 0.1 for _ in range(100))
            b += sum(rng.random() < 0.1 for _ in range(100))
            n += 100
            ever |= judge([Arm("a", n, a), Arm("b", n, b)], metric="clicked").call == Call.winner
            pooled = (a + b) / (2 * n)
            z = abs(b - a) / n / math.sqrt(pooled * (1 - pooled) * 2 / n)
            naive_ever |= math.erfc(z / math.sqrt(2)) < 0.05
        crowned += ever
        naive += naive_ever
    assert naive / experiments > 0.15  # the trap is real at this sample size
    assert crowned / experiments <= ALPHA


def test_a_real_difference_is_found() -> None:
    rng = random.Random(7)
    found = sum(
        judge([_arm(rng, "a", 2000, 0.10), _arm(rng, "b", 2000, 0.15)], metric="clicked").winner == "b"
        for _ in range(100)
    )
    assert found >= 90


def test_the_verdict_says_who_won_by_how_much() -> None:
    verdict = judge([Arm("a", 1000, 100), Arm("b", 1000, 180)], metric="opened")
    assert (verdict.call, verdict.winner, verdict.control) == (Call.winner, "b", "a")
    (comparison,) = verdict.comparisons
    assert comparison.difference == pytest.approx(0.08)
    assert comparison.low > 0
    assert comparison.low < 0.08 < comparison.high
    assert verdict.summary.startswith("b beats a on opened: +8.0 points (95% interval +")


def test_the_control_can_win() -> None:
    verdict = judge([Arm("a", 1000, 180), Arm("b", 1000, 100)], metric="clicked")
    assert (verdict.call, verdict.winner) == (Call.winner, "a")
    assert verdict.summary.startswith("a (the control) beats b by 8.0 points")


def test_a_small_difference_is_no_clear_difference() -> None:
    verdict = judge([Arm("a", 1000, 100), Arm("b", 1000, 115)], metric="clicked")
    assert (verdict.call, verdict.winner) == (Call.no_difference, None)
    assert verdict.summary.startswith("no clear difference on clicked at 95% confidence: b vs a +1.5 points")


@pytest.mark.parametrize(
    ("arms", "why"),
    [
        ([Arm("a", 99, 30), Arm("b", 500, 200)], "a has 99 emails, 100 needed"),
        ([Arm("a", 500, 9), Arm("b", 500, 40)], "a has 9 of 500, at least 10 either way needed"),
        ([Arm("a", 500, 100), Arm("b", 500, 495)], "b has 495 of 500, at least 10 either way needed"),
    ],
)
def test_too_small_a_sample_is_never_called(arms: list[Arm], why: str) -> None:
    verdict = judge(arms, metric="clicked")
    assert (verdict.call, verdict.winner, verdict.comparisons) == (Call.too_small, None, ())
    assert why in verdict.summary


def test_more_challengers_need_stronger_evidence_each() -> None:
    """Bonferroni: with two challengers each is tested at 2.5%, and the interval widens."""
    control, challenger = Arm("a", 800, 100), Arm("b", 800, 146)
    alone = judge([control, challenger], metric="clicked")
    crowd = judge([control, challenger, Arm("c", 800, 100)], metric="clicked")
    p = always_valid_p_value(control, challenger)
    assert ALPHA / 2 < p < ALPHA
    assert alone.call == Call.winner
    assert crowd.call == Call.no_difference
    low_alone, _ = always_valid_interval(control, challenger, alpha=ALPHA)
    low_crowd, _ = always_valid_interval(control, challenger, alpha=ALPHA / 2)
    assert low_crowd < low_alone


def test_nothing_varies_nothing_is_called() -> None:
    assert always_valid_p_value(Arm("a", 200, 0), Arm("b", 200, 0)) == 1.0
    with pytest.raises(ValueError, match="at least two arms"):
        judge([Arm("a", 200, 20)], metric="clicked")
