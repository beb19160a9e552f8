"""The playbook: the shipped one is complete, and every kind of mistake names its key and line."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest

from nurture.errors import PlaybookError
from nurture.playbook import Playbook, Stage, load_playbook, parse_duration, parse_playbook
from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR

SHIPPED = PLAYBOOK_PATH.read_text()


def test_shipped_playbook_scores_the_documented_event_kinds(playbook: Playbook) -> None:
    for kind in (
        "page_view",
        "pricing_view",
        "form_submit",
        "webinar_attended",
        "demo_request",
        "email_open",
        "email_click",
        "purchase",
    ):
        assert kind in playbook.scoring.events
    assert playbook.scoring.events["unsubscribe"].points < 0


def test_every_transition_into_warm_hot_and_customer_starts_a_sequence(playbook: Playbook) -> None:
    for source in (Stage.cold, Stage.warm, Stage.hot):
        for target in (Stage.warm, Stage.hot, Stage.customer):
            if source != target:
                assert playbook.sequences_for(source, target), f"{source} → {target} sends nothing"


def test_shipped_sequences_have_several_steps(playbook: Playbook) -> None:
    assert max(len(s.steps) for s in playbook.sequences.values()) >= 3
    assert playbook.sequences["demo_offer"].steps[1].after == timedelta(days=2)


def test_version_changes_with_the_file() -> None:
    assert parse_playbook(SHIPPED).version != parse_playbook(SHIPPED + "\n# edited\n").version


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0h", timedelta(0)),
        ("90m", timedelta(minutes=90)),
        ("3d", timedelta(days=3)),
        ("1d12h", timedelta(days=1, hours=12)),
        ("2w", timedelta(weeks=2)),
    ],
)
def test_durations(value: str, expected: timedelta) -> None:
    assert parse_duration(value) == expected


@pytest.mark.parametrize("value", ["", "3", "3 days", "d3", "-1d", "1.5d"])
def test_bad_durations(value: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(value)


def _problems(text: str) -> str:
    with pytest.raises(PlaybookError) as caught:
        parse_playbook(text, source="nurture.yaml")
    return "\n".join(caught.value.problems)


def _line_of(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_unknown_key_is_named_with_its_line() -> None:
    broken = SHIPPED.replace("    form_submit: 10\n", "    form_submit: {pointz: 10}\n")
    assert f"nurture.yaml:{_line_of(broken, 'pointz')}: scoring.events.form_submit.pointz: unknown key" in _problems(
        broken
    )


def test_warm_must_be_below_hot() -> None:
    broken = SHIPPED.replace("warm: {enter_at: 40, leave_below: 30}", "warm: {enter_at: 80, leave_below: 30}")
    message = _problems(broken)
    line = _line_of(broken, "warm: {enter_at: 80")
    assert f"nurture.yaml:{line}: stages.warm.enter_at: warm.enter_at (80) must be below hot.enter_at (75)" in message


def test_leave_below_above_enter_at_is_rejected() -> None:
    broken = SHIPPED.replace("hot: {enter_at: 75, leave_below: 60}", "hot: {enter_at: 75, leave_below: 90}")
    line = _line_of(broken, "hot: {enter_at: 75")
    assert f"nurture.yaml:{line}: stages.hot.leave_below: must not be above enter_at" in _problems(broken)


def test_bad_step_delay_names_the_step() -> None:
    broken = SHIPPED.replace(
        "      - after: 3d\n        template: case_study", "      - after: three days\n        template: case_study"
    )
    message = _problems(broken)
    assert "sequences.welcome.steps.2.after: 'three days' is not a duration" in message
    assert f"nurture.yaml:{_line_of(broken, 'three days')}" in message


def test_impossible_trigger_is_rejected() -> None:
    broken = SHIPPED.replace("      - {to: customer}", "      - {from: customer, to: customer}")
    assert "customer is final" in _problems(broken)


def test_broken_regex_and_invalid_yaml() -> None:
    assert "does not compile" in _problems(SHIPPED.replace('regex: "@(gmail', 'regex: "@((gmail'))
    assert "nurture.yaml:2: not valid YAML: mapping values are not allowed here" in _problems(
        "brand: x\nscoring: half_life: 3d\nstages: {}\n"
    )


def test_unknown_template_is_named(tmp_path: Path) -> None:
    path = tmp_path / "nurture.yaml"
    path.write_text(SHIPPED.replace("template: check_in", "template: chek_in"))
    with pytest.raises(PlaybookError) as caught:
        load_playbook(path, templates_dir=TEMPLATES_DIR)
    (problem,) = caught.value.problems
    assert "sequences.still_evaluating.steps.0.template: template 'chek_in' has no" in problem
    assert f"{path}:{_line_of(path.read_text(), 'chek_in')}" in problem


def test_missing_file_is_a_playbook_error(tmp_path: Path) -> None:
    with pytest.raises(PlaybookError, match="cannot read the playbook"):
        load_playbook(tmp_path / "nope.yaml")


def _mutated(old: str, new: str) -> str:
    assert old in SHIPPED
    return SHIPPED.replace(old, new, 1)


# (what, the playbook, the line the problem is on, what it must say) — each of these used to load,
# or to raise something other than PlaybookError (RecursionError, OverflowError, ValueError).
BROKEN = [
    ("nested 3,000 deep", "brand: " + "[" * 3000 + "]" * 3000, 1, "nested more than 64 levels deep"),
    ("a century-long half-life", _mutated("half_life: 14d", "half_life: 99999999999999w"), 20, "longer than 3650d"),
    (
        "NaN points",
        _mutated("form_submit: 10", "form_submit: .nan"),
        25,
        "form_submit.points: Input should be a finite",
    ),
    ("an infinite threshold", _mutated("enter_at: 75", "enter_at: .inf"), 59, "hot.enter_at: Input should be a finite"),
    ("a threshold of 1e300", _mutated("enter_at: 75", "enter_at: 1e300"), 59, "less than or equal to 1000000"),
    (
        "a regex nested 2,000 deep",
        _mutated('regex: "@(gmail', 'regex: "' + "(" * 2000 + ")" * 2000 + "@(gmail"),
        51,
        "is too complex to compile",
    ),
    (
        "a sequence given twice",
        _mutated("  welcome:\n", "  win_back:\n"),
        _line_of(SHIPPED, "  win_back:"),
        f"sequences.win_back: given twice (first on line {_line_of(SHIPPED, '  welcome:')})",
    ),
    (
        "a 5,000-digit priority",
        _mutated("priority: 10", "priority: " + "9" * 5000),
        _line_of(SHIPPED, "priority: 10"),
        "a whole number of 5000",
    ),
    (
        "!!int abc",
        _mutated("priority: 10", "priority: !!int abc"),
        _line_of(SHIPPED, "priority: 10"),
        "'abc' is not a valid whole number",
    ),
    ("month 13", _mutated("half_life: 14d", "half_life: 2026-13-01"), 20, "not a valid date: month must be in 1..12"),
    ("a key typed !!int", _mutated("brand:", "!!int brand:"), 5, "brand: the key 'brand' is not a valid whole number"),
    ("a NUL", _mutated("Acme Analytics", "Acme\x00"), 6, "not valid YAML: special characters are not allowed"),
    (
        "a template name with braces",
        _mutated("template: welcome", 'template: "{x}"'),
        _line_of(SHIPPED, "template: welcome"),
        "is not a template name",
    ),
    (
        "an absolute template path",
        _mutated("template: welcome", "template: /etc/passwd"),
        _line_of(SHIPPED, "template: welcome"),
        "is not a template name",
    ),
    (
        "a template outside templates/",
        _mutated("template: welcome", "template: ../welcome"),
        _line_of(SHIPPED, "template: welcome"),
        "not a template name",
    ),
    (
        "a subject that does not parse",  # was reported by the template check, without file or line
        _mutated('subject: "See {{ brand.name }} on your own data"', 'subject: "See {{ brand.name }"'),
        _line_of(SHIPPED, "on your own data"),
        "sequences.demo_offer.steps.0.subject: not a valid template: unexpected '}'",
    ),
]


@pytest.mark.parametrize(("text", "line", "expected"), [case[1:] for case in BROKEN], ids=[c[0] for c in BROKEN])
def test_hostile_playbooks_are_refused_with_their_line(text: str, line: int, expected: str) -> None:
    problems = _problems(text)
    assert f"nurture.yaml:{line}: " in problems
    assert expected in problems


def test_an_alias_bomb_or_an_alias_to_itself_is_read_once(tmp_path: Path) -> None:
    """Nested aliases are walked once per node: eleven levels of nine is not 9^11 visits."""
    bomb = "l0: &l0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]\n" for i in range(1, 12)
    )
    assert f"nurture.yaml:{len((SHIPPED + chr(10)).splitlines()) + 1}: l0: unknown key" in _problems(
        SHIPPED + "\n" + bomb
    )
    assert "zz: unknown key" in _problems(SHIPPED + "\nzz: &a [*a]\n")


def test_a_playbook_that_is_not_utf8_is_named_with_its_line(tmp_path: Path) -> None:
    """It raised UnicodeDecodeError, a traceback from `nurture validate`."""
    path = tmp_path / "nurture.yaml"
    path.write_bytes(SHIPPED.replace("Acme Analytics", "Acmé Analytics").encode("latin-1", errors="replace"))
    with pytest.raises(PlaybookError, match=rf"{re.escape(str(path))}:6: not UTF-8 text \(byte \d+\)"):
        load_playbook(path)


@pytest.mark.parametrize(("text", "line"), [("", 1), ("# only a comment\n", 1), ("\n\n- brand\n", 3)])
def test_a_playbook_that_is_not_a_mapping_is_named_with_its_line(text: str, line: int) -> None:
    assert f"nurture.yaml:{line}: the playbook must be a mapping of keys" in _problems(text)


def test_points_too_small_to_mean_anything_are_refused_with_their_line() -> None:
    problems = _problems(SHIPPED.replace("form_submit: 10", "form_submit: 1.0e-300"))
    assert f"nurture.yaml:{_line_of(SHIPPED, 'form_submit: 10')}: scoring.events.form_submit.points" in problems
    assert "too small: write 0, or at least 1e-06" in problems
    assert (
        parse_playbook(SHIPPED.replace("form_submit: 10", "form_submit: 0")).scoring.events["form_submit"].points == 0
    )
