"""Templates that use resources, generated: loops nested at random, repetitions, widths and
counts of every size, strings doubled in loops, macros that call themselves, includes in
loops, recursive loops, captured blocks, nested lists printed.

Each one either renders within its budget, with the same output as Jinja's own immutable
sandbox, or fails with a TemplateError that names the template and the limit it passed. None
hangs (the budget counts steps; the wall-clock deadline is set out of reach so it decides
nothing here) and none allocates much more than the budget lets it build: the sizes asked for
go up to 10,000 times the limits, so one unchecked operation would be seen. A second property
draws only small sizes, so that nearly every template renders and is compared with Jinja's.

Small limits keep each example quick; tests/core/test_rendering.py holds the defaults. Examples:
the `default` profile (``make test``) or ``HYPOTHESIS_PROFILE=full`` (docs/reliability.md).
"""

from __future__ import annotations

import re
import shutil
import tracemalloc
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings, target
from hypothesis import strategies as st
from jinja2 import FileSystemLoader, StrictUndefined, select_autoescape
from jinja2.sandbox import ImmutableSandboxedEnvironment

from nurture.errors import TemplateError
from nurture.playbook import Playbook
from nurture.rendering import EmailRenderer, RenderedEmail, RenderLimits, sample_context
from tests.conftest import TEMPLATES_DIR

LIMITS = RenderLimits(steps=2_000, repeat=2_000, text=20_000, produced=200_000, seconds=10**6)
# Below, at and past each limit, and far past it (20,000,000 is 10,000 times `repeat`); the
# small ones twice as often.
SMALL = st.sampled_from([0, 1, 2, 3, 7, 40, 300, 1_999])
SIZES = st.one_of(SMALL, SMALL, st.sampled_from([2_000, 2_001, 9_999, 20_001, 200_000, 20_000_000]))
# Loops and includes: up to Jinja's own MAX_RANGE (100,000).
COUNTS = st.sampled_from([0, 1, 2, 3, 5, 10, 44, 45, 300, 1_999, 2_001, 100_000])
# Doublings and the depth of a macro calling itself twice (2 ** 11 calls pass the 2,000 steps).
DEPTHS = st.sampled_from([0, 1, 2, 5, 10, 11, 14, 20, 40, 64, 5_000])
# Everything a render may build is counted against `produced` (characters); printing, escaping
# and Jinja's own structures cost a bounded multiple of it, and compiling the template a fixed
# amount. One unchecked repetition of the largest size above would take 20 MB or more.
MAX_PEAK_BYTES = 16 * LIMITS.produced + 4_000_000

REFUSALS = {
    "steps": r"runs more than [\d,]+ steps",
    "size": r"would produce [\d,]+ (characters|items|bytes|words) \(at most [\d,]+\)",
    "output": r"the output is longer than [\d,]+ characters",
    "built in all": r"builds more than [\d,]+ characters in all",
    "printed size": r"the value would print as more than [\d,]+ characters",
    "digits": r"would produce a number of more than [\d,]+ digits",
    "width from the arguments": r"a width or precision taken from the arguments is not allowed",
    "Jinja's MAX_RANGE": r"OverflowError: Range too big\. The sandbox blocks ranges larger than MAX_RANGE",
    "recursion": r"calls itself too deeply",
    "nested too deep": r"nested more than [\d,]+ levels deep",
}

PRELUDE = "{% macro twice(n) %}{% if n > 0 %}{{ twice(n - 1) }}{{ twice(n - 1) }}{% else %}ab{% endif %}{% endmacro %}"


# One operation each, costing about @n (characters, items, width), @k (loops, includes) or @d
# (doublings, depth).
OPERATIONS = {
    "repeat": "{{ 'ab' * @n }}",
    "repeat list": "{{ ([1, 2] * @n)|length }}",
    "center": "{{ 'x'|center(@n) }}",
    "ljust": "{{ 'x'.ljust(@n) }}|",
    "indent": "{{ ('x\\n' * 3)|indent(@n) }}",
    "printf width": "{{ '%@nd' % 7 }}",
    "format width": "{{ '{:>@n}'.format(7) }}",
    "format filter width": "{{ '%@ns'|format('z') }}",
    "replace": "{{ ('ab' * @n)|replace('a', 'xyz') }}",
    "wrapstring": "{{ ('a b ' * 9)|wordwrap(2, wrapstring='-' * @n) }}",
    "batch fill": "{{ [1]|batch(@n, 0)|list|length }}",
    "slices": "{{ range(5)|slice(@n + 1)|list|length }}",
    "join separator": "{{ range(@k)|join('.' * @n) }}",
    "power": "{{ (3 ** @n) > 1 }}",
    "doubling ~": "{% set ns = namespace(s='ab') %}{% for i in range(@d) %}{% set ns.s = ns.s ~ ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "doubling +": "{% set ns = namespace(s=[1]) %}{% for i in range(@d) %}{% set ns.s = ns.s + ns.s %}"
    "{% endfor %}{{ ns.s|length }}",
    "doubling block": "{% set ns = namespace(s='ab') %}{% for i in range(@d) %}{% set b %}{{ ns.s }}{{ ns.s }}"
    "{% endset %}{% set ns.s = b %}{% endfor %}{{ ns.s|length }}",
    "macro tree": "{{ twice(@d)|length }}",
    "nested print": "{% set a = ['ab' * 10] * (@n // 100) %}{% set b = [a, a, a, a] %}{{ b }}",
    "string method join": "{{ '-'.join(['ab'] * (@n // 10))|length }}",
    "tojson indent": "{{ [[1, [2, 'ab' * 9]], {'k': [3]}]|tojson(indent=@n) }}",
    "star width": "{{ '%*d' % (@n, 7) }}",
    "includes in a loop": "{% for i in range(@k) %}{% include '_layout.txt' %}{% endfor %}",
    "recursive loop": "{% for x in [0, 1] recursive %}{{ loop(range(@k)) if loop.depth == 1 else x }}{% endfor %}",
}


def _operations(
    sizes: st.SearchStrategy[int], counts: st.SearchStrategy[int], depths: st.SearchStrategy[int]
) -> st.SearchStrategy[str]:
    return st.builds(
        lambda kind, n, k, d: OPERATIONS[kind].replace("@n", str(n)).replace("@k", str(k)).replace("@d", str(d)),
        st.sampled_from(sorted(OPERATIONS)),
        sizes,
        counts,
        depths,
    )


@st.composite
def bodies(draw: st.DrawFn, operations: st.SearchStrategy[str], counts: st.SearchStrategy[int], depth: int = 0) -> str:
    """Operations in sequence, some inside loops or captured blocks, nested up to 4 deep."""
    parts = []
    for _ in range(draw(st.integers(1, 3 if depth == 0 else 2))):
        shape = draw(st.sampled_from(["operation"] * 3 + (["loop", "loop", "captured"] if depth < 4 else [])))
        if shape == "operation":
            parts.append(draw(operations))
        elif shape == "loop":
            inner = draw(bodies(operations, counts, depth + 1))
            parts.append(f"{{% for i in range({draw(counts)}) %}}{inner}{{% endfor %}}")
        else:
            parts.append(f"{{% set c %}}{draw(bodies(operations, counts, depth + 1))}{{% endset %}}{{{{ c|length }}}}")
    return "".join(parts)


ANY_SIZE = bodies(_operations(SIZES, COUNTS, DEPTHS), COUNTS)
# Well within the limits, where a template should render as Jinja renders it (some still pass
# the 2,000 steps: four nested loops of 7 make 2,401).
TINY = st.sampled_from([0, 1, 2, 3, 7])
WELL_WITHIN = bodies(_operations(st.sampled_from([0, 1, 2, 3, 7, 40]), TINY, TINY), TINY)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    target = tmp_path_factory.mktemp("fuzz-templates") / "templates"
    shutil.copytree(TEMPLATES_DIR, target)
    return target


def _stock(folder: Path) -> ImmutableSandboxedEnvironment:
    """Jinja's own immutable sandbox with nurture's options, no budget: what a template means."""
    return ImmutableSandboxedEnvironment(
        loader=FileSystemLoader(folder),
        autoescape=select_autoescape(enabled_extensions=("html",), default_for_string=False),
        undefined=StrictUndefined,
        finalize=lambda value: "" if value is None else value,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )


def _render(playbook: Playbook, folder: Path, body: str) -> tuple[RenderedEmail | str, int]:
    """The email for ``body`` (or the TemplateError's message), and the bytes allocated at the peak."""
    (folder / "fuzz.html").write_text(
        "{% extends '_layout.html' %}{% block body %}" + PRELUDE + body + "{% endblock %}"
    )
    (folder / "fuzz.txt").write_text(PRELUDE + body + "\n{{ unsubscribe_url }} {{ postal_address }}\n")
    renderer, context = EmailRenderer(folder, limits=LIMITS), sample_context(playbook)
    outcome: RenderedEmail | str
    tracemalloc.start()
    try:
        outcome = renderer.render(template="fuzz", subject="Hi {{ lead.first_name }}", context=context)
    except TemplateError as exc:
        outcome = str(exc)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return outcome, peak


def _refusal(message: str) -> str:
    """Which limit a refusal names (the test fails on any other error)."""
    assert message.startswith(("fuzz.html: ", "fuzz.txt: ")), message
    passed = [name for name, pattern in REFUSALS.items() if re.search(pattern, message)]
    assert passed, message
    return passed[0]


def _same_as_jinja(playbook: Playbook, folder: Path, email: RenderedEmail) -> None:
    assert len(email.html) <= LIMITS.text
    assert len(email.text) <= LIMITS.text
    stock, context = _stock(folder), sample_context(playbook)
    assert email.html == stock.get_template("fuzz.html").render(context)
    assert email.text == stock.get_template("fuzz.txt").render(context)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=ANY_SIZE)
def test_a_template_renders_within_its_budget_or_says_which_limit_it_passed(
    playbook: Playbook, folder: Path, body: str
) -> None:
    email, peak = _render(playbook, folder, body)
    target(float(peak), label="bytes allocated at the peak of a render")
    assert peak < MAX_PEAK_BYTES, f"{peak:,} bytes at the peak"
    if isinstance(email, str):
        event(f"refused: {_refusal(email)}")
        return
    event("rendered")
    _same_as_jinja(playbook, folder, email)


@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(body=WELL_WITHIN)
def test_a_template_well_within_its_budget_renders_as_jinja_renders_it(
    playbook: Playbook, folder: Path, body: str
) -> None:
    email, _ = _render(playbook, folder, body)
    if isinstance(email, str):
        refusal = _refusal(email)
        assert refusal in {"steps", "width from the arguments"}, email  # nested loops; `%*d` is always refused
        event(f"refused: {refusal}")
        return
    event("rendered")
    _same_as_jinja(playbook, folder, email)
