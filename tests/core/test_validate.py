"""`nurture validate` as a compiler: each typo that hurts is caught at its file and line, with a suggestion."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nurture.diagnostics import Problem
from nurture.importing import LEAD_COLUMNS
from nurture.playbook import parse_playbook
from nurture.playbook_checks import PROVIDER_EVENT_KINDS, reachable_steps
from nurture.rendering import EmailRenderer, sample_context, sparse_context
from nurture.validation import Report, validate_files
from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR

SHIPPED = PLAYBOOK_PATH.read_text()


def _line_of(text: str, fragment: str, start: int = 0) -> int:
    return text[: text.index(fragment, start)].count("\n") + 1


@pytest.fixture
def project(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the shipped playbook and templates to break."""
    templates = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, templates)
    playbook = tmp_path / "nurture.yaml"
    playbook.write_text(SHIPPED)
    return playbook, templates


def _edited(path: Path, old: str, new: str) -> str:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, 1))
    return path.read_text()


def _only(report: Report) -> Problem:
    assert len(report.problems) == 1, "\n".join(map(str, report.problems))
    return report.problems[0]


def test_the_shipped_playbook_and_templates_are_clean() -> None:
    report = validate_files(PLAYBOOK_PATH, TEMPLATES_DIR)
    assert report.ok, "\n".join(map(str, report.problems))
    assert report.summary["sequences"] == len(report.playbook.sequences) if report.playbook else False


# ---------------------------------------------------------------------------------------------
# The playbook


def test_a_misspelt_customer_event_is_caught_at_its_line(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    text = _edited(playbook, "customer: {on_events: [purchase]}", "customer: {on_events: [purchse]}")
    problem = _only(validate_files(playbook, templates))
    assert str(problem) == (
        f"{playbook}:{_line_of(text, 'purchse')}: stages.customer.on_events.0: 'purchse' is not an event kind "
        "anything sends (did you mean 'purchase'?)"
    )
    assert problem.suggestion == "purchase"


def test_a_misspelt_scoring_weight_is_caught(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    text = _edited(playbook, "page_view: {points: 1", "page_veiw: {points: 1")
    problem = _only(validate_files(playbook, templates))
    assert (problem.file, problem.line, problem.key) == (
        str(playbook),
        _line_of(text, "page_veiw"),
        "scoring.events.page_veiw",
    )
    assert problem.message == "'page_veiw' is not an event kind anything sends (did you mean 'page_view'?)"


def test_goal_and_condition_kinds_nothing_sends_are_caught(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(playbook, "goal: {events: [demo_request]}", "goal: {events: [demo_requets]}")
    text = _edited(playbook, "unless: {event: webinar_attended}", "unless: {event: webinar_atended}")
    keys = {p.key: p for p in validate_files(playbook, templates).problems}
    assert keys["sequences.welcome.goal.events.0"].suggestion == "demo_request"
    unless = keys["sequences.welcome.steps.3.unless.event"]
    assert (unless.line, unless.suggestion) == (_line_of(text, "webinar_atended"), "webinar_attended")


def test_a_kind_listed_in_known_events_or_stored_in_the_database_is_known(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(playbook, "goal: {events: [demo_request]}", "goal: {events: [contract_signed]}")
    problem = _only(validate_files(playbook, templates))
    assert "add it to known_events" in problem.message
    assert validate_files(playbook, templates, stored_event_kinds={"contract_signed"}).ok
    _edited(playbook, "brand:\n", "known_events: [contract_signed]\n\nbrand:\n")
    assert validate_files(playbook, templates).ok


def test_sendgrid_kinds_are_known_without_being_scored() -> None:
    assert {"email_open", "email_click", "bounce", "unsubscribe", "spamreport", "email_machine_open"} == set(
        PROVIDER_EVENT_KINDS
    )


def test_a_fit_rule_on_a_field_leads_do_not_have_is_caught(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    text = _edited(playbook, "field: company_size", "field: companysize")
    problem = _only(validate_files(playbook, templates))
    assert (problem.line, problem.key, problem.suggestion) == (
        _line_of(text, "companysize"),
        "scoring.fit.1.field",
        "company_size",
    )
    assert problem.message.endswith("(did you mean 'company_size'?)")


def test_any_attribute_is_a_field_a_fit_rule_may_use(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(playbook, "field: attributes.industry", "field: attributes.anything_at_all")
    assert validate_files(playbook, templates).ok


def test_the_core_list_of_lead_fields_is_the_lead_table_s() -> None:
    from db.cycle import PROFILE_COLUMNS
    from db.models import Lead

    assert (*LEAD_COLUMNS, "attributes") == PROFILE_COLUMNS
    assert set(PROFILE_COLUMNS) <= set(Lead.model_fields)


def test_a_key_given_twice_is_reported_with_both_lines(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    text = _edited(playbook, "    form_submit: 10\n", "    form_submit: 10\n    purchase: 5\n")
    problem = _only(validate_files(playbook, templates))
    first, again = _line_of(text, "purchase: 5\n"), _line_of(text, "purchase: 50")
    assert str(problem) == (
        f"{playbook}:{again}: scoring.events.purchase: given twice (first on line {first}); keep one"
    )


def test_a_step_no_branch_leads_to_is_unreachable(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    text = _edited(playbook, "else: welcome_nudge", "else: end")
    problem = _only(validate_files(playbook, templates))
    assert problem.key == "sequences.welcome.steps.1"
    assert problem.line == _line_of(text, "template: welcome_nudge") - 1
    assert "step 'welcome_nudge' is never sent" in problem.message


def test_reachable_steps_follow_branches_and_skips() -> None:
    text = SHIPPED.replace("else: welcome_nudge", "else: end")
    welcome = parse_playbook(text).sequences["welcome"]
    assert reachable_steps(welcome) == {0, 2, 3}
    assert reachable_steps(parse_playbook(SHIPPED).sequences["welcome"]) == {0, 1, 2, 3}


def test_a_sequence_without_steps_or_customer_events_never_runs(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(playbook, "customer: {on_events: [purchase]}", "customer: {on_events: []}")
    keys = {p.key for p in validate_files(playbook, templates).problems}
    assert {"stages.customer.on_events", "sequences.onboarding.triggers"} <= keys
    check_in = "    steps:\n      - after: 1d\n        template: check_in\n"
    text = SHIPPED.replace(check_in, "    steps: []\n").replace(
        "        subject: \"Still weighing your options, {{ lead.first_name or 'there' }}?\"\n", "", 1
    )
    text = text.replace('        preheader: "No pressure. If something is in the way, tell us what it is."\n', "", 1)
    playbook.write_text(text)
    problem = _only(validate_files(playbook, templates))
    assert (problem.key, problem.line) == ("sequences.still_evaluating.steps", _line_of(text, "steps: []"))


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        (
            "warm: {enter_at: 40, leave_below: 30}",
            "warm: {enter_at: 40, leave_below: 40}",
            "stages.warm.leave_below",
            "no margin",
        ),
        (
            "warm: {enter_at: 40, leave_below: 30}",
            "warm: {enter_at: 0, leave_below: -5}",
            "stages.warm.enter_at",
            "every new lead",
        ),
        (
            "hot: {enter_at: 75, leave_below: 60}",
            "hot: {enter_at: 75, leave_below: 35}",
            "stages.hot.leave_below",
            "not even warm",
        ),
        (
            "warm: {enter_at: 40, leave_below: 30}",
            "warm: {enter_at: 80, leave_below: 30}",
            "stages.warm.enter_at",
            "must be below hot.enter_at",
        ),
        (
            "warm: {enter_at: 40, leave_below: 30}",
            "warm: {enter_at: 40, leave_below: 45}",
            "stages.warm.leave_below",
            "must not be above",
        ),
    ],
)
def test_contradictory_thresholds_are_caught(
    project: tuple[Path, Path], old: str, new: str, key: str, words: str
) -> None:
    playbook, templates = project
    text = _edited(playbook, old, new)
    problem = _only(validate_files(playbook, templates))
    assert problem.key == key
    assert words in problem.message
    assert problem.line == _line_of(text, new)


def test_a_send_window_inside_quiet_hours_never_opens(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    text = _edited(
        playbook, 'quiet_hours: {start: "21:00", end: "08:00"}', 'quiet_hours: {start: "20:00", end: "09:00"}'
    )
    text = _edited(playbook, 'between: ["08:00", "20:00"]}\n\nsequences', 'between: ["08:00", "09:00"]}\n\nsequences')
    problem = _only(validate_files(playbook, templates))
    assert problem.key == "contact_policy.send_window.between"
    assert problem.line == _line_of(text, '["08:00", "09:00"]')
    assert "lies inside quiet hours" in problem.message


def test_a_window_with_no_days_is_refused(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(playbook, "send_window: {days: [mon, tue, wed, thu, fri],", "send_window: {days: [],")
    problem = _only(validate_files(playbook, templates))
    assert problem.key == "contact_policy.send_window.days"


# ---------------------------------------------------------------------------------------------
# Templates


def test_a_misspelt_lead_field_is_caught_at_the_template_line(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(templates / "welcome.html", 'lead.first_name or "there"', "lead.compnay")
    problem = _only(validate_files(playbook, templates))
    assert str(problem) == f"{templates}/welcome.html:3: lead has no field 'compnay' (did you mean 'company'?)"
    assert problem.suggestion == "company"


def test_a_field_only_some_leads_have_must_be_guarded(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(templates / "welcome.html", 'lead.first_name or "there"', "lead.company.upper()")
    problem = _only(validate_files(playbook, templates))
    assert (problem.file, problem.line) == (f"{templates}/welcome.html", 3)
    assert problem.message.startswith("lead.company can be empty, and then this line fails")
    assert problem.suggestion == "{{ lead.company or '' }}"
    _edited(templates / "welcome.html", "lead.company.upper()", "(lead.company or 'your team').upper()")
    assert validate_files(playbook, templates).ok


def test_an_attribute_reads_as_empty_when_a_lead_lacks_it(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(templates / "welcome.html", 'lead.first_name or "there"', 'lead.attributes.industry or "there"')
    assert validate_files(playbook, templates).ok
    renderer = EmailRenderer(templates)
    pb = parse_playbook(SHIPPED)
    assert "Hi software," in renderer.render(template="welcome", subject="x", context=sample_context(pb)).html
    assert "Hi there," in renderer.render(template="welcome", subject="x", context=sparse_context(pb)).html
    _edited(templates / "welcome.html", 'lead.attributes.industry or "there"', "lead.attributes.industry.title()")
    problem = _only(validate_files(playbook, templates))
    assert "lead.attributes.industry can be empty" in problem.message


def test_a_broken_layout_is_reported_once_at_its_own_line(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    layout = (templates / "_layout.html").read_text()
    (templates / "_layout.html").write_text("<!-- header -->\n{{ brand.nmae }}\n" + layout)
    problem = _only(validate_files(playbook, templates))
    assert str(problem) == f"{templates}/_layout.html:2: brand has no 'nmae' (did you mean 'name'?)"
    (templates / "_layout.html").write_text("<!-- header -->\n{{ lead.first_name.upper() }}\n" + layout)
    problem = _only(validate_files(playbook, templates))
    assert (problem.file, problem.line) == (f"{templates}/_layout.html", 2)
    (templates / "_layout.html").write_text("<!-- header -->\n{% if %}\n" + layout)
    problem = _only(validate_files(playbook, templates))
    assert (problem.file, problem.line) == (f"{templates}/_layout.html", 2)


def test_a_missing_footer_in_the_text_part_is_caught_once_at_the_layout(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(templates / "_layout.txt", "{{ unsubscribe_url }}\n", "")
    problem = _only(validate_files(playbook, templates))
    assert problem.file == f"{templates}/_layout.txt"
    assert "compliance footer is missing" in problem.message


def test_unknown_names_and_links_have_suggestions(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(templates / "welcome.html", "{{ links.docs }}", "{{ links.doc }}")
    _edited(templates / "check_in.txt", "{% block body %}", "{% block body %}{{ leed.email }}")
    messages = [p.message for p in validate_files(playbook, templates).problems]
    assert "links has no 'doc' (did you mean 'docs'?)" in messages
    assert "there is no 'leed' in an email (did you mean 'lead'?)" in messages


def test_a_subject_typo_is_reported_at_the_playbook_line(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    text = _edited(
        playbook, 'subject: "Should we stop writing?"', 'subject: "Should we stop writing, {{ lead.frist_name }}?"'
    )
    problem = _only(validate_files(playbook, templates))
    assert (problem.file, problem.line, problem.key) == (
        str(playbook),
        _line_of(text, "frist_name"),
        "sequences.win_back.steps.1.subject",
    )
    assert problem.suggestion == "first_name"


def test_every_problem_at_once_sorted_by_file_and_line(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(playbook, "field: company_size", "field: companysize")
    _edited(playbook, "page_view: {points: 1", "page_veiw: {points: 1")
    _edited(templates / "welcome.html", 'lead.first_name or "there"', "lead.compnay")
    problems = validate_files(playbook, templates).problems
    assert len(problems) == 3
    assert [(p.file, p.line) for p in problems] == sorted((p.file, p.line or 0) for p in problems)


def test_a_playbook_that_does_not_load_is_reported_without_raising(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(playbook, "half_life: 14d", "half_life: fortnight")
    problem = _only(validate_files(playbook, templates))
    assert (problem.key, problem.line) == ("scoring.half_life", _line_of(SHIPPED, "half_life"))
    assert report_json_shape(validate_files(playbook, templates))


def report_json_shape(report: Report) -> bool:
    data = report.to_json()
    return set(data) == {"ok", "problems", "summary"} and all(
        set(p) == {"file", "line", "key", "message", "suggestion"} for p in data["problems"]
    )


def test_a_typo_early_in_the_layout_does_not_hide_a_problem_further_on(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    layout = templates / "_layout.html"
    layout.write_text("{{ brand.nmae }}\n" + layout.read_text())
    _edited(templates / "check_in.html", 'lead.first_name or "there"', "lead.company.upper()")
    problems = validate_files(playbook, templates).problems
    assert [(p.file, p.line) for p in problems] == [(f"{templates}/_layout.html", 1), (f"{templates}/check_in.html", 3)]


def test_mapping_methods_and_names_a_template_binds_itself_are_not_typos(project: tuple[Path, Path]) -> None:
    playbook, templates = project
    _edited(
        templates / "check_in.html",
        "{% block body %}",
        "{% block body %}<p>{{ lead.get('company') or 'your team' }}</p>"
        "{% for name, url in links.items() %}<a href='{{ url }}'>{{ name }}</a>{% endfor %}"
        "{% for lead in ['x'] %}{{ lead.upper() }}{% endfor %}",
    )
    assert validate_files(playbook, templates).problems == []
