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
