"""`nurture validate` as a marketer and a pre-commit hook run it: a real process, one line per problem."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.cli.runner import line_of
from tests.cli.runner import run_in_checkout as nurture
from tests.conftest import PLAYBOOK_PATH, ROOT

SHIPPED = PLAYBOOK_PATH.read_text()


def test_the_shipped_playbook_is_clean(project: Path) -> None:
    result = nurture("validate", cwd=project, expect=0)
    assert result.stdout.startswith("ok nurture.yaml (version ")
    assert result.stderr == ""


def test_every_typo_of_a_change_is_reported_at_once_one_line_each(project: Path) -> None:
    text = (
        SHIPPED.replace("customer: {on_events: [purchase]}", "customer: {on_events: [purchse]}")
        .replace("page_view: {points: 1", "page_veiw: {points: 1")
        .replace("field: company_size", "field: companysize")
    )
    (project / "nurture.yaml").write_text(text)
    welcome = project / "templates" / "welcome.html"
    welcome.write_text(welcome.read_text().replace('lead.first_name or "there"', "lead.compnay"))
    check_in = project / "templates" / "check_in.html"
    check_in.write_text(check_in.read_text().replace('lead.first_name or "there"', "lead.company.upper()"))

    result = nurture("validate", cwd=project, expect=1)
    lines = result.stderr.splitlines()
    assert lines == [
        f"nurture.yaml:{line_of(text, 'page_veiw')}: scoring.events.page_veiw: 'page_veiw' is not an event kind "
        "anything sends (did you mean 'page_view'?)",
        f"nurture.yaml:{line_of(text, 'companysize')}: scoring.fit.1.field: lead has no field 'companysize', so this "
        "rule never matches (did you mean 'company_size'?)",
        f"nurture.yaml:{line_of(text, 'purchse')}: stages.customer.on_events.0: 'purchse' is not an event kind "
        "anything sends (did you mean 'purchase'?)",
        "templates/check_in.html:3: lead.company can be empty, and then this line fails ('None' has no attribute "
        "'upper'); guard it: {{ lead.company or '' }} or {% if lead.company %}…{% endif %}",
        "templates/welcome.html:3: lead has no field 'compnay' (did you mean 'company'?)",
        "5 problems in nurture.yaml and templates/",
    ]
    assert result.stdout == ""


def test_json_report(project: Path) -> None:
    layout = project / "templates" / "_layout.html"
    layout.write_text("{{ brand.nmae }}\n" + layout.read_text())
    result = nurture("validate", "--json", cwd=project, expect=1)
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert report["problems"] == [
        {
            "file": "templates/_layout.html",
            "line": 1,
            "key": None,
            "message": "brand has no 'nmae' (did you mean 'name'?)",
            "suggestion": "name",
        }
    ]
    assert report["summary"]["problems"] == 1
    assert report["summary"]["sequences"] == 5

    clean = json.loads(nurture("validate", "--json", cwd=project / "..", expect=1).stdout)
    assert clean["ok"] is False  # no playbook there: a problem, reported as JSON too
    assert "cannot read the playbook" in clean["problems"][0]["message"]


def test_duplicate_keys_fail_the_check_with_both_lines(project: Path) -> None:
    text = SHIPPED.replace("    form_submit: 10\n", "    form_submit: 10\n    form_submit: 12\n")
    (project / "nurture.yaml").write_text(text)
    result = nurture("validate", cwd=project, expect=1)
    first = line_of(text, "form_submit: 10")
    assert result.stderr.splitlines()[0] == (
        f"nurture.yaml:{first + 1}: scoring.events.form_submit: given twice (first on line {first}); keep one"
    )


def test_an_attribute_in_a_template_is_accepted(project: Path) -> None:
    welcome = project / "templates" / "welcome.html"
    welcome.write_text(
        welcome.read_text().replace('lead.first_name or "there"', '(lead.attributes.industry or "there") | title')
    )
    nurture("validate", cwd=project, expect=0)


def test_the_pre_commit_hook_runs_validate_on_the_playbook_and_templates() -> None:
    import yaml

    hooks = yaml.safe_load((ROOT / ".pre-commit-hooks.yaml").read_text())
    hook = next(h for h in hooks if h["id"] == "nurture-validate")
    assert hook["entry"] == "nurture validate"
    assert hook["pass_filenames"] is False
    for changed, runs in (("nurture.yaml", True), ("templates/welcome.html", True), ("README.md", False)):
        assert bool(re.search(hook["files"], changed)) is runs


def test_validate_loads_no_database_nor_prefect(project: Path) -> None:
    """A pre-commit hook must be quick and run where no database is: the heavy layers stay out."""
    result = nurture("validate", cwd=project, expect=0, python=("-X", "importtime"))
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "nurture" in imported
    assert not imported & {"prefect", "sqlalchemy", "sqlmodel", "db", "flows", "sendgrid", "fastapi"}


def test_with_database_the_stored_event_kinds_are_known(project: Path) -> None:
    env = {"NURTURE_DATABASE_URL": f"sqlite:///{project / 'nurture.db'}"}
    nurture("db", "upgrade", cwd=project, expect=0, env=env)
    events = project / "events.csv"
    events.write_text("email,kind,occurred_at\nann@northwind.example,contract_signed,2026-11-01T10:00:00Z\n")
    nurture("import", "events", str(events), cwd=project, expect=0, env=env)
    text = SHIPPED.replace("goal: {events: [demo_request]}", "goal: {events: [contract_signed]}")
    (project / "nurture.yaml").write_text(text)

    alone = nurture("validate", cwd=project, expect=1, env=env)
    assert alone.stderr.splitlines()[0] == (
        f"nurture.yaml:{line_of(text, 'contract_signed')}: sequences.welcome.goal.events.0: 'contract_signed' is "
        "not an event kind anything sends; if your website or imports send it, add it to known_events at the top "
        "of the playbook"
    )
    nurture("validate", "--database", cwd=project, expect=0, env=env)
