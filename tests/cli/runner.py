"""The `nurture` command as a user runs it: a real process, its exit code checked, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path


def run_nurture(
    *args: str,
    expect: int = 0,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    python: tuple[str, ...] = (),
    base_env: Mapping[str, str] | None = None,
    timeout: float = 600,
) -> subprocess.CompletedProcess[str]:
    """``python -m nurture.cli ARGS`` with ``env`` on top of ``base_env`` (default: this process's)."""
    result = subprocess.run(
        [sys.executable, *python, "-m", "nurture.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**(os.environ if base_env is None else base_env), "COLUMNS": "200", **(env or {})},
        timeout=timeout,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == expect, output
    assert "Traceback" not in output, output
    return result


def run_in_checkout(
    *args: str, cwd: Path, expect: int, env: Mapping[str, str] | None = None, python: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    """The command run in a marketer's checkout ``cwd`` with no NURTURE_ setting and no secret of this
    process: the playbook and templates found there, at 80 columns."""
    from tests.conftest import ROOT

    clean = {k: v for k, v in os.environ.items() if not k.startswith("NURTURE_") and not k.endswith("_SECRET")}
    return run_nurture(
        *args,
        cwd=cwd,
        expect=expect,
        python=python,
        base_env=clean,
        env={"COLUMNS": "80", "PYTHONPATH": str(ROOT), **(env or {})},
        timeout=120,
    )


def line_of(text: str, fragment: str) -> int:
    """The 1-based line of ``text`` where ``fragment`` starts."""
    return text[: text.index(fragment)].count("\n") + 1
