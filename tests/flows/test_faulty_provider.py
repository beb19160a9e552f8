"""The delivery promise end to end: a cycle through a SendGrid that fails 30% of the time."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.faulty_provider import run


def test_every_sent_message_accepted_exactly_once(
    prefect_api: str, nurture_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("NURTURE_TRANSPORT", "SENDGRID_API_KEY", "SENDGRID_API_HOST", "NURTURE_SECRET_KEY"):
        monkeypatch.setenv(name, "")  # restored after the test; run() sets them for its fake
    report = run(leads=120, failure_rate=0.3, workdir=tmp_path)
    assert report["requests_rejected_by_fake"] > 10
    assert report["messages_by_status"].get("sent", 0) > 20
    assert report["messages_by_status"].get("failed", 0) == 0
    assert report["messages_by_status"].get("sending", 0) == 0
    assert report["accepted_more_than_once"] == 0
    assert report["sent_but_not_accepted"] == 0
    assert report["accepted_but_not_recorded_sent"] == 0
    assert report["schema_errors"] == 0
    assert report["custom_args_with_more_than_the_id"] == 0
