"""Crash suite: the cycle and a dispatcher SIGKILLed at random instants lose no message and send none twice.

Each trial: a fresh database with the demo's population, a fake SendGrid in its own
process that fails 20% of requests (500, 503, 429) and answers after a realistic
delay, then two rounds of `nurture run cycle` and `nurture run dispatch` started
together and each SIGKILLed at a random instant, then the finish: wait for the
leases to run out, run the cycle and the dispatcher to their end, deliver
SendGrid's `processed` events for what it accepted (the webhook's own code path),
and check every invariant (tests/suites/invariants.py).

    .venv/bin/python -m tests.suites.crash --trials 50 --engine both   # the full run (docs/reliability.md)

A fixed seed makes the kill instants and the fake's faults repeatable.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.engine import get_engine
from nurture.playbook import load_playbook
from tests.suites import harness
from tests.suites.invariants import check, settle_with_provider_events

CONCURRENCY = 4  # NURTURE_SEND_CONCURRENCY of every nurture process in the suite


@dataclass
class SuiteReport:
    engine: str
    trials: int = 0
    kills: int = 0
    in_doubt: int = 0
    in_doubt_never_requested: int = 0
    settled_by_events: int = 0
    accepted: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "trials": self.trials,
            "kills": self.kills,
            "emails_accepted_by_sendgrid": self.accepted,
            # Sends a kill left in doubt; SendGrid's `processed` events settled those it had accepted.
            "in_doubt_after_kills": self.in_doubt + self.settled_by_events,
            "in_doubt_settled_by_sendgrid_events": self.settled_by_events,
            "still_in_doubt_sendgrid_never_accepted": self.in_doubt,
            "still_in_doubt_never_reached_sendgrid": self.in_doubt_never_requested,
            "messages_by_status": dict(self.messages),
            "violations": len(self.violations),
        }


def _round_with_kills(
    env: dict[str, str], rng: random.Random, window: float, logs: Path, label: str
) -> tuple[int, int]:
    """Start the cycle and a dispatcher together; SIGKILL each at a random instant. Returns (kills, senders killed)."""
    with (logs / f"{label}-cycle.log").open("wb") as cycle_log, (logs / f"{label}-dispatch.log").open("wb") as d_log:
        processes = [
            harness.start(["run", "cycle", "--now", harness.NOW.isoformat()], env, cycle_log),
            harness.start(["run", "dispatch", "--now", harness.NOW.isoformat(), "--batch-size", "60"], env, d_log),
        ]
        instants = sorted((rng.uniform(0.15, 1.0) * window, i) for i in range(len(processes)))
        started = time.monotonic()
        kills = 0
        for instant, index in instants:
            time.sleep(max(0.0, instant - (time.monotonic() - started)))
            if processes[index].poll() is None:
                processes[index].send_signal(signal.SIGKILL)
                kills += 1
        for process in processes:
            try:
                process.wait(timeout=300)
            except subprocess.TimeoutExpired:
                process.kill()
    # Both processes send (the cycle ends with a dispatch), so every kill may leave requests in flight.
    return kills, kills


def run_trial(
    *,
    kind: str,
    trial: int,
    seed: int,
    leads: int,
    window: float,
    lease_seconds: int,
    prefect_api: str,
    workdir: Path,
    postgres_url: str | None,
    rounds: int = 2,
) -> tuple[int, Any]:
    rng = random.Random(seed * 1000 + trial)
    logs = workdir / f"{kind}-trial-{trial}"
    logs.mkdir(parents=True, exist_ok=True)
    database = harness.fresh_database(kind, workdir, postgres_url)
    try:
        harness.populate(database.url, leads=leads, seed=seed + trial)
        with harness.fake_sendgrid(
            logs / "fake.log", latency=0.03, failure_rate=0.2, seed=seed + trial
        ) as sendgrid_url:
            env = harness.nurture_env(
                database_url=database.url,
                prefect_api=prefect_api,
                sendgrid_url=sendgrid_url,
                lease_seconds=lease_seconds,
            )
            kills = senders_killed = 0
            for round_ in range(rounds):
                k, s = _round_with_kills(env, rng, window, logs, f"round{round_}")
                kills, senders_killed = kills + k, senders_killed + s
            time.sleep(lease_seconds + 0.5)  # the killed processes' leases run out
            harness.run_to_end(["run", "cycle", "--now", harness.NOW.isoformat()], env, logs / "finish-cycle.log")
            for attempt in range(6):
                summary = harness.run_to_end(
                    ["run", "dispatch", "--now", harness.NOW.isoformat()], env, logs / f"finish-dispatch-{attempt}.log"
                )
                if not any(v for k, v in summary.items() if k in ("sent", "queued")):
                    break
            log = harness.fake_log(sendgrid_url)
        engine = get_engine(database.url)
        settled = settle_with_provider_events(engine=engine, accepted_ids=log["accepted"], now=harness.NOW)
        verdict = check(
            engine=engine,
            playbook=load_playbook(harness.ROOT / "nurture.yaml"),
            requested=log["requested"],
            accepted=log["accepted"],
            now=harness.NOW,
            in_doubt_bound=CONCURRENCY * senders_killed,
        )
        verdict.settled_by_events = settled
        return kills, verdict
    finally:
        database.drop()


def calibrate(*, kind: str, seed: int, leads: int, prefect_api: str, workdir: Path, postgres_url: str | None) -> float:
    """How long an unkilled cycle takes here: kill instants are drawn within it."""
    database = harness.fresh_database(kind, workdir, postgres_url)
    try:
        harness.populate(database.url, leads=leads, seed=seed)
        with harness.fake_sendgrid(workdir / "calibrate-fake.log", latency=0.03, failure_rate=0.2, seed=seed) as url:
            env = harness.nurture_env(
                database_url=database.url, prefect_api=prefect_api, sendgrid_url=url, lease_seconds=3
            )
            started = time.monotonic()
            harness.run_to_end(["run", "cycle", "--now", harness.NOW.isoformat()], env, workdir / "calibrate.log")
            return time.monotonic() - started
    finally:
        database.drop()


def run_suite(
    *,
    trials: int,
    engines: list[str],
    seed: int,
    leads: int,
    prefect_api: str,
    workdir: Path,
    postgres_url: str | None,
    lease_seconds: int = 3,
    echo: bool = True,
) -> list[SuiteReport]:
    reports = []
    for kind in engines:
        window = calibrate(
            kind=kind, seed=seed, leads=leads, prefect_api=prefect_api, workdir=workdir, postgres_url=postgres_url
        )
        report = SuiteReport(engine=kind)
        for trial in range(trials):
            kills, verdict = run_trial(
                kind=kind,
                trial=trial,
                seed=seed,
                leads=leads,
                window=window,
                lease_seconds=lease_seconds,
                prefect_api=prefect_api,
                workdir=workdir,
                postgres_url=postgres_url,
            )
            report.trials += 1
            report.kills += kills
            report.in_doubt += verdict.in_doubt
            report.in_doubt_never_requested += verdict.in_doubt_never_requested
            report.settled_by_events += verdict.settled_by_events
            report.accepted += verdict.accepted
            report.messages.update(verdict.messages)
            report.violations.extend(f"{kind} trial {trial}: {v}" for v in verdict.violations)
            if echo:
                print(
                    f"{kind} trial {trial + 1}/{trials}: {kills} kills, {verdict.accepted} accepted, "
                    f"{verdict.in_doubt + verdict.settled_by_events} in doubt "
                    f"({verdict.settled_by_events} settled by SendGrid's events), {len(verdict.violations)} violations",
                    flush=True,
                )
                for violation in verdict.violations:
                    print(f"  VIOLATION {violation}", flush=True)
        reports.append(report)
    return reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=50)
    parser.add_argument("--engine", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--leads", type=int, default=300)
    args = parser.parse_args()
    engines = ["sqlite", "postgresql"] if args.engine == "both" else [args.engine]
    postgres_url = os.environ.get("NURTURE_TEST_DATABASE_URL")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nurture-crash-") as tmp, harness.prefect_server(Path(tmp)) as api:
        reports = run_suite(
            trials=args.trials,
            engines=engines,
            seed=args.seed,
            leads=args.leads,
            prefect_api=api,
            workdir=Path(tmp),
            postgres_url=postgres_url,
        )
    print(json.dumps([r.as_dict() for r in reports], indent=2))
    print(f"{time.monotonic() - started:.0f} s")
    raise SystemExit(1 if any(r.violations for r in reports) else 0)


if __name__ == "__main__":
    main()
