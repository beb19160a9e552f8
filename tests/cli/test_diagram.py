"""`nurture diagram` as a user runs it: a real process, real Graphviz when it is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli.runner import run_nurture

pytestmark = pytest.mark.usefixtures("nurture_env")

NEEDS_DOT = pytest.mark.skipif(
    shutil.which("dot") is None, reason="Graphviz's dot is not installed (apt-get install graphviz)"
)


def nurture(*args: str, env: dict[str, str] | None = None, expect: int = 0) -> subprocess.CompletedProcess[str]:
    return run_nurture(*args, env=env, expect=expect, timeout=300)


@NEEDS_DOT
def test_svg_png_and_dot_of_the_shipped_playbook(tmp_path: Path) -> None:
    result = nurture("diagram", "--out", str(tmp_path / "img"))
    for suffix in ("svg", "png", "dot"):
        assert f"wrote {tmp_path / 'img' / f'playbook.{suffix}'}" in result.stdout
    svg = (tmp_path / "img" / "playbook.svg").read_text()
    assert svg.lstrip().startswith("<?xml")
    assert "<svg" in svg
    for text in ("welcome_nudge", "onboarding_tips", "enter at score ≥ 75", "then: clicked welcome"):
        assert text in svg
    png = (tmp_path / "img" / "playbook.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert len(png) > 10_000


@NEEDS_DOT
def test_one_format_writes_only_that_file(tmp_path: Path) -> None:
    nurture("diagram", "--out", str(tmp_path), "--format", "svg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["playbook.svg"]


def test_without_graphviz_the_dot_file_is_written_and_the_way_to_images_is_said(tmp_path: Path) -> None:
    no_dot = {"PATH": str(Path(sys.executable).parent)}  # python, but no Graphviz
    assert shutil.which("dot", path=no_dot["PATH"]) is None
    result = nurture("diagram", "--out", str(tmp_path / "a"), env=no_dot)
    assert "apt-get install graphviz" in result.stderr
    assert "brew install graphviz" in result.stderr
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["playbook.dot"]
    assert (tmp_path / "a" / "playbook.dot").read_text().startswith("digraph playbook {")
    # Asked for an image by name: not drawing it is a failure, and the .dot is still there.
    failed = nurture("diagram", "--out", str(tmp_path / "b"), "--format", "png", env=no_dot, expect=1)
    assert "no PNG" in failed.stderr
    assert (tmp_path / "b" / "playbook.dot").is_file()
    # The DOT text alone needs no Graphviz.
    nurture("diagram", "--out", str(tmp_path / "c"), "--format", "dot", env=no_dot)


def test_an_unknown_format_is_refused(tmp_path: Path) -> None:
    result = nurture("diagram", "--out", str(tmp_path), "--format", "svg,jpg", expect=2)
    assert "a list of svg, png, dot" in result.stderr
