"""A cycle over the demo population through SendGrid while SendGrid fails 30% of requests.

Generates the demo population in a temporary SQLite database, points
``NURTURE_TRANSPORT=sendgrid`` at a loopback fake that answers 30% of requests
with 500, 503 or 429, runs one ``nurture-cycle``, and checks the promise: every
message the cycle sent was accepted exactly once, no body failed the schema,
no custom_args carried personal data. Usage:

    .venv/bin/python -m benchmarks.faulty_provider [--leads 500] [--failure-rate 0.3]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlmodel import col

from db.engine import get_engine, session_scope, upgrade_schema
from db.imports import add_events, upsert_leads
from db.models import Message
from nurture.population import generate_population
from tests.fakes.fake_sendgrid import FakeSendGrid

ROOT = Path(__file__).resolve().parents[1]


def run(*, leads: int, failure_rate: float, workdir: Path) -> dict[str, Any]:
    """Run the scenario; returns what a reader needs to judge it."""
    from flows.cycle import nurture_cycle, run_and_report
    from flows.runtime import reset_runtime

    url = f"sqlite:///{workdir / 'nurture.db'}"
    engine = get_engine(url)
    upgrade_schema(engine)
    end = datetime(2026, 3, 2, 15, 0, tzinfo=UTC)  # mid-afternoon in Europe, morning in the Americas
    population = generate_population(leads=leads, start=end - timedelta(weeks=6), end=end, seed=7)
    with session_scope(engine) as session:
        upsert_leads(session=session, records=population.leads, now=end)
        add_events(session=session, records=population.events, now=end)
    with FakeSendGrid() as fake:
        fake.fail_randomly(failure_rate, seed=3)
        os.environ.update(
            {
                "NURTURE_DATABASE_URL": url,
                "NURTURE_TRANSPORT": "sendgrid",
                "SENDGRID_API_KEY": fake.api_key,
                "SENDGRID_API_HOST": fake.url,
                "NURTURE_SECRET_KEY": "scenario-secret",
                "NURTURE_PLAYBOOK": str(ROOT / "nurture.yaml"),
                "NURTURE_TEMPLATES": str(ROOT / "templates"),
            }
        )
        reset_runtime()
        summary, _ = run_and_report(nurture_cycle, now=end)
        ids = Counter(fake.message_ids())
        leaked = [
            body["custom_args"] for body in fake.accepted if set(body.get("custom_args", {})) != {"nurture_message_id"}
        ]
        with session_scope(engine) as session:
            counts = session.execute(select(col(Message.status), func.count()).group_by(col(Message.status)))
            statuses = {status: int(n) for status, n in counts}
            sent_ids = {str(i) for i in session.scalars(select(col(Message.id)).where(col(Message.status) == "sent"))}
        return {
            "leads": leads,
            "requests_rejected_by_fake": len(fake.rejected),
            "requests_accepted_by_fake": len(fake.accepted),
            "messages_by_status": statuses,
            "cycle_messages": summary["messages"],
            "accepted_more_than_once": sum(1 for n in ids.values() if n > 1),
            "sent_but_not_accepted": len(sent_ids - set(ids)),
            "accepted_but_not_recorded_sent": len(set(ids) - sent_ids),
            "schema_errors": len(fake.schema_errors),
            "custom_args_with_more_than_the_id": len(leaked),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--leads", type=int, default=500)
    parser.add_argument("--failure-rate", type=float, default=0.3)
    args = parser.parse_args()
    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    with tempfile.TemporaryDirectory() as workdir:
        report = run(leads=args.leads, failure_rate=args.failure_rate, workdir=Path(workdir))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
