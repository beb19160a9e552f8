"""Fixtures of the command-line tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import PLAYBOOK_PATH, TEMPLATES_DIR


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A folder laid out as a marketer's checkout: nurture.yaml and templates/ side by side."""
    shutil.copytree(TEMPLATES_DIR, tmp_path / "templates")
    (tmp_path / "nurture.yaml").write_text(PLAYBOOK_PATH.read_text())
    return tmp_path
