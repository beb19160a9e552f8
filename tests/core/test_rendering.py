"""Every template renders; HTML is escaped; a broken or footer-less template never goes out."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nurture.errors import TemplateError
from nurture.playbook import Playbook, parse_playbook
from nurture.rendering import EmailRenderer, sample_context
from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR


def _all_steps(playbook: Playbook) -> list[tuple[str, str]]:
    return [(step.template, step.subject) for seq in playbook.sequences.values() for step in seq.steps]


def test_every_template_renders_with_footer_and_both_parts(playbook: Playbook, renderer: EmailRenderer) -> None:
    files = {p.stem for p in TEMPLATES_DIR.glob("*.html") if not p.name.startswith("_")}
    assert files == playbook.template_names(), "every template is used by a sequence, and vice versa"
    context = sample_context(playbook)
    for template, subject in _all_steps(playbook):
        email = renderer.render(template=template, subject=subject, context=context)
        assert email.subject
        assert "\n" not in email.subject
        for part in (email.html, email.text):
            assert context["unsubscribe_url"] in part
            assert context["postal_address"] in part
        assert "<html" in email.html
        assert "<html" not in email.text
        assert "None" not in email.html + email.text


def test_names_are_escaped_in_html_and_plain_in_text(playbook: Playbook, renderer: EmailRenderer) -> None:
    context = sample_context(playbook)
    context["lead"]["first_name"] = "<script>alert(1)</script>"
    email = renderer.render(template="onboarding_welcome", subject="Hi {{ lead.first_name }}", context=context)
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in email.html
    assert "<script>" not in email.html
    assert "Welcome, <script>alert(1)</script>!" in email.text


def test_missing_profile_fields_render_as_nothing(playbook: Playbook, renderer: EmailRenderer) -> None:
    context = sample_context(playbook)
    context["lead"].update(first_name=None, company=None)
    email = renderer.render(template="demo_offer", subject="x", context=context)
    assert "Hi there," in email.text
    assert " for ," not in email.text


def _copy_templates(tmp_path: Path) -> Path:
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATES_DIR, target)
    return target


def test_an_undefined_variable_fails_the_render(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    (templates / "welcome.txt").write_text(
        '{% extends "_layout.txt" %}{% block body %}{{ lead.nickname }}{% endblock %}'
    )
    with pytest.raises(TemplateError, match=r"welcome\.txt: .*nickname"):
        EmailRenderer(templates).render(template="welcome", subject="x", context=sample_context(playbook))


def test_the_sandbox_blocks_python_internals(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    (templates / "welcome.txt").write_text("{{ lead.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(TemplateError):
        EmailRenderer(templates).render(template="welcome", subject="x", context=sample_context(playbook))


def test_check_reports_syntax_errors_with_line_and_a_dropped_footer(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    (templates / "case_study.html").write_text("<p>hello</p>\n<p>{% if %}</p>\n")
    (templates / "win_back.html").write_text("<html><body><p>No footer here</p></body></html>\n")
    problems = EmailRenderer(templates).check(playbook)
    assert any(p.startswith(f"{templates / 'case_study.html'}:2:") for p in problems)
    assert any(f"{templates / 'win_back.html'}: must extend the layout" in p for p in problems)


def test_shipped_templates_pass_the_check(playbook: Playbook, renderer: EmailRenderer) -> None:
    assert renderer.check(playbook) == []


# ---------------------------------------------------------------------------------------------
# Errors name the file and the line.


def test_where_a_playbook_came_from_is_not_part_of_what_it_says(playbook: Playbook) -> None:
    text = PLAYBOOK_PATH.read_text()
    elsewhere = parse_playbook(text, source="copy/of/nurture.yaml")
    assert elsewhere == playbook
    assert elsewhere.version == playbook.version
    lines = text.splitlines()
    first_step = lines.index("      - after: 0h", lines.index("  welcome:"))
    assert elsewhere.source.where("sequences", "welcome", "steps", "0", "subject") == (
        f"copy/of/nurture.yaml:{first_step + 3}: sequences.welcome.steps.0.subject"
    )
    assert elsewhere.source.where("sequences", "welcome", "no_such_key") == (
        f"copy/of/nurture.yaml:{lines.index('  welcome:') + 1}: sequences.welcome.no_such_key"
    )
    assert Playbook.model_validate(playbook.model_dump()).source.where("brand") == "brand"
