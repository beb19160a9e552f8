"""rescore-all after a playbook change, the import flows, and the transition events."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlmodel import col

import flows.chunks
from db.engine import get_engine, session_scope, upgrade_schema
from db.models import Lead, ScoreChange, StageTransition
from flows.cycle import nurture_cycle
from flows.maintenance import import_events, import_leads, rescore_all
from flows.runtime import reset_runtime
from tests.conftest import PLAYBOOK_PATH, T0


def _setup(tmp_path: Path, nurture_env: dict[str, str]) -> Any:
    engine = get_engine(nurture_env["NURTURE_DATABASE_URL"])
    upgrade_schema(engine)
    leads = tmp_path / "leads.csv"
    leads.write_text(
        "email,job_title,company_size\n"
        + "".join(f"lead{i}@acme.example,{'CTO' if i % 2 else 'Analyst'},{50 + i}\n" for i in range(20))
        + "broken-row\n"
    )
    events = tmp_path / "events.jsonl"
    events.write_text(
        "".join(
            f'{{"email": "lead{i}@acme.example", "kind": "form_submit", "occurred_at": "{T0.isoformat()}"}}\n'
            for i in range(20)
        )
    )
    return engine, leads, events


def test_import_flows_then_cycle_then_rescore_all_after_a_playbook_change(
    prefect_api: str, nurture_env: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine, leads, events = _setup(tmp_path, nurture_env)
    assert import_leads(path=str(leads)) | {} == {
        "rows_read": 21,
        "rows_kept": 20,
        "created": 20,
        "updated": 0,
        "duplicates": 0,
        "bad_rows": 1,
    }
    assert import_events(path=str(events))["rows_kept"] == 20

    emitted: list[dict[str, Any]] = []
    monkeypatch.setattr(flows.chunks, "emit_event", lambda **kw: emitted.append(kw))
    first = nurture_cycle(now=T0 + timedelta(hours=1), dispatch=False)
    # CTOs at 50+ people: 15 + 10 + 10 (form) = 35, below warm (40): nobody moves yet.
    assert first["transitions"] == {}

    # Marketing lowers the warm threshold; rescore-all applies it to everyone, in chunks.
    lowered = tmp_path / "nurture.yaml"
    lowered.write_text(
        PLAYBOOK_PATH.read_text().replace(
            "warm: {enter_at: 40, leave_below: 30}", "warm: {enter_at: 30, leave_below: 25}"
        )
    )
    monkeypatch.setenv("NURTURE_PLAYBOOK", str(lowered))
    reset_runtime()
    later = T0 + timedelta(days=3)
    result = rescore_all(now=later, batch_size=7)
    assert result["leads"] == 20
    assert result["transitions"] == {"cold→warm": 10}
    assert len(emitted) == 10
    assert {e["event"] for e in emitted} == {"nurture.lead.transitioned"}
    assert emitted[0]["resource"]["nurture.stage"] == "warm"
    assert emitted[0]["resource"]["prefect.resource.id"].startswith("nurture.lead.")
    with session_scope(engine) as session:
        warm = session.scalars(select(col(Lead.email)).where(col(Lead.stage) == "warm")).all()
        replays = session.scalars(select(ScoreChange).where(col(ScoreChange.at) == later)).all()
        moves = session.scalars(select(StageTransition)).all()
    assert len(warm) == 10
    assert {m.reason.split(" reached ")[1] for m in moves} == {"warm.enter_at 30"}
    # Three days of decay moved every score; each replayed change names the playbook it was made under and
    # gives the new score rule by rule (fit rules, event kinds), less the score it replaced: summing to the change.
    assert len(replays) == 20
    for change in replays:
        previous = f"replay under playbook {change.playbook_version}: previous score"
        assert change.contributions[previous] == pytest.approx(-change.old_score, abs=1e-4)
        assert any(key.startswith("event: ") for key in change.contributions), change.contributions
        assert sum(change.contributions.values()) == pytest.approx(change.new_score - change.old_score, abs=1e-3)
    assert {c.playbook_version for c in replays} == {m.playbook_version for m in moves}


def test_secrets_come_from_prefect_secret_blocks_when_the_environment_has_none(
    prefect_api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prefect.blocks.system import Secret
    from prefect.client.orchestration import get_client

    from flows.runtime import load_secret_blocks

    block_id = Secret(value="from-a-block").save("nurture-secret-key", overwrite=True)
    monkeypatch.delenv("NURTURE_SECRET_KEY", raising=False)
    monkeypatch.setenv("SENDGRID_API_KEY", "from-the-environment")
    try:
        filled = load_secret_blocks()
        assert filled == ["NURTURE_SECRET_KEY"]
        assert os.environ["NURTURE_SECRET_KEY"] == "from-a-block"
        assert os.environ["SENDGRID_API_KEY"] == "from-the-environment"  # the environment wins
    finally:
        os.environ.pop("NURTURE_SECRET_KEY", None)
        with get_client(sync_client=True) as client:  # later tests must not find it
            client.delete_block_document(block_id)
