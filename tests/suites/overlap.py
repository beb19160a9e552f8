"""Overlap suite: two cycles and two dispatchers started together, repeatedly: nothing happens twice.

Each round: a fresh database with the demo's population, a fake SendGrid in its own
process (20% faults), then `nurture run cycle` twice (30 seconds of simulated time
apart, as two overlapping schedules would be) and `nurture run dispatch` twice, all
four started at once. Then the invariants of tests/suites/invariants.py, with no
message allowed in doubt (nothing was killed): no double transition, enrollment or
send; the ledger's last row is every lead's score.

    .venv/bin/python -m tests.suites.overlap --rounds 10 --engine both
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from db.engine import get_engine
from nurture.playbook import load_playbook
from tests.suites import harness
from tests.suites.invariants import Verdict, check


def run_round(
    *, kind: str, round_: int, seed: int, leads: int, prefect_api: str, workdir: Path, postgres_url: str | None
) -> Verdict:
    logs = workdir / f"overlap-{kind}-{round_}"
    logs.mkdir(parents=True, exist_ok=True)
    database = harness.fresh_database(kind, workdir, postgres_url)
    try:
        harness.populate(database.url, leads=leads, seed=seed + round_)
        with harness.fake_sendgrid(logs / "fake.log", latency=0.02, failure_rate=0.2, seed=seed + round_) as url:
            env = harness.nurture_env(
                database_url=database.url, prefect_api=prefect_api, sendgrid_url=url, lease_seconds=60
            )
            later = harness.NOW + timedelta(seconds=30)
            commands = [
                ["run", "cycle", "--now", harness.NOW.isoformat(), "--batch-size", "100"],
                ["run", "cycle", "--now", later.isoformat(), "--batch-size", "100"],
                ["run", "dispatch", "--now", harness.NOW.isoformat(), "--batch-size", "40"],
                ["run", "dispatch", "--now", harness.NOW.isoformat(), "--batch-size", "40"],
            ]
            handles = [(logs / f"p{i}.log").open("wb") for i in range(len(commands))]
            try:
                processes = [harness.start(c, env, h) for c, h in zip(commands, handles, strict=True)]
                codes = [p.wait(timeout=600) for p in processes]
            finally:
                for handle in handles:
                    handle.close()
            # What the four left due (later steps, retries) is sent by one more dispatcher.
            harness.run_to_end(["run", "dispatch", "--now", later.isoformat()], env, logs / "finish.log")
            log = harness.fake_log(url)
        verdict = check(
            engine=get_engine(database.url),
            playbook=load_playbook(harness.ROOT / "nurture.yaml"),
            requested=log["requested"],
            accepted=log["accepted"],
            now=later,
            in_doubt_bound=0,
        )
        for command, code, index in zip(commands, codes, range(len(codes)), strict=True):
            if code not in (0, 2):  # 2: delivery problems reported, a clean exit
                tail = (logs / f"p{index}.log").read_text(errors="replace")[-1500:]
                verdict.violations.append(f"`nurture {' '.join(command[:2])}` exited {code}:\n{tail}")
        return verdict
    finally:
        database.drop()


def run_suite(
    *, rounds: int, engines: list[str], seed: int, leads: int, prefect_api: str, workdir: Path, postgres_url: str | None
) -> list[dict[str, Any]]:
    reports = []
    for kind in engines:
        accepted, violations = 0, []
        for round_ in range(rounds):
            verdict = run_round(
                kind=kind,
                round_=round_,
                seed=seed,
                leads=leads,
                prefect_api=prefect_api,
                workdir=workdir,
                postgres_url=postgres_url,
            )
            accepted += verdict.accepted
            violations.extend(f"{kind} round {round_}: {v}" for v in verdict.violations)
        reports.append({"engine": kind, "rounds": rounds, "emails_accepted": accepted, "violations": violations})
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--leads", type=int, default=300)
    args = parser.parse_args()
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nurture-overlap-") as tmp, harness.prefect_server(Path(tmp)) as api:
        reports = run_suite(
            rounds=args.rounds,
            engines=engines,
            seed=args.seed,
            leads=args.leads,
            prefect_api=api,
            workdir=Path(tmp),
            postgres_url=os.environ.get("NURTURE_TEST_DATABASE_URL"),
        )
    print(json.dumps(reports, indent=2))
    print(f"{time.monotonic() - started:.0f} s")
    raise SystemExit(1 if any(r["violations"] for r in reports) else 0)


if __name__ == "__main__":
    main()
