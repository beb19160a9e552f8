"""Fit rule regexes that could take exponential time on a long field are refused by `nurture validate`, with
the key and line; the shipped ones, and ordinary ones, load."""

from __future__ import annotations

import pytest

from nurture.errors import PlaybookError
from nurture.playbook import load_playbook, parse_playbook
from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR

SHIPPED = PLAYBOOK_PATH.read_text()
FREE_MAIL = 'regex: "@(gmail|yahoo|hotmail|outlook)\\\\."'  # the shipped rule the tests rewrite


def _with_regex(pattern: str) -> str:
    assert FREE_MAIL in SHIPPED
    return SHIPPED.replace(FREE_MAIL, "regex: '" + pattern.replace("'", "''") + "'")


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


@pytest.mark.parametrize(
    ("pattern", "why"),
    [
        ("^(a+)+$", "repeats a group that itself repeats"),
        ("(a*)*b", "repeats a group that itself repeats"),
        ("(\\w+\\s?)+$", "repeats a group that itself repeats"),
        ("^(?:[a-z]{2,5}){2,}$", "repeats a group that itself repeats"),
        ("(?=(a+)+x)", "repeats a group that itself repeats"),  # inside a lookahead too
        ("^(a|a)*$", "alternatives inside a repetition that match the same text"),
        ("^(ab|a.)*$", "alternatives inside a repetition that can start with the same character"),
        ("^(a|aa)*$", "an optional part inside a repetition"),
        ("^(aa?)+$", "an optional part inside a repetition"),
        ("(a)\\1", "refers back to a group"),
        ("(?P<x>a)(?P=x)", "refers back to a group"),
        ("\\s*\\s*\\s*x$", "repetitions side by side"),  # cubic: two minutes on 1,000 spaces
        ("\\w+\\s*\\w+", "repetitions side by side"),  # the optional \\s* leaves them side by side
        ("^.*.*$", "repetitions side by side"),
        ("\\d+\\w*", "repetitions side by side"),  # a digit is a word character
    ],
)
def test_a_regex_that_can_backtrack_exponentially_is_refused_with_its_key_and_line(pattern: str, why: str) -> None:
    text = _with_regex(pattern)
    with pytest.raises(PlaybookError) as caught:
        parse_playbook(text, source="nurture.yaml")
    (problem,) = caught.value.problems
    line = _line_of(text, "regex: '")
    assert problem.startswith(f"nurture.yaml:{line}: scoring.fit.4.regex: ")
    assert why in problem
    assert "could take hours and stop scoring" in problem


def test_the_shipped_regexes_load() -> None:
    playbook = load_playbook(PLAYBOOK_PATH, templates_dir=TEMPLATES_DIR)
    shipped = [rule.regex for rule in playbook.scoring.fit if rule.regex is not None]
    assert len(shipped) == 2
    for pattern in shipped:
        parse_playbook(_with_regex(pattern), source="nurture.yaml")


@pytest.mark.parametrize(
    "pattern",
    [
        "(?i)\\b(vp|vice president|head|director|chief|cto|ceo|cmo|founder)\\b",
        "@(gmail|yahoo|hotmail|outlook)\\.",
        "^[a-z0-9.-]+\\.(io|ai|dev)$",
        "(foo|bar)+",
        "(ab?)+",
        "(a|ab)*c",  # the two start alike, but "a" then "b" is read one way only
        "(a|\\w)+",  # single characters in alternation are one character class
        "^\\d{3,5}$",
        "\\w+\\s+\\w+",  # a space is no word character: one way to split
        "(?i)\\bhead\\s+of\\s+\\w+",
        "^.*(ceo|cto).*$",
        "[a-z]+[0-9]+",
    ],
)
def test_ordinary_regexes_load(pattern: str) -> None:
    fit = parse_playbook(_with_regex(pattern), source="nurture.yaml").scoring.fit
    assert fit[4].regex == pattern


def test_a_regex_that_does_not_compile_is_still_reported_as_such() -> None:
    """The backtracking check leaves broken patterns to the compile check's clearer message."""
    with pytest.raises(PlaybookError, match="does not compile"):
        parse_playbook(_with_regex("((a+)+"), source="nurture.yaml")
