"""`nurture serve` and prefect.yaml declare the same deployments.

No Prefect server here: these read the declarations and versions only. The runs that
those schedules produce are tested against a real server in test_prefect_server.py.
"""

from __future__ import annotations

import inspect
from datetime import timedelta
from typing import Any

import yaml

from flows.chunks import advance_chunk
from flows.cycle import dispatch_messages, nurture_cycle
from flows.deployments import served_deployments
from flows.maintenance import import_events, import_leads, rescore_all
from flows.reporting import nurture_report
from tests.conftest import ROOT

FLOWS: dict[str, Any] = {
    "nurture-cycle": nurture_cycle,
    "dispatch": dispatch_messages,
    "rescore-all": rescore_all,
    "import-leads": import_leads,
    "import-events": import_events,
    "advance-chunk": advance_chunk,
    "nurture-report": nurture_report,
}


def _effective_parameters(name: str, given: dict[str, Any]) -> dict[str, Any]:
    """The parameters a run gets: the flow's defaults, overridden by the deployment's."""
    signature = inspect.signature(FLOWS[name].fn)
    defaults = {p.name: p.default for p in signature.parameters.values() if p.default is not inspect.Parameter.empty}
    return {**defaults, **given}


def _schedules(schedules: list[Any]) -> list[tuple[str, object, str]]:
    found = []
    for schedule in schedules:
        if getattr(schedule, "interval", None) is not None:
            found.append(("interval", int(schedule.interval.total_seconds()), schedule.timezone or "UTC"))
        else:
            found.append(("cron", schedule.cron, schedule.timezone or "UTC"))
    return found


def test_nurture_serve_declares_what_prefect_yaml_declares() -> None:
    declared = yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]
    from_yaml = {
        d["name"]: {
            "entrypoint": d["entrypoint"],
            "parameters": _effective_parameters(d["name"], d.get("parameters", {})),
            "schedules": [
                ("interval", s["interval"], s.get("timezone", "UTC"))
                if "interval" in s
                else ("cron", s["cron"], s.get("timezone", "UTC"))
                for s in d.get("schedules", [])
            ],
            "concurrency_limit": d.get("concurrency_limit"),
            "tags": d.get("tags", []),
        }
        for d in declared
    }
    from_serve = {
        d.name: {
            "entrypoint": d.entrypoint,
            "parameters": _effective_parameters(d.name, d.parameters),
            "schedules": _schedules([s.schedule for s in d.schedules]),
            "concurrency_limit": d.concurrency_limit,
            "tags": d.tags,
        }
        for d in served_deployments()
    }
    assert from_serve == from_yaml
    assert from_yaml["nurture-cycle"]["schedules"] == [("interval", 600, "UTC")]
    assert from_yaml["dispatch"]["schedules"] == [("interval", 60, "UTC")]
    # Deployed, the cycle and rescore-all share their chunks with every worker; started by hand, they do not.
    assert from_yaml["nurture-cycle"]["parameters"]["fan_out"] is True
    assert from_yaml["rescore-all"]["parameters"]["fan_out"] is True
    assert from_yaml["advance-chunk"]["schedules"] == []


def test_nurture_serve_intervals_are_the_operators_choice() -> None:
    served = {
        d.name: d
        for d in served_deployments(
            timezone="Europe/Berlin", cycle_every=timedelta(minutes=5), dispatch_every=timedelta(seconds=20)
        )
    }
    assert _schedules([s.schedule for s in served["nurture-cycle"].schedules]) == [("interval", 300, "UTC")]
    assert _schedules([s.schedule for s in served["dispatch"].schedules]) == [("interval", 20, "UTC")]
    assert _schedules([s.schedule for s in served["rescore-all"].schedules]) == [("cron", "0 3 * * *", "Europe/Berlin")]
    assert _schedules([s.schedule for s in served["nurture-report"].schedules]) == [
        ("cron", "0 6 * * *", "Europe/Berlin")
    ]
