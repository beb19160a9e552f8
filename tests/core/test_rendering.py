"""Every template renders; HTML is escaped; a broken or footer-less template never goes out."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from nurture.errors import PlaybookError, TemplateError
from nurture.playbook import Playbook, parse_playbook
from nurture.rendering import EmailRenderer, RenderLimits, sample_context
from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR


def _all_steps(playbook: Playbook) -> list[tuple[str, str]]:
    return [
        (template, subject)
        for seq in playbook.sequences.values()
        for step in seq.steps
        for _variant, template, subject in step.contents()
    ]


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
    assert f"{templates / 'win_back.html'}: the compliance footer is missing: extend the layout" in "\n".join(problems)


def test_shipped_templates_pass_the_check(playbook: Playbook, renderer: EmailRenderer) -> None:
    assert renderer.check(playbook) == []


# ---------------------------------------------------------------------------------------------
# Templates are read only from regular files inside the templates folder.

SECRET = "canary-5ecret-in-a-file-outside"


def _with_body(
    templates: Path, name: str, body: str, *, txt: str = "{{ unsubscribe_url }} {{ postal_address }}\n"
) -> None:
    """An email ``name`` whose HTML part extends the layout with ``body``."""
    (templates / f"{name}.html").write_text("{% extends '_layout.html' %}{% block body %}" + body + "{% endblock %}")
    (templates / f"{name}.txt").write_text(txt)


def test_a_link_to_a_file_outside_the_folder_is_refused_where_it_is_included(
    playbook: Playbook, tmp_path: Path
) -> None:
    templates = _copy_templates(tmp_path)
    outside = tmp_path / "outside.txt"
    outside.write_text(SECRET)
    (templates / "env.txt").symlink_to(outside)
    (templates / "welcome.html").write_text(
        "{% extends '_layout.html' %}{% block body %}\n<p>Hi</p>\n{% include 'env.txt' %}{% endblock %}"
    )
    renderer = EmailRenderer(templates)

    with pytest.raises(TemplateError) as caught:
        renderer.render(template="welcome", subject="Hi", context=sample_context(playbook))
    message = str(caught.value)
    assert message.startswith("welcome.html: template 'env.txt' is refused: it leads to ")
    assert f"{outside.resolve()}, outside the templates folder {templates.resolve()}" in message
    assert message.endswith("(line 3)")
    assert SECRET not in message
    assert renderer.check(playbook) == [
        f"{templates.resolve() / 'welcome.html'}:3: template 'env.txt' is refused: it leads to "
        f"{outside.resolve()}, outside the templates folder {templates.resolve()}; only files inside it can be used"
    ]


# Linux has /proc (this machine and CI run it); elsewhere a link to a folder outside is refused
# by the test above, and this one, about a file that is not a regular file, has nothing to link to.
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="no /proc/self/environ: not Linux")
def test_a_link_to_the_process_environment_puts_no_secret_in_an_email(
    playbook: Playbook, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NURTURE_SECRET_KEY", SECRET)
    templates = _copy_templates(tmp_path)
    (templates / "env.txt").symlink_to("/proc/self/environ")
    (templates / "welcome.txt").write_text(
        "{% extends '_layout.txt' %}{% block body %}{% include 'env.txt' %}{% endblock %}"
    )
    with pytest.raises(
        TemplateError, match=r"^welcome\.txt: template 'env\.txt' is refused: it leads to /proc/"
    ) as caught:
        EmailRenderer(templates).render(template="welcome", subject="Hi", context=sample_context(playbook))
    assert SECRET not in str(caught.value)


def test_a_template_named_by_the_playbook_or_reached_through_a_linked_folder_is_refused(
    playbook: Playbook, tmp_path: Path
) -> None:
    templates = _copy_templates(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "footer.html").write_text(SECRET)
    (templates / "parts").symlink_to(elsewhere, target_is_directory=True)
    (templates / "case_study.html").unlink()
    (templates / "case_study.html").symlink_to(elsewhere / "footer.html")
    _with_body(templates, "win_back", "{% include 'parts/footer.html' %}")
    renderer = EmailRenderer(templates)

    for template, refused in (("case_study", "case_study.html"), ("win_back", "parts/footer.html")):
        with pytest.raises(TemplateError, match=rf"template '{refused}' is refused: it leads to .*outside") as caught:
            renderer.render(template=template, subject="Hi", context=sample_context(playbook))
        assert SECRET not in str(caught.value)
    problems = renderer.check(playbook)
    assert any(
        p.startswith(f"{templates.resolve() / 'case_study.html'}: template 'case_study.html' is refused")
        for p in problems
    )
    assert any(
        p.startswith(f"{templates.resolve() / 'win_back.html'}:1: template 'parts/footer.html' is refused")
        for p in problems
    )


def test_a_link_to_another_template_inside_the_folder_keeps_working(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    (templates / "shared").mkdir()
    (templates / "shared" / "signoff.html").write_text("<p>The {{ brand.name }} team</p>")
    (templates / "signoff.html").symlink_to(templates / "shared" / "signoff.html")
    _with_body(templates, "welcome", "{% include 'signoff.html' %}")
    renderer = EmailRenderer(templates)
    email = renderer.render(template="welcome", subject="Hi", context=sample_context(playbook))
    assert f"<p>The {playbook.brand.name} team</p>" in email.html
    assert renderer.check(playbook) == []


def test_a_fifo_or_a_folder_where_a_template_should_be_is_refused_not_waited_on(
    playbook: Playbook, tmp_path: Path
) -> None:
    templates = _copy_templates(tmp_path)
    os.mkfifo(templates / "pipe.txt")
    (templates / "folder.txt").mkdir()
    for included, kind in (("pipe.txt", "a FIFO"), ("folder.txt", "a directory")):
        (templates / "welcome.txt").write_text(
            "{% extends '_layout.txt' %}{% block body %}{% include '" + included + "' %}{% endblock %}"
        )
        renderer = EmailRenderer(templates)
        with pytest.raises(TemplateError, match=rf"template '{included}' is refused: it is {kind}, not a regular file"):
            renderer.render(template="welcome", subject="Hi", context=sample_context(playbook))
        where = templates.resolve() / "welcome.txt"
        assert renderer.check(playbook) == [
            f"{where}:1: template '{included}' is refused: it is {kind}, not a regular file"
        ]


def test_a_template_file_larger_than_the_limit_is_refused(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    _with_body(templates, "welcome", "<p>" + "x" * 1_000_001 + "</p>")
    with pytest.raises(TemplateError, match=r"template 'welcome\.html' is refused: it is larger than 1,000,000 bytes"):
        EmailRenderer(templates).render(template="welcome", subject="Hi", context=sample_context(playbook))


def test_check_reports_a_syntax_error_in_the_layout_with_its_line(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    (templates / "_layout.html").write_text("<html>\n{% block body %}{% endblock %}\n{% if %}\n</html>")
    problems = EmailRenderer(templates).check(playbook)
    assert problems == [
        f"{templates.resolve() / '_layout.html'}:3: Expected an expression, got 'end of statement block'"
    ]


# ---------------------------------------------------------------------------------------------
# The sandbox is immutable.


def test_a_template_cannot_change_the_lists_and_dicts_it_is_given(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    context = sample_context(playbook)
    renderer = EmailRenderer(templates)
    for body in (
        "{{ lead.attributes.update({'plan': 'free'}) }}",
        "{{ lead.attributes.setdefault('plan', 'free') }}",
        "{% set tags = [] %}{{ tags.append(lead.email) }}{{ tags }}",
        "{{ links.clear() }}",
    ):
        _with_body(templates, "welcome", body)
        with pytest.raises(
            TemplateError,
            match=r"^welcome\.html: access to attribute '\w+' of '(dict|list|LeadAttributes)' object is unsafe",
        ):
            renderer.render(template="welcome", subject="Hi", context=context)
    assert context["lead"]["attributes"] == {"industry": "software", "plan": "trial"}
    assert context["links"] == dict(playbook.links)


# ---------------------------------------------------------------------------------------------
# Errors name the file and the line.


def test_a_render_error_names_the_line_and_the_file_it_is_in(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    (templates / "welcome.html").write_text(
        "{% extends '_layout.html' %}\n{% block body %}\n<p>Hi</p>\n<p>{{ lead.nickname }}</p>\n{% endblock %}\n"
    )
    layout = (templates / "_layout.txt").read_text().splitlines()
    (templates / "_layout.txt").write_text("\n".join(["{{ brand.slogan }}", *layout]))
    renderer = EmailRenderer(templates)
    with pytest.raises(TemplateError, match=r"^welcome\.html: lead has no field 'nickname' \(line 4\)$"):
        renderer.render(template="welcome", subject="Hi", context=sample_context(playbook))
    with pytest.raises(TemplateError, match=r"^case_study\.txt: .*'slogan' \(line 1 of _layout\.txt\)$"):
        renderer.render(template="case_study", subject="Hi", context=sample_context(playbook))


def _with_subject(playbook: Playbook, sequence: str, step: int, subject: str) -> Playbook:
    """The playbook with one subject changed, unvalidated (as a subject the playbook's own check would refuse)."""
    seq = playbook.sequences[sequence]
    steps = list(seq.steps)
    steps[step] = steps[step].model_copy(update={"subject": subject})
    changed = seq.model_copy(update={"steps": tuple(steps)})
    return playbook.model_copy(update={"sequences": {**playbook.sequences, sequence: changed}})


def test_check_names_the_playbook_line_of_a_subject_that_fails(playbook: Playbook, renderer: EmailRenderer) -> None:
    line = PLAYBOOK_PATH.read_text().splitlines().index('        subject: "Live: the product activation playbook"') + 1
    at = f"{PLAYBOOK_PATH}:{line}: sequences.welcome.steps.3.subject"
    assert playbook.sequences["welcome"].steps[3].subject == "Live: the product activation playbook"

    renders_badly = _with_subject(playbook, "welcome", 3, "Live: {{ lead.nickname }}")
    assert renderer.check(renders_badly) == [
        f"{at}: lead has no field 'nickname'; an imported column is lead.attributes.nickname"
    ]
    too_big = _with_subject(playbook, "welcome", 3, "{{ 'Live' * 30000 }}")
    assert renderer.check(too_big) == [
        f"{at}: the * operator would produce 120,000 characters (at most 100,000) (for a sample lead)"
    ]
    does_not_parse = _with_subject(playbook, "welcome", 3, "Live: {{ lead.first_name ")
    assert renderer.check(does_not_parse) == [f"{at}: unexpected end of template, expected 'end of print statement'."]


def test_where_a_playbook_came_from_is_not_part_of_what_it_says(playbook: Playbook) -> None:
    text = PLAYBOOK_PATH.read_text()
    elsewhere = parse_playbook(text, source="copy/of/nurture.yaml")
    assert elsewhere == playbook
    assert elsewhere.version == playbook.version
    lines = text.splitlines()
    first_step = lines.index("      - after: 0h", lines.index("  demo_offer:"))
    assert elsewhere.source.where("sequences", "demo_offer", "steps", "0", "subject") == (
        f"copy/of/nurture.yaml:{first_step + 3}: sequences.demo_offer.steps.0.subject"
    )
    assert elsewhere.source.where("sequences", "welcome", "no_such_key") == (
        f"copy/of/nurture.yaml:{lines.index('  welcome:') + 1}: sequences.welcome.no_such_key"
    )
    assert Playbook.model_validate(playbook.model_dump()).source.where("brand") == "brand"


# ---------------------------------------------------------------------------------------------
# Each email renders on a budget (RenderLimits).

# A payload cheap enough for Jinja's own sandbox to render, each just past a default limit
# (RenderLimits()): refused with what was asked and the line that asked it.
PAST_THE_DEFAULTS = [
    ("{% for i in range(400) %}{% for j in range(400) %}x{% endfor %}{% endfor %}", r"runs more than 100,000 steps"),
    (
        "{% macro m(n) %}{% if n %}{{ m(n - 1) }}{{ m(n - 1) }}{% endif %}{% endmacro %}{{ m(17) }}",
        r"runs more than 100,000 steps",
    ),
    (
        "{% for x in [0, 1] recursive %}{{ loop(range(60000)) if loop.depth == 1 else '' }}{% endfor %}",
        r"runs more than 100,000 steps",
    ),
    ("{{ 'a' * 100001 }}", r"the \* operator would produce 100,001 characters \(at most 100,000\)"),
    ("{{ ([0] * 100001)|length }}", r"the \* operator would produce 100,001 items \(at most 100,000\)"),
    ("{{ 10 ** 5000 > 0 }}", r"the \*\* operator would produce a number of more than 4,300 digits"),
    ("{{ (10 ** 4000) * (10 ** 400) > 0 }}", r"the \* operator would produce a number of more than 4,300 digits"),
    ("{{ 'x'|center(100001) }}", r"\|center would produce 100,001 characters"),
    ("{{ 'x'.rjust(100001) }}", r"\.rjust\(\) would produce 100,001 characters"),
    ("{{ '%100001d' % 1 }}", r"the % operator would produce 100,001 characters"),
    ("{{ '%100001d'|format(1) }}", r"\|format would produce 100,001 characters"),
    ("{{ '{:>100001}'.format(1) }}", r"\.format\(\) would produce 100,001 characters"),
    ("{{ '{:>{w}}'.format(1, w=9) }}", r"\.format\(\): a width or precision taken from the arguments is not allowed"),
    ("{{ ('x\\n' * 20000)|indent(50) }}", r"\|indent would produce 1,040,050 characters"),
    ("{{ ('ab' * 50000)|replace('a', 'aaaaaaaaaaaaaaaaaaaaa') }}", r"\|replace would produce 1,100,000 characters"),
    ("{{ ('ab' * 50000).replace('a', 'aaaaaaaaaaaaaaaaaaaaa') }}", r"\.replace\(\) would produce 1,100,000 characters"),
    ("{{ [1]|batch(100001, 0)|list|length }}", r"\|batch would produce 100,001 items"),
    ("{{ lipsum(n=2000, max=100) }}", r"lipsum\(\) would produce 200,000 words"),
    ("{{ (7).to_bytes(100001, 'big')|length }}", r"\.to_bytes\(\) would produce 100,001 bytes"),
    ("{{ 2.5|round(5000, 'floor') }}", r"\|round: precision must be between -4,300 and 4,300"),
    ("{{ [[1], [2]]|sum(start=[]) }}", r"\|sum: start must be a number"),
    (
        "{% set ns = namespace(s='x' * 100000) %}{% for i in range(5) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        r"the ~ operator would produce 1,600,000 characters \(at most 1,000,000\)",
    ),
    (
        "{% set ns = namespace(s='x' * 100000) %}{% for i in range(5) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        r"the \+ operator would produce 1,600,000 characters",
    ),
    ("{% for i in range(20) %}{{ 'x' * 60000 }}{% endfor %}", r"the output is longer than 1,000,000 characters$"),
    (
        "{% set b %}{% for i in range(20) %}{{ 'x' * 60000 }}{% endfor %}{% endset %}{{ b|length }}",
        r"a captured block or macro would produce 1,200,000 characters",
    ),
    (
        "{% for i in range(20) %}{% set b %}{{ 'x' * 90000 }}{{ 'y' * 90000 }}{{ 'z' * 90000 }}"
        "{% endset %}{% endfor %}",
        r"builds more than 10,000,000 characters in all",
    ),
    # A namespace's attributes can grow after a list holding it was built: weighed when printed.
    (
        "{% set ns = namespace(s='') %}{% set l = [ns] * 1000 %}{% set ns.s = 'x' * 100000 %}{{ l }}",
        r"\{\{ … \}\}: the value would print as more than 1,000,000 characters",
    ),
    (
        "{% set ns = namespace(s='') %}{% set l = [ns] * 1000 %}{% set ns.s = 'x' * 100000 %}{{ l|join }}",
        r"\|join: the value would print as more than 1,000,000 characters",
    ),
    # Other lists, tuples and dicts are weighed as they are built: one made of shared references
    # is small in memory, and one `==` or hash would go through every item without a step.
    (
        "{% set ns = namespace(a=['x' * 100] * 10, b=['x' * 100] * 10) %}{% for i in range(5) %}"
        "{% set ns.a = [ns.a, ns.a, ns.a, ns.a, ns.a, ns.a, ns.a, ns.a, ns.a, ns.a] %}"
        "{% set ns.b = [ns.b, ns.b, ns.b, ns.b, ns.b, ns.b, ns.b, ns.b, ns.b, ns.b] %}{% endfor %}{{ ns.a == ns.b }}",
        r"the list: the value would print as more than 1,000,000 characters",
    ),
    ("{% set a = ['x' * 100] * 10 %}{{ ([a] * 1000)|length }}", r"the \* operator would produce 1,068,000 characters"),
    (
        "{% set a = ['x' * 100000] %}{{ (a + a + a + a + a + a + a + a + a + a + a)|length }}",
        r"the \+ operator would produce",
    ),
    ("{{ dict.fromkeys(range(20000), ['x' * 100])|length }}", r"a call: the value would print as more than"),
    (
        "{{ range(20000)|map(attribute='x', default=['x' * 100])|list|length }}",
        r"\|list: the value would print as more",
    ),
    ("{{ [1]|batch(20000, ['x' * 100])|list|length }}", r"\|batch would produce 2,160,000 characters"),
]


@pytest.mark.parametrize(("body", "refusal"), PAST_THE_DEFAULTS, ids=[b[:50] for b, _ in PAST_THE_DEFAULTS])
def test_a_template_past_a_default_limit_fails_with_what_it_asked_and_where(
    playbook: Playbook, tmp_path: Path, body: str, refusal: str
) -> None:
    templates = _copy_templates(tmp_path)
    (templates / "welcome.html").write_text(
        "{% extends '_layout.html' %}\n{% block body %}\n<p>Hi</p>\n" + body + "\n{% endblock %}\n"
    )
    with pytest.raises(TemplateError, match=r"^welcome\.html: ") as caught:
        EmailRenderer(templates).render(template="welcome", subject="Hi", context=sample_context(playbook))
    message = str(caught.value)
    assert re.search(refusal, message), message
    if not message.endswith("characters"):  # the output cap is checked outside the template
        assert message.endswith("(line 4)"), message


def test_the_steps_of_nested_loops_multiply_and_are_counted_across_parts(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    loops = "{% for i in range(30) %}{% for j in range(30) %}{% endfor %}{% endfor %}"  # 930 steps
    _with_body(
        templates,
        "welcome",
        loops,
        txt="{% for i in range(90) %}{% endfor %}{{ unsubscribe_url }} {{ postal_address }}",
    )
    context = sample_context(playbook)
    EmailRenderer(templates, limits=RenderLimits(steps=1_100)).render(template="welcome", subject="Hi", context=context)
    with pytest.raises(TemplateError, match=r"^welcome\.txt: runs more than 1,000 steps .* \(line 1\)$"):
        EmailRenderer(templates, limits=RenderLimits(steps=1_000)).render(
            template="welcome", subject="Hi", context=context
        )


def test_a_subject_is_rendered_on_the_same_budget(playbook: Playbook, renderer: EmailRenderer) -> None:
    subject = "{% for i in range(99999) %}{% endfor %}Hi"
    with pytest.raises(TemplateError, match=r"^welcome\.html: runs more than 100,000 steps"):
        renderer.render(template="welcome", subject=subject, context=sample_context(playbook))
    with pytest.raises(TemplateError, match=r"^subject of welcome: the \* operator would produce"):
        renderer.render(template="welcome", subject="{{ 'Hi' * 60000 }}", context=sample_context(playbook))


def test_includes_and_calls_count_as_steps(playbook: Playbook, tmp_path: Path) -> None:
    templates = _copy_templates(tmp_path)
    (templates / "two.html").write_text("{% include 'one.html' %}{% include 'one.html' %}")
    (templates / "one.html").write_text("{{ 'x'.upper() }}")
    # 2 (welcome.html, _layout.html) + 10 × 5 (two.html, twice one.html and upper()) + 1 (welcome.txt)
    _with_body(templates, "welcome", "{% include 'two.html' %}" * 10)
    renderer = EmailRenderer(templates, limits=RenderLimits(steps=53))
    assert "XX" * 10 in renderer.render(template="welcome", subject="Hi", context=sample_context(playbook)).html
    _with_body(templates, "welcome", "{% include 'two.html' %}" * 11)
    with pytest.raises(TemplateError, match=r"runs more than 53 steps .*\(line 1 of two\.html\)$"):
        EmailRenderer(templates, limits=RenderLimits(steps=53)).render(
            template="welcome", subject="Hi", context=sample_context(playbook)
        )


def test_a_render_past_its_deadline_stops_at_the_next_step(playbook: Playbook, tmp_path: Path) -> None:
    """The deadline is a backstop on the clock it is given; here a clock that moves one second per reading."""
    templates = _copy_templates(tmp_path)
    _with_body(templates, "welcome", "{% for i in range(1000) %}{% endfor %}")
    readings = iter(range(10**6))
    renderer = EmailRenderer(templates, limits=RenderLimits(seconds=50), clock=lambda: float(next(readings)))
    with pytest.raises(TemplateError, match=r"^welcome\.html: takes longer than 50 s to render \(line 1\)$"):
        renderer.render(template="welcome", subject="Hi", context=sample_context(playbook))
    assert next(readings) < 60, "stopped at the first step past the deadline"


def test_each_step_has_a_preheader_hidden_at_the_top_of_the_html_and_absent_from_the_text(
    playbook: Playbook, renderer: EmailRenderer
) -> None:
    """The preview text an inbox shows after the subject: rendered like the subject, hidden in the email."""
    context = sample_context(playbook)
    for name, seq in playbook.sequences.items():
        for step in seq.steps:
            for variant_id, template, subject in step.contents():
                preheader = step.preheader_of(step.variant(variant_id))
                assert preheader, f"{name}/{step.id} has no preheader"
                email = renderer.render(template=template, subject=subject, context=context, preheader=preheader)
                assert email.preheader
                assert "{" not in email.preheader
                body = email.html.split("<body", 1)[1]
                hidden = re.search(r"<div style=\"display:none;[^\"]*\">([^<]*)</div>", body)
                assert hidden is not None
                assert hidden.group(1).startswith(email.preheader.replace("'", "&#39;"))
                assert body.index(hidden.group(0)) < body.index("<table"), "the preview text comes first"
                assert email.preheader not in email.text


def test_a_preheader_is_rendered_for_the_lead_and_left_out_when_empty(
    playbook: Playbook, renderer: EmailRenderer
) -> None:
    context = sample_context(playbook)
    email = renderer.render(
        template="demo_offer", subject="x", context=context, preheader="A demo for  {{ lead.company }}\n<b>now</b>"
    )
    assert email.preheader == "A demo for Example Corp <b>now</b>"
    assert "A demo for Example Corp &lt;b&gt;now&lt;/b&gt;" in email.html  # escaped like any value
    plain = renderer.render(template="demo_offer", subject="x", context=context)
    assert plain.preheader == ""
    assert "display:none" not in plain.html


def test_a_variant_has_its_own_preheader_or_the_steps() -> None:
    raw = PLAYBOOK_PATH.read_text()
    playbook = parse_playbook(
        raw.replace(
            "            weight: 50\n          - id: b\n",
            '            weight: 50\n            preheader: "Only for {{ lead.first_name }}"\n          - id: b\n',
        )
    )
    step = playbook.sequences["welcome"].steps[0]
    assert step.preheader_of(step.variant("a")) == "Only for {{ lead.first_name }}"
    assert step.preheader_of(step.variant("b")) == step.preheader != ""


def test_a_preheader_that_is_not_a_template_is_refused_with_its_line() -> None:
    raw = PLAYBOOK_PATH.read_text().replace(
        'preheader: "This is our last email unless you want more."', 'preheader: "{{ lead.first_name"'
    )
    with pytest.raises(PlaybookError, match=r"preheader") as caught:
        parse_playbook(raw)
    assert "win_back" in str(caught.value)


@pytest.mark.parametrize("lead", ["full", "sparse"])
def test_plain_text_parts_read_well_in_any_mail_program(playbook: Playbook, renderer: EmailRenderer, lead: str) -> None:
    """Short lines, each link alone on its line (so it stays clickable whole), no HTML left over,
    and the footer after the signature separator ("-- ") that mail programs recognise."""
    context = sample_context(playbook)
    if lead == "sparse":
        context["lead"].update(first_name=None, last_name=None, company=None, job_title=None)
    for template, subject in _all_steps(playbook):
        text = renderer.render(template=template, subject=subject, context=context).text
        lines = text.splitlines()
        for line in lines:
            link = re.search(r"https?://\S+", line)
            if link is not None:
                assert line.strip() == link.group(0), f"{template}.txt: a link shares its line: {line!r}"
            else:
                assert len(line) <= 72, f"{template}.txt: {len(line)} characters: {line!r}"
            assert line == line.rstrip() or line == "-- ", f"{template}.txt: trailing spaces in {line!r}"
        assert not re.search(r"</?[a-zA-Z][^>]*>|&[a-z]+;|&#\d+;", text), f"{template}.txt has HTML in it"
        assert "\n\n\n" not in text
        body, separator, footer = text.partition("\n-- \n")
        assert separator, f"{template}.txt: no signature separator before the footer"
        assert context["unsubscribe_url"] in footer.splitlines()
        assert context["postal_address"] in footer
        assert body.startswith(("Hi ", "Welcome"))


def test_the_template_check_renders_each_preheader(renderer: EmailRenderer) -> None:
    raw = PLAYBOOK_PATH.read_text().replace(
        'preheader: "This is our last email unless you want more."', 'preheader: "Bye {{ lead.nickname }}"'
    )
    problems = renderer.check(parse_playbook(raw))
    line = next(i for i, row in enumerate(raw.splitlines(), 1) if "Bye {{ lead.nickname }}" in row)
    assert problems == [
        f"nurture.yaml:{line}: sequences.win_back.steps.1.preheader: lead has no field 'nickname'; "
        "an imported column is lead.attributes.nickname"
    ]
