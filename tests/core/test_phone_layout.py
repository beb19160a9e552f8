"""Every email fits a phone: rendered for a lead, laid out by a real browser (headless Chromium) at
320 and 390 px wide, nothing is wider than the screen, so nobody scrolls sideways."""

from __future__ import annotations

import html
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nurture import pages
from nurture.playbook import Playbook
from nurture.rendering import EmailRenderer, sample_context

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
WIDTHS = (320, 390)

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)"
)

# Each email in a frame as wide as a phone's screen (its media queries see that width); the page
# then writes, for each frame, how wide its content is against how wide the frame shows.
_MEASURE = """<script>
window.addEventListener('load', () => {
  const out = [];
  for (const frame of document.querySelectorAll('iframe')) {
    const root = frame.contentDocument.documentElement;
    out.push(frame.dataset.name + '=' + root.scrollWidth + '/' + frame.contentWindow.innerWidth);
  }
  const pre = document.createElement('pre');
  pre.id = 'widths';
  pre.textContent = out.join(' ');
  document.body.appendChild(pre);
});
</script>"""


def _widths(emails: dict[str, str], width: int, folder: Path) -> dict[str, tuple[int, int]]:
    """(content width, screen width) of each email, laid out by Chromium on a ``width``-pixel screen."""
    assert CHROMIUM is not None
    frames = "".join(
        f'<iframe data-name="{name}" width="{width}" height="4000" style="border:0;display:block" '
        f'srcdoc="{html.escape(source, quote=True)}"></iframe>'
        for name, source in emails.items()
    )
    page = folder / f"phone-{width}.html"
    page.write_text(f"<!DOCTYPE html><html><body style='margin:0'>{frames}{_MEASURE}</body></html>")
    dom = subprocess.run(
        [
            CHROMIUM,
            *("--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"),
            *(f"--window-size={width + 40},900", "--virtual-time-budget=5000", "--dump-dom", page.as_uri()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    ).stdout
    found = re.search(r'<pre id="widths">(.*?)</pre>', dom)
    assert found is not None, f"Chromium did not lay the page out: {dom[:500]!r}"
    pairs = (item.split("=") for item in found.group(1).split())
    return {name: tuple(int(n) for n in size.split("/")) for name, size in pairs}  # type: ignore[misc]


def _emails(playbook: Playbook, renderer: EmailRenderer, context: dict[str, Any]) -> dict[str, str]:
    return {
        f"{name}.{step.id}.{variant or '-'}": renderer.render(
            template=template, subject=subject, context=context, preheader=step.preheader_of(step.variant(variant))
        ).html
        for name, seq in playbook.sequences.items()
        for step in seq.steps
        for variant, template, subject in step.contents()
    }


def _long_lead(playbook: Playbook) -> dict[str, Any]:
    """A lead whose fields are single words too long for any screen, and a long unsubscribe link."""
    context = sample_context(playbook)
    context["lead"].update(first_name="Maximiliana" * 6, company="Internationalisation" * 5)
    context["unsubscribe_url"] = "https://nurture.example/unsubscribe/" + "2.18342.20514." + "Xq0" * 40
    context["postal_address"] = "Aktiengesellschaftsversammlungsraumbenutzungsordnung 1, 10115 Berlin"
    return context


@pytest.mark.parametrize("lead", ["sample", "long words"])
def test_no_email_is_wider_than_a_phone(playbook: Playbook, renderer: EmailRenderer, tmp_path: Path, lead: str) -> None:
    context = sample_context(playbook) if lead == "sample" else _long_lead(playbook)
    emails = _emails(playbook, renderer, context)
    for width in WIDTHS:
        measured = _widths(emails, width, tmp_path)
        assert set(measured) == set(emails)
        too_wide = {name: size for name, size in measured.items() if size[0] > size[1]}
        assert not too_wide, f"scrolls sideways at {width} px (content/screen): {too_wide}"


def test_the_measure_sees_an_email_that_does_not_fit(tmp_path: Path) -> None:
    """The check above can fail: a fixed 600 px card, as the layout once was, is caught at 390 px."""
    fixed = "<html><body><table width='600'><tr><td>Hello</td></tr></table></body></html>"
    measured = _widths({"fixed": fixed}, 390, tmp_path)
    assert measured["fixed"][0] > measured["fixed"][1] == 390


def test_the_unsubscribe_pages_fit_a_phone(tmp_path: Path) -> None:
    brand = pages.PageBrand(name="Internationalisation" * 4, website="https://acme-analytics.example/" + "x" * 80)
    shown = {
        "confirm": pages.confirm_page(
            brand, action="/unsubscribe/2.1.2." + "A" * 24, expired_after_days=400, series="/unsubscribe/t/series"
        ),
        "unsubscribed": pages.unsubscribed_page(brand, undo="/unsubscribe/t/undo"),
        "series_stopped": pages.series_stopped_page(brand, unsubscribe="/unsubscribe/t"),
        "resubscribed": pages.resubscribed_page(brand),
        "cannot_undo": pages.cannot_undo_page(brand),
        "invalid": pages.invalid_link_page(brand),
        "not_found": pages.not_found_page(pages.PageBrand()),
        "error": pages.error_page(brand, status=405, detail="Method Not Allowed " + "y" * 100),
    }
    for width in WIDTHS:
        too_wide = {name: size for name, size in _widths(shown, width, tmp_path).items() if size[0] > size[1]}
        assert not too_wide, f"scrolls sideways at {width} px (content/screen): {too_wide}"
